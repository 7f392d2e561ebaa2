"""The experiments' shared pieces: run names and overrides, reuse of a finished run folder (config,
DONE, eval JSON and TensorBoard events as the trainer and the eval job write them), loss curves read
from a real event file, reports that parse back, fits and the alternating timer."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from ds_linclip.config import load_config, to_yaml
from ds_linclip.experiments.fits import bootstrap, fit_power_law, lower_envelope, power_law
from ds_linclip.experiments.launcher import Launcher, run_specs
from ds_linclip.experiments.report import (aggregate, machine_sentence, markdown_table, parse_markdown_table, run_meta,
                                           write_json)
from ds_linclip.experiments.runs import (Budget, ExperimentError, MissingRun, RunSpec, overrides_label, read_curve,
                                         read_scalars, run_one, same_config, window_mean_loss)
from ds_linclip.experiments.timing import time_alternating

BUDGET = Budget(steps=40, batch_size=8, width=32, layers=1, eval_samples=200, eval_templates="simple")


def write_events(tensorboard_dir, series: dict[str, list[tuple[int, float]]]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tensorboard_dir))
    for tag, points in series.items():
        for step, value in points:
            writer.add_scalar(tag, value, step)
    writer.close()


def finished_run(runs_dir, data_dir, spec: RunSpec, top1: float = 0.5, loss_curve=None):
    """A run folder as the trainer (config.yaml, tensorboard/, DONE) and the eval job (eval/*.json) leave it."""
    run_dir = runs_dir / spec.name
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(to_yaml(load_config([], spec.train_overrides(data_dir, runs_dir))))
    write_events(run_dir / "tensorboard", {"train/loss": loss_curve or [(s, 5.0 - s / 10) for s in range(1, 41)],
                                           "perf/images_per_s": [(s, 100.0 + s) for s in range(1, 41, 10)]})
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "final_zeroshot.json").write_text(json.dumps(
        {"task": "zeroshot", "num_samples": 200, "templates": "simple", "metrics": {"top1": top1, "top5": 0.9}}))
    (run_dir / "DONE").write_text("")
    return run_dir


def test_run_names_stay_and_overrides_win(tmp_path):
    plain = RunSpec("linear-affine", 28, 64, Budget(steps=150, seed=2))
    assert plain.name == "linear-affine-28px-w64-150steps-seed2"  # the folders of earlier runs
    extra = ("model.image.layers=2", "train.lr=0.001", "train.warmup_steps=7")
    labelled = RunSpec("linear-affine", 28, 64, Budget(steps=150, seed=2), extra, label="lr1e-3")
    assert labelled.name == "linear-affine-28px-w64-lr1e-3-150steps-seed2"
    hashed = RunSpec("linear-affine", 28, 64, Budget(steps=150, seed=2), extra)
    assert hashed.name == f"linear-affine-28px-w64-{overrides_label(extra)}-150steps-seed2"
    assert hashed.name != RunSpec("linear-affine", 28, 64, Budget(steps=150, seed=2), extra[:2]).name
    assert labelled.with_seed(0).name.endswith("-150steps-seed0") and labelled.with_steps(9).budget.steps == 9
    # the spec's overrides come last, so they win over the budget's lr/warm-up and the spec's layers
    cfg = load_config([], labelled.train_overrides(tmp_path / "data", tmp_path / "runs"))
    assert (cfg.train.lr, cfg.train.warmup_steps, cfg.model.image.layers, cfg.model.text.layers) == (0.001, 7, 2, 4)
    assert "model.image.layers=2" in labelled.model_overrides()
    assert not any(o.startswith("train.") for o in labelled.model_overrides())


def test_a_finished_run_is_reused_only_with_the_same_config(tmp_path):
    runs, data = tmp_path / "runs", tmp_path / "data"
    spec = RunSpec("linear-affine", 12, 32, BUDGET)
    run_dir = finished_run(runs, data, spec, top1=0.625)
    launcher = Launcher("subprocess", runs, data)
    assert same_config(run_dir, spec.train_overrides(data, runs))
    other_lr = RunSpec("linear-affine", 12, 32, replace(BUDGET, lr=0.01))  # same folder name, another config
    assert other_lr.name == spec.name
    assert not same_config(run_dir, other_lr.train_overrides(data, runs))

    # nothing trained or scored: the numbers come from the folder
    result = run_one(spec, launcher, train=False)
    assert result.reused and result.train_seconds is None
    assert result.top1 == 0.625 and result.eval_samples == 200
    assert result.loss_curve[0] == (1, pytest.approx(4.9)) and len(result.loss_curve) == 40
    assert result.final_loss == pytest.approx(sum(5.0 - s / 10 for s in (37, 38, 39, 40)) / 4)  # last 10% of 40
    assert result.loss_at(20, window=1) == pytest.approx(3.0)
    assert result.trainer_images_per_s == pytest.approx(121.0)  # median of 111, 121, 131 (first window left out)
    assert result.loss_vs_compute()[1] == (pytest.approx(2 * result.flops_per_step), pytest.approx(4.8))
    assert result.train_flops == pytest.approx(40 * result.flops_per_step)

    (run_dir / "config.yaml").write_text(to_yaml(load_config([], other_lr.train_overrides(data, runs))))
    assert not same_config(run_dir, spec.train_overrides(data, runs))
    with pytest.raises(MissingRun, match="no finished run with this config"):
        run_one(spec, launcher, train=False)
    assert run_one(spec, Launcher("subprocess", runs, data, reuse_any_finished=True), train=False).reused
    (run_dir / "DONE").unlink()
    assert not same_config(run_dir, other_lr.train_overrides(data, runs))  # unfinished: never reused
    (run_dir / "config.yaml").write_text("model: [not, a, mapping")
    assert not same_config(run_dir, other_lr.train_overrides(data, runs))


def test_run_specs_without_training_fills_only_finished_runs(tmp_path):
    runs, data = tmp_path / "runs", tmp_path / "data"
    specs = [RunSpec("softmax", 12, 32, BUDGET).with_seed(seed) for seed in (0, 1, 2)]
    finished_run(runs, data, specs[1], top1=0.25)
    done = {}
    failures = run_specs(specs, Launcher("subprocess", runs, data), done, jobs=2, train=False)
    assert failures == [] and list(done) == [specs[1]] and done[specs[1]].top1 == 0.25
    (row,) = aggregate(specs, done)
    assert row.seeds_cell() == "1 (1 of 3)" and row.stat("top1").cell(".1f", 100) == "25.0 (1)"


def test_curves_read_from_a_real_event_file(tmp_path):
    loss = [(step, 4.0 / step) for step in range(5, 101, 5)]
    write_events(tmp_path / "run" / "tensorboard", {"train/loss": loss, "linearize/transfer_loss": [(1, 0.5), (2, 0.25)]})
    scalars = read_scalars(tmp_path / "run" / "tensorboard")
    assert set(scalars) == {"train/loss", "linearize/transfer_loss"}
    curve = read_curve(tmp_path / "run")
    assert [s for s, _ in curve] == list(range(5, 101, 5))
    assert [v for _, v in curve] == pytest.approx([v for _, v in loss], rel=1e-6)  # stored as float32
    assert window_mean_loss(curve, 100) == pytest.approx((4 / 95 + 4 / 100) / 2, rel=1e-6)  # the last 10%: 91..100
    assert window_mean_loss(curve, 50, window=10) == pytest.approx((4 / 45 + 4 / 50) / 2, rel=1e-6)
    assert window_mean_loss(curve, 52, window=1) == pytest.approx(4 / 50, rel=1e-6)  # nothing at 52: the last before
    with pytest.raises(ExperimentError):
        window_mean_loss(curve, 3)
    with pytest.raises(ExperimentError, match="no nothing/here scalars"):
        read_curve(tmp_path / "run", "nothing/here")
    with pytest.raises(ExperimentError, match="no TensorBoard folder"):
        read_scalars(tmp_path / "absent")


def test_report_round_trip(tmp_path):
    runs, data = tmp_path / "runs", tmp_path / "data"
    specs = [RunSpec("linear-affine", 12, 32, BUDGET).with_seed(seed) for seed in (0, 1)]
    for spec, top1 in zip(specs, (0.5, 0.7)):
        finished_run(runs, data, spec, top1=top1)
    done = {spec: run_one(spec, Launcher("subprocess", runs, data), train=False) for spec in specs}
    (row,) = aggregate(specs, done)
    header = ["kind", "seeds", "zero-shot top-1 %"]
    text = markdown_table(header, [[row.kind, row.seeds_cell(), row.stat("top1").cell(".2f", 100)]])
    assert parse_markdown_table(f"# title\n\n{text}\n") == [
        {"kind": "linear-affine", "seeds": "0,1", "zero-shot top-1 %": f"60.00 ± {100 * math.sqrt(0.02):.2f} (2)"}]
    meta = run_meta()
    payload = {"command": "python -m study", **meta, "rows": [row.summary()]}
    path = write_json(tmp_path / "out" / "study.json", payload)
    again = json.loads(path.read_text())
    assert again == json.loads(json.dumps(payload))
    assert again["rows"][0]["top1"] == {"mean": pytest.approx(0.6), "std": pytest.approx(math.sqrt(0.02)), "n": 2}
    assert "1-min load average" in machine_sentence(meta) and meta["machine"]["cpus"] >= 1


def test_power_law_bootstrap_and_frontier():
    compute = [1e12, 2e12, 4e12, 8e12, 16e12, 32e12]
    exact = [3.0 * c ** -0.05 for c in compute]
    fit = fit_power_law(compute, exact)
    assert power_law(4e12, fit) == pytest.approx(exact[2])
    assert power_law(4e12, {**fit, "irreducible": 1.0}) == pytest.approx(1.0 + exact[2])
    low, high = bootstrap(fit_power_law, compute, exact, resamples=50)["exponent"]
    assert low == pytest.approx(0.05) and high == pytest.approx(0.05)  # every resample lies on the same line
    noisy = [v * f for v, f in zip(exact, (1.02, 0.98, 1.01, 0.99, 1.02, 0.98))]
    intervals = bootstrap(fit_power_law, compute, noisy, resamples=300, seed=1)
    assert set(intervals) == {"exponent", "coefficient"}  # the pure power law has no irreducible term
    low, high = intervals["exponent"]
    assert low < fit_power_law(compute, noisy)["exponent"] < high and high - low < 0.05
    points = [(1.0, 5.0), (2.0, 4.0), (2.0, 3.5), (3.0, 3.8), (4.0, 3.0), (5.0, 3.2)]
    assert lower_envelope(points) == [(1.0, 5.0), (2.0, 3.5), (4.0, 3.0)]


def test_time_alternating_rotates_the_order():
    calls: list[str] = []
    seconds = time_alternating({name: (lambda name=name: calls.append(name)) for name in "abc"}, rounds=4)
    assert calls == list("abc" "bca" "cab" "abc")
    assert {name: len(values) for name, values in seconds.items()} == {"a": 4, "b": 4, "c": 4}
    assert all(v >= 0 for values in seconds.values() for v in values)
