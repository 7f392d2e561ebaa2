#!/usr/bin/env bash
# The test command (README, CI): installs what is missing, then runs the whole suite, slow tests
# included. Extra arguments go to pytest (e.g. `bash scripts/test.sh -k config`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export DS_ACCELERATOR=cpu
exec python3 -m pytest tests -v --durations=25 "$@"
