#!/usr/bin/env bash
# The test command (README, CI): installs what is missing, then runs pytest on tests/. Extra
# arguments go to pytest.
#
#   bash scripts/test.sh -m "not slow"     the inner loop: every unit, parity, CLI and
#                                          fail-fast test; under 5 min on an idle 2-core machine
#                                          (812 tests: 3 min 3 s, cold caches, alone on the 2 cores)
#   bash scripts/test.sh tests/test_X.py   one module while you work on it (-k NAME: one test)
#   bash scripts/test.sh                   everything, as CI runs it: multi-rank DeepSpeed trainings
#                                          (kill -9 + resume, ZeRO 1/2/3), the demo, Slurm, long
#                                          interpreted-Triton cases; 16.9 min for 926 tests on 2 idle
#                                          cores with cold caches (docs/testing.md)
#
# A test that takes more than ~20 s is marked @pytest.mark.slow. Before a commit, run the fast
# tier plus the slow tests of the modules you touched (`-m slow tests/test_X.py`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export DS_ACCELERATOR=cpu
exec python3 -m pytest tests -v --durations=25 "$@"
