"""The scaling study: the joint frontier fit (E shared) and its bootstrap against synthetic curves with a known
law, the frontier and the compute multiplier against hand computations, the plan and its budget refusal, and
the --quick form end to end (real trainer, real eval job, real Fashion-MNIST shards)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from ds_linclip.experiments import scaling
from ds_linclip.experiments.fits import (bootstrap_curves, fit_compute_multiplier, compute_to_reach_loss, fit_shared_floor,
                                         lower_envelope, power_law)
from ds_linclip.experiments.runs import RunResult, train_flops_per_step

REPO = Path(__file__).resolve().parents[1]
TRUE_E = 1.8
TRUE = {"softmax": (3.0e3, 0.32), "linear-focused-local3": (6.0e3, 0.36)}  # (A, alpha)


def _law(kind: str, compute, laws=TRUE):
    amplitude, exponent = laws[kind]
    return TRUE_E + amplitude * np.asarray(compute, float) ** -exponent


def _synthetic_runs(kind: str, rng, runs: int = 8, noise: float = 0.004) -> list[list[tuple[float, float]]]:
    """Curves like a size sweep's: each run covers its own stretch of compute (overlapping ones), lies on the law
    with multiplicative noise where it is the best size, and above it (a size past its best) in its last third."""
    curves = []
    for start in np.linspace(10.5, 13.5, runs):
        compute = np.geomspace(10 ** start, 10 ** (start + 0.8), 12)
        past_best = np.clip((np.log10(compute) - start - 0.55) * 0.3, 0, None)
        loss = _law(kind, compute) * (1 + past_best) * np.exp(rng.normal(0, noise, len(compute)))
        curves.append(list(zip(compute.tolist(), loss.tolist())))
    return curves


def test_joint_fit_recovers_a_shared_floor_and_each_exponent():
    rng = np.random.default_rng(0)
    groups = {}
    for kind in TRUE:
        compute = np.geomspace(1e11, 1e14, 25)
        groups[kind] = (compute, _law(kind, compute) * np.exp(rng.normal(0, 0.005, len(compute))))
    fits = fit_shared_floor(groups)
    for kind, (amplitude, exponent) in TRUE.items():
        assert fits[kind]["irreducible"] == pytest.approx(TRUE_E, abs=0.1)
        assert fits[kind]["exponent"] == pytest.approx(exponent, rel=0.1)
        assert fits[kind]["r2"] > 0.99
        # the fitted law itself is what matters in range: within the noise everywhere on the grid
        assert np.allclose(power_law(groups[kind][0], fits[kind]), _law(kind, groups[kind][0]), rtol=0.01)
    assert fits["softmax"]["irreducible"] == fits["linear-focused-local3"]["irreducible"]
    with pytest.raises(ValueError):
        fit_shared_floor({"softmax": ([1e12], [3.0])})


def test_bootstrap_over_runs_brackets_the_true_exponents_and_floor():
    rng = np.random.default_rng(1)
    curves = {kind: _synthetic_runs(kind, rng) for kind in TRUE}
    fits = scaling.joint_fit(curves)
    intervals = bootstrap_curves(lambda drawn: scaling.fit_statistic(drawn, fits), curves, resamples=120, seed=0)
    assert intervals["E"][0] <= TRUE_E <= intervals["E"][1]
    for kind, (_, exponent) in TRUE.items():
        low, high = intervals[f"{kind}.exponent"]
        assert low <= exponent <= high, (kind, low, high)
        assert high - low < 0.3  # an interval, not the whole axis
    low, high = intervals["linear-focused-local3.ratio"]
    assert low <= TRUE["linear-focused-local3"][1] / TRUE["softmax"][1] <= high


def test_frontier_and_compute_to_reach_by_hand():
    points = [(1.0, 5.0), (2.0, 4.0), (2.0, 4.5), (3.0, 4.2), (10.0, 2.0), (100.0, 1.0), (200.0, 1.5)]
    frontier = lower_envelope(points)
    assert frontier == [(1.0, 5.0), (2.0, 4.0), (10.0, 2.0), (100.0, 1.0)]
    # 1.5 lies between (10, 2) and (100, 1): log-log interpolation
    expected = 10 ** (1 + math.log(1.5 / 2) / math.log(1 / 2))
    assert compute_to_reach_loss(frontier, 1.5) == pytest.approx(expected)
    assert compute_to_reach_loss(frontier, 2.0) == pytest.approx(10.0)
    assert compute_to_reach_loss(frontier, 0.5) is None  # never that low
    assert compute_to_reach_loss(frontier, 6.0) is None  # below it from the first point: not bracketed


def test_compute_multiplier_by_hand():
    reference = {"irreducible": 1.0, "coefficient": 10.0, "exponent": 0.5}
    other = {"irreducible": 1.0, "coefficient": 5.0, "exponent": 0.5}
    # reference at C = 100: 1 + 10/10 = 2; other: 1 + 5 C^-0.5 = 2 at C = 25 -> 4x less compute
    assert fit_compute_multiplier(100.0, reference, other) == pytest.approx(4.0)
    assert fit_compute_multiplier(100.0, other, reference) == pytest.approx(0.25)
    assert fit_compute_multiplier(100.0, reference, {**other, "irreducible": 2.5}) is None


def _result(kind: str, width: int, lr: float, seed: int, laws, steps: int = 200) -> RunResult:
    """A RunResult whose logged losses lie on the kind's true law (lr 1e-3 best; others 5% higher)."""
    per_step = 1e9 * width ** 2 / 64
    curve = [(s, float(_law(kind, s * per_step, laws)) * (1.0 if lr == 1e-3 else 1.05)) for s in range(5, steps + 1, 5)]
    return RunResult(name=f"{kind}-w{width}-{lr}-{seed}", kind=kind, image_size=28, width=width, tokens=50, steps=steps,
                     seed=seed, batch_size=128, params=0, attention_flops_per_image=0, image_flops_per_image=0,
                     forward_flops_per_sample=0, train_flops=per_step * steps, final_loss=curve[-1][1],
                     loss_curve=curve, trainer_images_per_s=None, peak_memory_mib=None, top1=0.5, top5=0.9,
                     eval_samples=200, train_seconds=None, reused=True)


