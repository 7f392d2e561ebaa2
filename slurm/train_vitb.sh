#!/bin/bash
# ViT-B/16 linear-attention CLIP on LAION-400M: 16 nodes x 8 GPUs, one task per GPU.
#
#   mkdir -p logs && sbatch slurm/train_vitb.sh [key=value trainer overrides ...]
#   e.g. sbatch --nodes=2 slurm/train_vitb.sh data.train_shards='/data/laion400m/{00000..41455}.tar'
#
# Every #SBATCH line below can be overridden on the sbatch command line (--nodes, --time, ...);
# every argument after the script is a trainer config override on top of
# configs/vit_b16_laion400m.yaml (an extra `--config FILE` there is layered on top too).
# Preemption / time limit: Slurm sends USR1 120 s before the end, the trainer checkpoints and
# exits 75, and this job requeues itself; the requeued run resumes from the checkpoint.
# No GPU (tests): DS_ACCELERATOR=cpu sbatch --gpus-per-node=0 --cpus-per-task=1 ...
#SBATCH --job-name=linclip-vitb16
#SBATCH --nodes=16
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --time=72:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

# sbatch runs a spooled copy of this file; the job's Command= is the path that was submitted
script=$(scontrol show job "${SLURM_JOB_ID:-none}" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')
source "${LINCLIP_ROOT:-$(dirname "${script:-$0}")/..}/slurm/_common.sh" || exit 2

linclip_train configs/vit_b16_laion400m.yaml "$@"
