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
echo "[install] ok"
