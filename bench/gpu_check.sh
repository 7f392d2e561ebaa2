#!/usr/bin/env bash
# One prepared GPU check: the Triton linear-attention kernels, then the trainer end to end (< 9 min on one
# H100/H200: a deadline bounds it, see GPU_CHECK_BUDGET).
#
#   1. installs requirements.txt (skipped quickly when already satisfied; tolerated offline),
#   2. runs the kernel tests with the *compiled* kernels on the GPU (TRITON_INTERPRET unset;
#      tests/test_kernels_triton.py picks device cuda: every feature map x denominator x causality,
#      the chunk-parallel causal form at N=1025, the focused map's scale gradient; its gradchecks
#      stay on CPU in float64),
#   3. bench/kernel_resources.py: the launched kernels' shared memory / registers / spills as the
#      driver reports them (tests/test_kernels_compile.py predicts them without a GPU),
#   4. runs bench/attention.py in bf16, B=8, H=12, d=64 (Triton vs SDPA/flash vs plain PyTorch):
#      affine bidirectional, affine causal (text tower), focused bidirectional,
#   5. the trainer on one GPU (bench/throughput.py, synthetic shards): ViT-B/16, bf16, ZeRO-2 at 224,
#      448 and 896 px (197 / 785 / 3137 tokens), softmax (SDPA/flash) vs linear-focused-local3 vs
#      softmax with patch dropout 0.5: images/s, peak memory and the ratios, one table per size.
#
# Usage: bash bench/gpu_check.sh [OUT_DIR]     (default OUT_DIR: $OUT if set, else bench/results)
#   PART=trainer runs only step 5, with TRAINER_DEVICE (cuda), TRAINER_PRESET (vit_b16),
#   TRAINER_SIZES ("224:32 448:16 896:8", px:batch), TRAINER_PRECISION (bf16), TRAINER_WORKERS (6
#   data workers), TRAINER_THREADS (4) and TRAINER_TIMEOUT (120 s a size): the CPU test of its
#   plumbing runs `PART=trainer TRAINER_DEVICE=cpu TRAINER_PRESET=tiny ...`.
#   GPU_CHECK_BUDGET (530 s): the whole script's deadline. Each step's timeout is its own or what is
#   left of the budget, whichever is less (SIGTERM, then SIGKILL 10 s later); a step with under 10 s
#   left is skipped (and fails the script), so the script ends within the budget (+10 s) even when
#   every step runs to its timeout.
# Targets: gradients within bf16 tolerance of the float64 reference; fwd+bwd at least as
# fast as SDPA at N=1025 and >= 4x faster at N=4097. Exit status: non-zero if a step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-bench/results}}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
exec > >(tee "$LOG") 2>&1
PYTHON="${PYTHON:-python3}"
unset TRITON_INTERPRET
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
step() { echo; echo "=== $* ($(date +%T))"; }
GPU_CHECK_BUDGET="${GPU_CHECK_BUDGET:-530}"
DEADLINE=$((SECONDS + GPU_CHECK_BUDGET))
# within SECONDS_WANTED CMD...: run CMD under `timeout` of min(SECONDS_WANTED, what is left of the budget)
within() {
  local want=$1 left=$((DEADLINE - SECONDS)); shift
  if [ "$left" -lt 10 ]; then
    echo "SKIPPED: ${GPU_CHECK_BUDGET} s budget spent (${left} s left): $*"
    return 124
  fi
  [ "$left" -lt "$want" ] && want=$left
  timeout -k 10 "$want" "$@"
}

PART="${PART:-all}"
TRAINER_DEVICE="${TRAINER_DEVICE:-cuda}"
TRAINER_PRESET="${TRAINER_PRESET:-vit_b16}"
TRAINER_SIZES="${TRAINER_SIZES:-224:32 448:16 896:8}"
TRAINER_PRECISION="${TRAINER_PRECISION:-bf16}"
TRAINER_WORKERS="${TRAINER_WORKERS:-6}"
TRAINER_THREADS="${TRAINER_THREADS:-4}"
TRAINER_TIMEOUT="${TRAINER_TIMEOUT:-120}"
TRAINER_RUNS="softmax linear-focused-local3 softmax:pd0.5"

trainer_pass() {
  # one process per run, the batch shrinking with the token count so 896 px fits
  for size_batch in $TRAINER_SIZES; do
    size=${size_batch%%:*}; batch=${size_batch##*:}
    step "trainer: $TRAINER_PRESET at $size px, batch $batch, $TRAINER_PRECISION, ZeRO-2 ($TRAINER_RUNS)"
    within "$TRAINER_TIMEOUT" $PYTHON bench/throughput.py --device "$TRAINER_DEVICE" --preset "$TRAINER_PRESET" --image-size "$size" \
      --precision "$TRAINER_PRECISION" --zero-stage 2 --batch-size "$batch" --steps 16 --skip-steps 8 --log-every 4 \
      --workers "$TRAINER_WORKERS" --threads "$TRAINER_THREADS" --repeats 1 --baseline none --runs $TRAINER_RUNS \
      --timeout "$TRAINER_TIMEOUT" \
      --out "$OUT_DIR/trainer_${size}px.json" || { echo "FAILED: trainer pass at $size px"; status=1; }
  done
}

if [ "$PART" = trainer ]; then
  trainer_pass
  step "done: status $status; tables in $OUT_DIR"
  exit $status
fi

step "environment"
within 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
within 60 $PYTHON - <<'EOF' || { echo "FATAL: need torch with CUDA and triton"; exit 2; }
import torch, triton
assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}")
EOF

step "pip install -r requirements.txt"
within 30 $PYTHON -m pip install --quiet --disable-pip-version-check -r requirements.txt \
  || echo "WARNING: pip install failed or timed out (offline?); continuing with the installed packages"

step "kernel tests on the GPU (compiled Triton, no interpreter)"
within 240 $PYTHON -m pytest -q -p no:cacheprovider --durations=5 \
  tests/test_kernels.py tests/test_kernels_triton.py || { echo "FAILED: kernel tests"; status=1; }

step "launched kernels: shared memory, registers, spills (bf16, d=64)"
within 40 $PYTHON bench/kernel_resources.py || { echo "FAILED: resource report"; status=1; }

step "benchmark: bf16, B=8, H=12, d=64, bidirectional"
within 60 $PYTHON bench/attention.py --device cuda --dtype bf16 --batch 8 --heads 12 --head-dim 64 \
  --reps 20 --min-time 1 --out-dir "$OUT_DIR" || { echo "FAILED: benchmark"; status=1; }

step "benchmark: bf16, B=8, H=12, d=64, causal (text tower)"
within 30 $PYTHON bench/attention.py --device cuda --dtype bf16 --batch 8 --heads 12 --head-dim 64 \
  --tokens 77 197 1025 4097 --causal --reps 20 --min-time 1 --no-plot --out-dir "$OUT_DIR" \
  || { echo "FAILED: causal benchmark"; status=1; }

step "benchmark: bf16, B=8, H=12, d=64, focused map (kernel normaliser), bidirectional"
within 30 $PYTHON bench/attention.py --device cuda --dtype bf16 --batch 8 --heads 12 --head-dim 64 \
  --tokens 197 1025 4097 --kind linear-focused --reps 20 --min-time 1 --no-plot --out-dir "$OUT_DIR" \
  || { echo "FAILED: focused benchmark"; status=1; }

trainer_pass

step "done: status $status; tables, plots and this log in $OUT_DIR"
exit $status
