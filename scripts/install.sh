#!/usr/bin/env bash
# Installs everything ds_linclip needs on a fresh Debian machine (apt + pip). Idempotent: a second
# run only checks. Used by the README's demo and test commands and by CI.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  dataset-fashion-mnist           # the demo's real images (70k, offline)
  slurmctld slurmd slurm-client munge   # a real one-node Slurm cluster for tests/test_slurm.py
  g++                             # DeepSpeed JIT-builds a small CPU communication op on first use
)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "[install] apt: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
stamp=".install-stamp"
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! "$PYTHON" -c "import ds_linclip, deepspeed, open_clip, webdataset" 2>/dev/null; then
  echo "[install] pip: requirements.txt + this package (editable)"
  # torch first and alone: pinned CUDA build (runs on CPU too)
  "$PYTHON" -m pip install -q "$(grep -E '^torch==' requirements.txt)" "$(grep -E '^torchvision==' requirements.txt)"
  "$PYTHON" -m pip install -q -r requirements.txt
  "$PYTHON" -m pip install -q --no-deps -e .
  echo "$want" > "$stamp"
fi
# DeepSpeed's CPU accelerator JIT-builds its shared-memory allreduce op (C++, ~30 s on 2 cores) the first time
# ranks start on one machine; build it here, once per machine, not in the middle of the first training run.
ext_dir=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}
# (torch puts it in $TORCH_EXTENSIONS_DIR/<op>/, or by default in ~/.cache/torch_extensions/<python_cuda>/<op>/)
if ! compgen -G "$ext_dir/deepspeed_shm_comm/deepspeed_shm_comm*.so" >/dev/null \
    && ! compgen -G "$ext_dir/*/deepspeed_shm_comm/deepspeed_shm_comm*.so" >/dev/null; then
  echo "[install] building DeepSpeed's CPU communication op (once per machine)"
  DS_ACCELERATOR=cpu "$PYTHON" -c 'from deepspeed.accelerator import get_accelerator
get_accelerator().create_op_builder("ShareMemCommBuilder").load(verbose=False)' >/dev/null 2>&1 \
    || echo "[install] warning: DeepSpeed's CPU communication op did not build; it will be built at first use"
fi
echo "[install] ok"
