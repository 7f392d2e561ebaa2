#!/usr/bin/env bash
# One prepared GPU check for the Triton linear-attention kernels (< 10 min on an H100/H200; most of it JIT-compiling the ~100 kernel variants the tests launch).
#
#   1. installs requirements.txt (skipped quickly when already satisfied; tolerated offline),
#   2. runs the kernel tests with the *compiled* kernels on the GPU (TRITON_INTERPRET unset;
#      tests/test_kernels_triton.py picks device cuda: every feature map x denominator x causality,
#      the chunk-parallel causal form at N=1025, the focused map's scale gradient; its gradchecks
#      stay on CPU in float64),
#   3. bench/kernel_resources.py: the launched kernels' shared memory / registers / spills as the
#      driver reports them (tests/test_kernels_compile.py predicts them without a GPU),
#   4. runs bench/attention.py in bf16, B=8, H=12, d=64 (Triton vs SDPA/flash vs plain PyTorch):
#      affine bidirectional, affine causal (text tower), focused bidirectional.
#
# Usage: bash bench/gpu_check.sh [OUT_DIR]     (default OUT_DIR: $OUT if set, else bench/results)
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

step "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PYTHON - <<'EOF' || { echo "FATAL: need torch with CUDA and triton"; exit 2; }
import torch, triton
assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}")
EOF

step "pip install -r requirements.txt"
timeout 60 $PYTHON -m pip install --quiet --disable-pip-version-check -r requirements.txt \
  || echo "WARNING: pip install failed or timed out (offline?); continuing with the installed packages"

step "kernel tests on the GPU (compiled Triton, no interpreter)"
timeout 420 $PYTHON -m pytest -q -p no:cacheprovider --durations=5 \
  tests/test_kernels.py tests/test_kernels_triton.py || { echo "FAILED: kernel tests"; status=1; }

step "launched kernels: shared memory, registers, spills (bf16, d=64)"
timeout 90 $PYTHON bench/kernel_resources.py || { echo "FAILED: resource report"; status=1; }

step "benchmark: bf16, B=8, H=12, d=64, bidirectional"
timeout 100 $PYTHON bench/attention.py --device cuda --dtype bf16 --batch 8 --heads 12 --head-dim 64 \
  --reps 20 --min-time 1 --out-dir "$OUT_DIR" || { echo "FAILED: benchmark"; status=1; }

step "benchmark: bf16, B=8, H=12, d=64, causal (text tower)"
timeout 45 $PYTHON bench/attention.py --device cuda --dtype bf16 --batch 8 --heads 12 --head-dim 64 \
  --tokens 77 197 1025 4097 --causal --reps 20 --min-time 1 --no-plot --out-dir "$OUT_DIR" \
  || { echo "FAILED: causal benchmark"; status=1; }

step "benchmark: bf16, B=8, H=12, d=64, focused map (kernel normaliser), bidirectional"
timeout 45 $PYTHON bench/attention.py --device cuda --dtype bf16 --batch 8 --heads 12 --head-dim 64 \
  --tokens 197 1025 4097 --kind linear-focused --reps 20 --min-time 1 --no-plot --out-dir "$OUT_DIR" \
  || { echo "FAILED: focused benchmark"; status=1; }

step "done: status $status; tables, plots and this log in $OUT_DIR"
exit $status
