"""The frontier study: FLOP budgets -> steps (plain, patch dropout, phases) against FLOPs worked out by
hand from the formulas in ds_linclip.models.flops; the Pareto frontier and the compute multiplier on
synthetic points; and the --quick grid end to end through the real trainer and eval job."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ds_linclip.experiments.frontier import (Config, Phase, compute_ratio_at_accuracy, compute_to_reach_accuracy, pareto_frontier,
                                             steps_for_flops, train_flops)
from ds_linclip.experiments.runs import Budget, read_curve

REPO = Path(__file__).resolve().parents[1]
WIDTH, LAYERS, BATCH, PATCH, CONTEXT = 32, 1, 8, 4, 16
MLP = 4 * WIDTH


def _blocks(tokens: int) -> int:
    """qkv + out projections + MLP of one pre-LN block (flops.py: 8·N·w² + 4·N·w·mlp), per layer."""
    return LAYERS * (2 * tokens * WIDTH * 3 * WIDTH + 2 * tokens * WIDTH * WIDTH + 2 * 2 * tokens * WIDTH * MLP)


def _softmax_step_flops(image_size: int, kept_patches: int | None = None) -> int:
    """Training FLOPs of one softmax step by hand: 3 x (image + caption forward) x batch."""
    grid = (image_size // PATCH) ** 2
    tokens = 1 + (grid if kept_patches is None else kept_patches)
    image = (2 * grid * 3 * PATCH * PATCH * WIDTH  # patch embedding: every patch, dropped or not
             + _blocks(tokens) + LAYERS * 4 * tokens * tokens * WIDTH + 2 * WIDTH * WIDTH)
    text = _blocks(CONTEXT) + LAYERS * 4 * CONTEXT * CONTEXT * WIDTH + 2 * WIDTH * WIDTH
    return 3 * (image + text) * BATCH


def _spec(config: Config):
    return config.spec(24, WIDTH, Budget(steps=10, batch_size=BATCH, layers=LAYERS, width=WIDTH, patch_size=PATCH,
                                         context_length=CONTEXT))


def test_plain_config_budget_to_steps():
    spec = _spec(Config("softmax", "softmax"))
    per_step = _softmax_step_flops(24)
    assert train_flops(spec.with_steps(50)) == 50 * per_step
    assert steps_for_flops(spec, 50 * per_step) == 50
    assert steps_for_flops(spec, 50.4 * per_step) == 50 and steps_for_flops(spec, 50.6 * per_step) == 51


def test_patch_dropout_config_counts_the_kept_tokens():
    spec = _spec(Config("softmax-pd0.5", "softmax", patch_dropout=0.5))
    per_step = _softmax_step_flops(24, kept_patches=18)  # 36 patches, int(36 * 0.5) kept
    assert train_flops(spec.with_steps(70)) == 70 * per_step
    # the plain run's 50-step budget buys this many dropout steps
    budget = 50 * _softmax_step_flops(24)
    assert steps_for_flops(spec, budget) == round(budget / per_step)
    assert round(budget / per_step) == 77  # 1950259200 / 25291776 FLOPs


def test_phased_config_counts_each_phase():
    config = Config("softmax-lowres0.8", "softmax", phases=(Phase(0.8, image_size=12), Phase(0.2)))
    spec = _spec(config)
    low, full = _softmax_step_flops(12), _softmax_step_flops(24)
    # 50 steps: the trainer's boundary floor(0.8 * 50 + 0.5) = 40 -> 40 steps at 12 px, 10 at 24 px
    assert train_flops(spec.with_steps(50)) == 40 * low + 10 * full
    assert steps_for_flops(spec, 40 * low + 10 * full) == 50
    assert steps_for_flops(spec, 40 * low + 10 * full + 0.3 * low) == 50
    # 7 steps: floor(5.6 + 0.5) = 6 at 12 px, 1 at 24 px
    assert train_flops(spec.with_steps(7)) == 6 * low + 1 * full
    assert config.overrides() == ("train.phases=[{fraction: 0.8, image_size: 12}, {fraction: 0.2}]",)


def test_pareto_frontier_on_synthetic_points():
    points = [(1, 50), (2, 48), (2, 55), (4, 60), (3, 58), (8, 59), (8, 61)]
    assert pareto_frontier(points) == [(1, 50), (2, 55), (3, 58), (4, 60), (8, 61)]
    assert pareto_frontier([(5, 10)]) == [(5, 10)]


def test_compute_multiplier_interpolates_in_log_compute():
    linear = [(1.0, 50.0), (2.0, 60.0), (4.0, 70.0)]
    softmax = [(4.0, 60.0), (1.0, 40.0), (2.0, 50.0)]  # any order
    assert compute_to_reach_accuracy(linear, 60) == 2.0 and compute_to_reach_accuracy(softmax, 60) == 4.0
    assert compute_ratio_at_accuracy(linear, softmax, 60) == 0.5
    # halfway in accuracy = the geometric mean of the budgets
    assert math.isclose(compute_to_reach_accuracy(linear, 55), math.sqrt(2))
    assert math.isclose(compute_to_reach_accuracy(softmax, 55), 2 * math.sqrt(2))
    assert math.isclose(compute_ratio_at_accuracy(linear, softmax, 55), 0.5)
    assert math.isclose(compute_to_reach_accuracy(softmax, 42.5), 2 ** 0.25)
    assert compute_to_reach_accuracy(softmax, 65) is None and compute_ratio_at_accuracy(linear, softmax, 65) is None
    assert compute_to_reach_accuracy(linear, 45) is None  # already past it at the smallest budget: the crossing is unmeasured


@pytest.mark.slow
def test_quick_study_end_to_end(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    args = [sys.executable, "-m", "ds_linclip.experiments.frontier", "--quick", "--data", str(tmp_path / "data"),
            "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--no-progress"]
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "frontier.json").read_text())
    assert (tmp_path / "out" / "frontier.png").stat().st_size > 10_000
    markdown = (tmp_path / "out" / "frontier.md").read_text()
    assert "Best configuration at each budget" in markdown and "Compute multiplier" in markdown

    probe = report["probe"]
    assert (probe["low"]["tokens"], probe["full"]["tokens"]) == (10, 37) and probe["low"]["n"] == 1
    points = report["points"]
    assert sorted((p["config"], p["budget_index"]) for p in points) == sorted(
        (name, index) for name in ("softmax", "softmax-pd0.5", "linear-focused-local3", "linear-lowres0.8")
        for index in (0, 1))
    runs = tmp_path / "runs"
    # the probe's full-size run is the frontier's softmax point at the first budget (4 steps): 9 runs in all
    assert len([d for d in runs.iterdir() if (d / "DONE").is_file()]) == 9
    for p in points:
        assert abs(p["flops"] - report["budgets_flops"][p["budget_index"]]) < p["flops"] / p["steps"]
        kind = {"softmax-pd0.5": "softmax", "linear-lowres0.8": "linear-focused-local3"}.get(p["config"], p["config"])
        label = "" if p["config"] == kind else p["config"] + "-"  # a plain configuration keeps the plain folder
        assert p["runs"] == [f"{kind}-24px-w32-{label}{p['steps']}steps-seed0"]  # --seeds 1: seed 0
        run = runs / p["runs"][0]
        record = json.loads((run / "eval" / "final_zeroshot.json").read_text())
        assert math.isclose(p["top1"], 100 * record["metrics"]["top1"]) and record["num_samples"] == 200
        if p["config"] == "linear-lowres0.8":  # the trainer really ran both phases
            assert {v for _, v in read_curve(run, "train/image_size")} == {12.0, 24.0}
        if p["config"] == "softmax-pd0.5":
            assert {v for _, v in read_curve(run, "train/patch_dropout")} == {0.5}
    assert report["multiplier"]["best_softmax"] in ("softmax", "softmax-pd0.5")

    again = subprocess.run(args + ["--no-train"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "out" / "frontier.json").read_text())["points"] == points


def test_plan_prints_every_run_with_its_flops_before_any_run(tmp_path, capsys):
    from ds_linclip.experiments.frontier import main

    runs = tmp_path / "runs"
    assert main(["--plan", "--budget-steps", "300", "--runs-dir", str(runs), "--data", str(tmp_path / "none")]) == 0
    table = capsys.readouterr().out
    assert not runs.exists() and not (tmp_path / "none").exists()  # nothing trained, no data written
    rows = {line.split("|")[2].strip(): line for line in table.splitlines() if line.startswith("| frontier")}
    assert set(rows) == {"softmax", "softmax-pd0.5", "linear-focused-local3", "linear-pd0.5", "softmax-lowres0.8",
                         "linear-lowres0.8"}
    assert "(3 from the probe)" in rows["softmax"]  # the probe's full-size runs are the softmax points
    assert "| 622 x 50 + 155 x 197 |" in rows["softmax-lowres0.8"] and "| 653 x 99 |" in rows["softmax-pd0.5"]
    assert "estimated total" in table


def test_configs_take_any_attention_name_and_refuse_others_by_name(tmp_path, capsys):
    """--configs linear-pola: a plain configuration of that attention, at the budget's FLOPs (pola's steps
    differ from linear-focused-local3's, since its token mixing costs more); a name that is neither refused."""
    from ds_linclip.experiments.frontier import main

    args = ["--plan", "--part", "frontier", "--budget-steps", "300", "--runs-dir", str(tmp_path / "runs"),
            "--data", str(tmp_path / "none")]
    assert main([*args, "--configs", "linear-pola", "linear-focused-local3"]) == 0
    rows = {line.split("|")[2].strip(): line.split("|") for line in capsys.readouterr().out.splitlines()
            if line.startswith("| frontier")}
    assert set(rows) == {"linear-pola", "linear-focused-local3"}
    pola_steps, local_steps = (int(rows[n][4].split(" x ")[0]) for n in ("linear-pola", "linear-focused-local3"))
    assert pola_steps < local_steps and local_steps == 402
    assert float(rows["linear-pola"][5]) == pytest.approx(7.269, rel=0.01)  # the same budget
    assert main([*args, "--configs", "linear-nope"]) == 2
    assert "--configs linear-nope: neither a configuration" in capsys.readouterr().err
