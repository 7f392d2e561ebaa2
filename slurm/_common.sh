# Shared by slurm/train_*.sh and slurm/eval.sh (sourced, not run). Bash.
#
# What a job script gets from here:
#   linclip_train CONFIG [key=value ...]  srun one trainer task per GPU (CPU: per allocated task),
#                                         resume=auto; exit code 75 -> `scontrol requeue`
#   linclip_eval [eval args ...]          srun one eval task
# Environment knobs (all optional; export them before `sbatch`, which passes the environment on):
#   DS_ACCELERATOR=cpu   no GPU: DeepSpeed's CPU accelerator with gloo (tests, laptops)
#   LINCLIP_PYTHON       the Python to run (default: python3 on PATH, e.g. your venv's)
#   LINCLIP_ROOT         the repository (default: the one this file is in)

set -uo pipefail

# The trainer's "checkpointed after SIGUSR1/SIGTERM, please requeue me" exit code
# (REQUEUE_EXIT_CODE in ds_linclip/train/loop.py; 75 is EX_TEMPFAIL).
LINCLIP_REQUEUE_EXIT_CODE=75

linclip_log() { echo "[linclip-slurm $(date '+%F %T')] $*" >&2; }

# `bash slurm/<script>.sh --help`: the script's header comment (usage and #SBATCH defaults)
linclip_help_or_check() {
  if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    awk 'NR > 1 && !/^#/ {exit} NR > 1 && !/^#SBATCH/ {sub(/^# ?/, "")} NR > 1 {print}' "$0"
    exit 0
  fi
  if [[ -z "${SLURM_JOB_ID:-}" ]]; then
    linclip_log "not inside a Slurm job: submit it, e.g. \`mkdir -p logs && sbatch $0 key=value ...\` (--help for more)"
    exit 2
  fi
}

# ---- where the code is ------------------------------------------------------------------------
# The job script sourced this file by its real path (see the top of train_*.sh), so it knows the
# repository; LINCLIP_ROOT wins when set.
LINCLIP_ROOT=${LINCLIP_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
export LINCLIP_ROOT

# ---- environment for every task ---------------------------------------------------------------
linclip_setup_env() {
  # No `cd`: the job keeps its working directory (where sbatch ran, or --chdir), so relative
  # paths in overrides mean what they meant to the user. The repository's package comes first on
  # the path (works with and without `pip install -e .`).
  export PYTHONPATH="$LINCLIP_ROOT${PYTHONPATH:+:$PYTHONPATH}"
  LINCLIP_PYTHON=${LINCLIP_PYTHON:-python3}

  # Rendezvous for torch.distributed (env://): the first host of the allocation, and a port that
  # is fixed for this job id (so a requeued job uses the same) and differs between jobs that
  # share a node.
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  MASTER_PORT=$((20000 + SLURM_JOB_ID % 40000))  # as ds_linclip.train.engine.dist_env derives it
  export MASTER_ADDR MASTER_PORT

  # one OpenMP pool per task, sized to its CPUs
  export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}

  if [[ "${DS_ACCELERATOR:-}" == "cpu" ]]; then
    # DeepSpeed's CPU accelerator (sbatch passes the submitter's environment); gloo there
    export CUDA_VISIBLE_DEVICES=""
  fi

  # ---- NCCL / network: settings clusters often need; uncomment what yours wants ----------------
  # export NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,NET   # which interface/transport NCCL picked, and why
  # export NCCL_SOCKET_IFNAME=ib0              # bootstrap/socket interface (or ^lo,docker0 to exclude)
  # export GLOO_SOCKET_IFNAME=ib0              # the same for gloo (CPU runs, some object collectives)
  # export NCCL_IB_HCA=mlx5                    # InfiniBand adapters to use (prefix match)
  # export NCCL_IB_DISABLE=1                   # no usable InfiniBand: TCP sockets only ...
  # export NCCL_NSOCKS_PERTHREAD=4 NCCL_SOCKET_NTHREADS=2   # ... and more bandwidth over them
  # export NCCL_NET_GDR_LEVEL=PHB              # GPUDirect RDMA only up to this PCIe distance
  # export NCCL_P2P_DISABLE=1                  # GPUs whose peer-to-peer PCIe path is broken
  # export FI_PROVIDER=efa FI_EFA_USE_DEVICE_RDMA=1   # AWS EFA (with the aws-ofi-nccl plugin)
  # export TORCH_NCCL_ASYNC_ERROR_HANDLING=1   # a dead rank aborts the others' collectives (default on)
  # export TORCH_DISTRIBUTED_DEBUG=DETAIL      # mismatched collectives: which rank, which call
}