def test_analysis_of_runs_on_known_laws(tmp_path):
    """Best lr by final loss, the frontier over every run, the joint fit and both multipliers against the
    closed form (same alpha -> the multiplier is (A_s / A_l)^(1/alpha) at every compute)."""
    args = scaling.build_parser().parse_args(["--widths", "32", "64", "128", "--layers", "2", "2", "3", "--steps", "200",
                                              "--lrs", "1e-3", "2e-3", "--seeds", "2", "--large-widths",
                                              "--kinds", "softmax", "linear-focused-local3"])
    grid = scaling.build_grid(args)
    laws = {"softmax": (3.0e3, 0.3), "linear-focused-local3": (2.0e3, 0.3)}
    done = {spec: _result(spec.kind, spec.width, spec.budget.lr, spec.budget.seed, laws)
            for spec in grid.sweep() + [grid.spec(k, s, 1e-3, 1) for s in grid.sizes for k in grid.kinds]}
    best = scaling.best_learning_rates(grid, done)
    assert set(best.values()) == {1e-3}
    analysis = scaling.analyse(grid, grid.sizes, done, best, resamples=0)
    fit = analysis["fits"]["linear-focused-local3"]
    assert fit["irreducible"] == pytest.approx(TRUE_E, abs=0.02)
    assert fit["exponent"] == pytest.approx(0.3, abs=0.01)
    closed_form = (3.0e3 / 2.0e3) ** (1 / 0.3)
    for where in ("smallest", "largest"):
        multiplier = analysis["multipliers"]["linear-focused-local3"][where]
        assert multiplier["fit"] == pytest.approx(closed_form, rel=0.05)
        if multiplier["frontier"] is not None:
            assert multiplier["frontier"] == pytest.approx(closed_form, rel=0.05)
    assert analysis["multipliers"]["linear-focused-local3"]["largest"]["frontier"] is not None
    assert "shows no measurable difference" not in analysis["verdicts"]["linear-focused-local3"]  # no interval: none claimed
    assert "α ratio 1.00" in analysis["verdicts"]["linear-focused-local3"]

    meta = {"date": "2026-01-01T00:00:00+00:00", "commit": "abc", "jobs": 2, "wall_seconds": 60.0,
            "load_average_end": 1.0, "runs_span_minutes": 1.0,
            "machine": {"cpus": 2, "torch": "x", "torch_threads": 1, "cuda": False, "load_average_1m": 1.0}}
    plan = {"source": "a given rate", "total_cpu_minutes": 1.0, "todo_cpu_minutes": 0.0}
    paths = scaling.write_report(tmp_path, "cmd", grid, done, best, [analysis], meta, [], plan)
    for key in ("loss_png", "accuracy_png"):
        assert paths[key].stat().st_size > 10_000
    report = json.loads(paths["json"].read_text())
    assert report["analyses"][0]["fits"]["softmax"]["exponent"] == pytest.approx(0.3, abs=0.01)
    assert "| linear-focused-local3 | 9 |" in paths["markdown"].read_text()  # runs: 3 sizes x 2 lrs on seed 0 + 3 on seed 1


