"""The CLIP-vs-SigLIP study: its grid reuses the comparison's runs for the clip loss, and its --quick
form runs end to end through the real trainer and eval job."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ds_linclip.experiments import losses
from ds_linclip.experiments.runs import Budget, RunSpec


def test_clip_runs_are_the_comparisons_and_siglip_runs_are_labelled():
    budget = Budget(steps=600, batch_size=128, width=64, layers=2)
    clip = losses.loss_spec("linear-focused-local3", "clip", 56, budget)
    assert clip == RunSpec("linear-focused-local3", 56, 64, budget)  # same folder as compare's run
    siglip = losses.loss_spec("linear-focused-local3", "siglip", 56, budget)
    assert "train.loss=siglip" in siglip.train_overrides(Path("/data"), Path("/runs"))
    assert siglip.name != clip.name and "siglip" in siglip.name


@pytest.mark.slow
def test_quick_losses_study_end_to_end(tmp_path, fmnist_shards):
    out = tmp_path / "out"
    code = losses.main(["--quick", "--data", str(fmnist_shards), "--runs-dir", str(tmp_path / "runs"),
                        "--out", str(out), "--jobs", "1"])
    assert code == 0
    report = json.loads((out / "losses.json").read_text())
    rows = {row["loss"]: row for row in report["rows"]}
    assert set(rows) == {"clip", "siglip"}
    for row in rows.values():
        assert row["top1"]["n"] == 1 and 0.0 <= row["top1"]["mean"] <= 1.0
    # the siglip run trained with a bias, the clip run without
    siglip_run = next((tmp_path / "runs").glob("*siglip*"))
    assert "loss: siglip" in (siglip_run / "config.yaml").read_text()
    assert "| linear-focused-local3 | siglip |" in (out / "losses.md").read_text()
    # the load average at the start and at the end, both measured
    assert re.search(r"load average [0-9.]+ at start, [0-9.]+ at the end", (out / "losses.md").read_text())
    assert isinstance(report["load_average_end"], float)