# ---- srun with the batch shell's signals forwarded ---------------------------------------------
# `--signal=USR1@120` (no `B:`) signals the srun steps directly. `--signal=B:USR1@...` and
# `scancel --signal=USR1 --batch` reach only this batch shell: trap and pass them to srun, which
# forwards USR1 to every task. `wait` returns early when a trapped signal arrives, so wait again
# until srun really exited.
# SIGTERM reaches the batch shell when the job is cancelled (scancel), preempted or out of time;
# Slurm also sends it to the tasks. srun answers TERM by killing the step, so pass USR1 instead
# (the trainer treats both alike: finish the step, checkpoint, exit 75) and remember the TERM:
# such a job must not requeue itself (a cancelled job would come back; a preempted one Slurm
# requeues by itself).
# No --kill-on-bad-exit: the trainer's requeue exit (75) is non-zero, and ranks leave a few
# moments apart after the common checkpoint; killing the later ones would lose their exit status
# (or rank 0's final export). A crashed rank makes the others fail at their next collective
# (torch.distributed's timeout).
LINCLIP_GOT_TERM=0 LINCLIP_GOT_USR1=0 LINCLIP_INTERRUPTED=0 LINCLIP_SRUN_PID=""
linclip_on_signal() {
  LINCLIP_INTERRUPTED=1
  if [[ $1 == TERM ]]; then LINCLIP_GOT_TERM=1; else LINCLIP_GOT_USR1=1; fi
  if [[ -n $LINCLIP_SRUN_PID ]]; then
    linclip_log "batch shell got $1, sending USR1 to the tasks through srun"
    kill -USR1 "$LINCLIP_SRUN_PID" 2>/dev/null
  else
    linclip_log "batch shell got $1 before the tasks started"
  fi
}
# installed when this file is sourced, so no signal finds the batch shell unprotected
trap 'linclip_on_signal USR1' USR1
trap 'linclip_on_signal TERM' TERM

linclip_srun() {
  local rc last_rc=0
  srun "$@" &
  LINCLIP_SRUN_PID=$!
  while :; do
    LINCLIP_INTERRUPTED=0
    wait "$LINCLIP_SRUN_PID"
    rc=$?
    if [[ $LINCLIP_INTERRUPTED == 1 ]]; then last_rc=$rc; continue; fi
    # 127: the signal and srun's exit crossed; the status was already collected above
    if [[ $rc == 127 ]]; then rc=$last_rc; fi
    break
  done
  LINCLIP_SRUN_PID=""
  return "$rc"
}

# one line a task runs: standard torch.distributed variables from Slurm's, then the program
LINCLIP_TASK_WRAPPER='export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS; exec "$@"'

# put this job back in the queue (same job id, so the same run dir, log and MASTER_PORT); exits
linclip_requeue() {
  linclip_log "scontrol requeue $SLURM_JOB_ID"
  if scontrol requeue "$SLURM_JOB_ID"; then
    exit 0
  fi
  linclip_log "scontrol requeue failed (submitted with --no-requeue, or JobRequeue=0?); resubmit to continue from the checkpoint"
  exit "$LINCLIP_REQUEUE_EXIT_CODE"
}

linclip_train() {
  local config=$1
  shift
  linclip_help_or_check "$@"
  [[ $config == /* || -f $config ]] || config="$LINCLIP_ROOT/$config"
  # the trainer's CLI wants options before the key=value overrides: move a user's `--config FILE`
  # (layered on top of the script's config) in front
  local -a configs=(--config "$config") overrides=()
  while (($#)); do
    case $1 in
      --config) configs+=(--config "$2"); shift 2 ;;
      --config=*) configs+=(--config "${1#--config=}"); shift ;;
      *) overrides+=("$1"); shift ;;
    esac
  done
  linclip_setup_env
  linclip_log "job ${SLURM_JOB_ID} (${SLURM_JOB_NAME:-}) restart ${SLURM_RESTART_COUNT:-0}: ${SLURM_NTASKS} tasks on ${SLURM_JOB_NUM_NODES} node(s) [${SLURM_JOB_NODELIST}], master ${MASTER_ADDR}:${MASTER_PORT}, accelerator ${DS_ACCELERATOR:-auto}"
  linclip_log "config: ${configs[*]}; overrides: ${overrides[*]}"
  if [[ $LINCLIP_GOT_TERM == 1 ]]; then
    linclip_log "SIGTERM before the trainer started: nothing to do"
    exit 143
  elif [[ $LINCLIP_GOT_USR1 == 1 ]]; then
    # nothing trained since the last checkpoint: go straight back to the queue
    linclip_requeue
  fi
  linclip_srun bash -c "$LINCLIP_TASK_WRAPPER" linclip-task \
    "$LINCLIP_PYTHON" -m ds_linclip.train "${configs[@]}" train.resume=auto "${overrides[@]}"
  local rc=$?
  if [[ $rc == "$LINCLIP_REQUEUE_EXIT_CODE" && $LINCLIP_GOT_TERM == 1 ]]; then
    linclip_log "trainer checkpointed after SIGTERM (scancel, preemption or time limit): not requeueing; a preempted job is requeued by Slurm, otherwise resubmit to continue from the checkpoint"
  elif [[ $rc == "$LINCLIP_REQUEUE_EXIT_CODE" ]]; then
    linclip_log "trainer checkpointed and asked to be requeued (exit $rc)"
    linclip_requeue
  elif [[ $rc != 0 ]]; then
    linclip_log "trainer failed with exit code $rc"
  else
    linclip_log "trainer finished"
  fi
  exit "$rc"
}

linclip_eval() {
  linclip_help_or_check "$@"
  linclip_setup_env
  linclip_log "job ${SLURM_JOB_ID}: eval $*"
  linclip_srun --ntasks=1 "$LINCLIP_PYTHON" -m ds_linclip.eval "$@"
  local rc=$?
  linclip_log "eval exited with code $rc"
  exit "$rc"
}