PLAN_ARGS = ["--widths", "32", "64", "--layers", "2", "2", "--steps", "100", "--lrs", "1e-3", "2e-3", "--seeds", "2",
             "--large-widths", "--kinds", "softmax", "linear-focused-local3", "--rate-gflops", "10",
             "--startup-seconds", "20", "--eval-seconds", "15"]


def test_plan_prints_the_grid_and_its_cost(tmp_path, capsys):
    assert scaling.main(PLAN_ARGS + ["--plan", "--runs-dir", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "| softmax | w32 L2 28px |" in out and "| linear-focused-local3 | w64 L2 28px |" in out
    grid = scaling.build_grid(scaling.build_parser().parse_args(PLAN_ARGS))
    # per (kind, size): 2 lrs (one of them scored) + seed 1 (scored): 3 start-ups, 2 evals, 3 x 100 steps
    expected = sum((3 * 20 + 2 * 15 + 3 * 100 * train_flops_per_step(grid.spec(k, s, 1e-3, 0)) / 10e9) / 60
                   for s in grid.sizes for k in grid.kinds)
    total = float(out.split("grid: ")[1].split(" CPU-minutes")[0])
    assert total == pytest.approx(expected, abs=0.6)
    assert not (tmp_path / "runs").exists()


def test_verdict_says_when_the_fit_and_the_measured_frontier_disagree():
    agree = scaling.verdict("linear-x", 1.0, (0.6, 1.3), {"largest": {"fit": 1.5, "frontier": 2.0}})
    assert "1.50x at the largest size" in agree and "frontier says" not in agree
    disagree = scaling.verdict("linear-x", 0.8, (0.6, 1.3), {"smallest": {"fit": 0.72, "frontier": 0.96},
                                                            "largest": {"fit": 0.43, "frontier": 15.8}})
    assert "1.39x MORE compute at the smallest size, " in disagree  # both below 1: no remark
    assert ("2.33x MORE compute at the largest size (but the measured frontier says 15.80x: the fitted law does not "
            "describe this size)") in disagree


def test_large_lrs_cut_the_sweep_at_the_large_size_only(tmp_path, capsys):
    args = PLAN_ARGS[:PLAN_ARGS.index("--large-widths") + 1] + ["64", "--large-lrs", "2e-3"] \
        + PLAN_ARGS[PLAN_ARGS.index("--large-widths") + 1:]
    grid = scaling.build_grid(scaling.build_parser().parse_args(args))
    large = scaling.Size(64, 2, 56)
    assert grid.lrs_for(large) == (2e-3,) and grid.lrs_for(scaling.Size(64, 2, 28)) == (1e-3, 2e-3)
    sweep = grid.sweep()
    assert {s.budget.lr for s in sweep if s.image_size == 56} == {2e-3}
    assert len(sweep) == 2 * 2 * 2 + 2  # 2 sizes at 28 px x 2 kinds x 2 lrs, + 1 size at 56 px x 2 kinds x 1 lr
    # the best lr at 56 px is the one swept there, whatever the 28 px sweep found
    done = {s: SimpleNamespace(final_loss=3.0 if s.budget.lr == 1e-3 else 3.5) for s in sweep}
    best = scaling.best_learning_rates(grid, done)
    assert best[("softmax", large)] == 2e-3 and best[("softmax", scaling.Size(64, 2, 28))] == 1e-3
    assert scaling.main(args + ["--plan", "--runs-dir", str(tmp_path / "runs")]) == 0
    assert "| softmax | w64 L2 56px | 2 | 3.387 | 100 | 2 |" in capsys.readouterr().out  # 1 lr + seed 1


def test_a_grid_above_the_budget_is_refused_before_anything_runs(tmp_path, capsys):
    code = scaling.main(PLAN_ARGS + ["--max-cpu-minutes", "1", "--runs-dir", str(tmp_path / "runs"),
                                     "--data", str(tmp_path / "data")])
    assert code == 1
    assert "above --max-cpu-minutes 1" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()


@pytest.mark.parametrize("args, message", [
    (["--widths", "32", "64", "--layers", "2"], "--layers gives 1 values for 2 --widths"),
    (["--steps", "10", "20"], "--steps gives 2 values"),
    (["--kinds", "linear-affine"], "--kinds must include softmax"),
    (["--large-widths", "40"], "--large-widths [40] are not in --widths"),
    (["--lrs", "1e-3", "2e-3", "--large-widths", "32", "--large-lrs", "5e-4"], "--large-lrs [0.0005] are not in --lrs"),
])
def test_options_that_do_not_fit_together_are_refused(args, message, capsys):
    assert scaling.main(args + ["--plan", "--rate-gflops", "10"]) == 1
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_quick_scaling_end_to_end(tmp_path, fmnist_shards):
    """--quick: 2 widths x 2 kinds x 2 lrs on seed 0, seed 1 at the best lr, through the real trainer and eval job;
    then --no-train reuses every run and writes the same numbers."""
    env = dict(os.environ, PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    common = ["--quick", "--data", str(fmnist_shards), "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "out"),
              "--no-progress"]
    done = subprocess.run([sys.executable, "-m", "ds_linclip.experiments.scaling", *common], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "scaling.json").read_text())
    assert len(report["runs"]) == 12 and not report["missing"]
    assert {b["kind"] for b in report["best_lr"]} == {"softmax", "linear-focused-local3"}
    for run in report["runs"]:
        run_dir = tmp_path / "runs" / run["name"]
        assert (run_dir / "DONE").is_file() and len(run["loss_curve"]) == 6  # log_every 1 over 6 steps
        best = next(b["lr"] for b in report["best_lr"] if (b["kind"], b["width"]) == (run["kind"], run["width"]))
        scored = run["seed"] == 1 or f"lr{best:g}-" in run["name"]
        assert (run["top1"] is not None) == scored, run["name"]
        if scored:
            record = json.loads((run_dir / "eval" / "final_zeroshot.json").read_text())
            assert record["metrics"]["top1"] == run["top1"] and record["num_samples"] == 200
    assert sum(1 for run in report["runs"] if run["seed"] == 1) == 4
    analysis = report["analyses"][0]
    assert analysis["image_size"] == 12 and set(analysis["runs"]) == {"softmax", "linear-focused-local3"}
    md = (tmp_path / "out" / "scaling.md").read_text()
    assert "| attention | size |" in md and "How it was measured" in md and "load average" in md
    for png in ("scaling_loss_vs_compute.png", "scaling_accuracy_vs_compute.png"):
        assert (tmp_path / "out" / png).stat().st_size > 10_000

    again = subprocess.run([sys.executable, "-m", "ds_linclip.experiments.scaling", *common, "--no-train"], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    # 8 sweep runs, then the 8 at the best lr (4 of them the sweep's best, read again with their scores)
    assert ": training " not in again.stdout and again.stdout.count("reusing the finished run") == 16
    rerun = json.loads((tmp_path / "out" / "scaling.json").read_text())
    assert [r["final_loss"] for r in rerun["runs"]] == [r["final_loss"] for r in report["runs"]]
