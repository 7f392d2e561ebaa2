"""bench/throughput.py and the trainer pass of bench/gpu_check.sh, run for real at tiny shapes on CPU.

The GPU check's step 5 is the same script on a GPU with ViT-B/16; here its plumbing (synthetic
shards, one trainer process per run, patch dropout, the log parsing, the table and the JSON) runs
through `PART=trainer` with the tiny preset, so a broken trainer pass shows up without a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import throughput  # noqa: E402


def test_run_entries_parse_and_refuse_clearly():
    assert throughput.parse_run("softmax:pd0.5") == throughput.Run("softmax", 0.5)
    assert throughput.parse_run("linear-focused-local3").label == "ours linear-focused-local3"
    for bad, message in (("softmax:pd1.0", r"\[0, 1\)"), ("softmax:x", "pdF"), ("linear-nope", "attention name")):
        with pytest.raises(Exception, match=message):
            throughput.parse_run(bad)
    # the text tower is causal: it takes the image tower's name without the local branch
    overrides = throughput.attention_overrides("linear-focused-local3")
    assert "model.image.local_kernel=3" in overrides and not any(o.startswith("model.text.local") for o in overrides)


@pytest.mark.slow
def test_gpu_check_trainer_pass_runs_on_cpu(tmp_path):
    env = dict(os.environ, PART="trainer", TRAINER_DEVICE="cpu", TRAINER_PRESET="tiny", TRAINER_SIZES="32:8",
               TRAINER_PRECISION="fp32", TRAINER_WORKERS="1", TRAINER_THREADS="1", TRAINER_TIMEOUT="500",
               PYTHON=sys.executable)
    result = subprocess.run(["bash", "bench/gpu_check.sh", str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    report = json.loads((tmp_path / "trainer_32px.json").read_text())
    rows = {r["label"]: r for r in report["results"]}
    assert set(rows) == {"ours softmax", "ours linear-focused-local3", "ours softmax pd0.5"}
    for row in rows.values():
        assert row["images_per_s"] > 0 and row["peak_mib"] > 0 and len(row["rounds_step_s"]) == 1
    table = (tmp_path / "gpu_check.log").read_text()
    assert "| ours softmax pd0.5 | 32 (65) |" in table  # tiny: 32 px / patch 4 -> 64 patches + CLS


@pytest.mark.slow  # ~17 s: a trainer must be running when the 15 s budget runs out
def test_gpu_check_deadline_bounds_the_script_and_leaves_no_process(tmp_path):
    """GPU_CHECK_BUDGET: a step gets at most what is left of the budget; with under 10 s left the next
    step is skipped and the script fails. The trainer runs in its own session, so `timeout`'s SIGTERM
    reaches only bench/throughput.py: the trainer (and its data-loader workers) end because the script
    kills them, not by themselves."""
    import time

    env = dict(os.environ, PART="trainer", TRAINER_DEVICE="cpu", TRAINER_PRESET="tiny", TRAINER_SIZES="32:8 48:8",
               TRAINER_PRECISION="fp32", TRAINER_WORKERS="1", TRAINER_THREADS="1", TRAINER_TIMEOUT="500",
               GPU_CHECK_BUDGET="15", PYTHON=sys.executable, TMPDIR=str(tmp_path))  # the script's temp dir in here
    started = time.monotonic()
    result = subprocess.run(["bash", "bench/gpu_check.sh", str(tmp_path / "out")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert result.returncode != 0 and elapsed < 35, (elapsed, result.stdout[-3000:])
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert "round 0: ds_linclip.train (ours softmax)" in log  # a trainer was running when the budget ran out
    assert "FAILED: trainer pass at 32 px" in log  # cut at the budget: no trainer finishes 16 steps here
    assert "SKIPPED: 15 s budget spent" in log and "FAILED: trainer pass at 48 px" in log
    time.sleep(1)
    # the trainer's command line names its shards in the script's temp dir, under this test's tmp_path
    leftover = subprocess.run(["pgrep", "-af", str(tmp_path)], capture_output=True, text=True).stdout
    assert not leftover.strip(), leftover
