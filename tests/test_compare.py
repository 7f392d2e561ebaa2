"""The comparison experiment: the --quick form end to end (real trainer, real eval job, real shards),
checked against what the runs themselves wrote (TensorBoard events via EventAccumulator, the eval
job's JSON, ds_linclip.models.flops); plus unit tests of its measuring and fitting helpers."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ds_linclip.config import load_config
from ds_linclip.experiments.compare import QUICK, TABLE_COLUMNS, pick_best, table_rows, target_checks
from ds_linclip.experiments.fits import fit_power_law
from ds_linclip.experiments.report import aggregate, markdown_table, mean_std, parse_markdown_table
from ds_linclip.experiments.runs import Budget, ExperimentError, RunResult, RunSpec, parse_seeds, tail_mean_loss
from ds_linclip.experiments.timing import saved_activation_bytes
from ds_linclip.experiments.variants import VariantError, parse_variant
from ds_linclip.models import build_model
from ds_linclip.models.attention import resolve_attention

REPO = Path(__file__).resolve().parents[1]


def _run_compare(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu")
    return subprocess.run([sys.executable, "-m", "ds_linclip.experiments.compare", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _last_loss(run_dir: Path) -> float:
    """--quick: 4 steps, so 'the last 10% of the steps' is the last step's logged loss."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    events = acc.Scalars("train/loss")
    assert events[-1].step == QUICK["steps"]
    return events[-1].value


def _assert_png(path: Path, min_size=(400, 300)) -> None:
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= min_size[0] and image.height >= min_size[1]
        grey = image.convert("L")
        low, high = grey.getextrema()
        assert high - low > 100, f"{path} looks blank"


# softmax and the paper's kernel (the recommended variant goes end to end in the quick scaling,
# losses and frontier studies; pick_best among several linear kinds has its own test)
QUICK_KINDS = ["softmax", "linear-affine-kernel"]
LONG_STEPS = 6


@pytest.mark.slow
def test_quick_comparison_end_to_end(tmp_path, fmnist_shards):
    """Two seeds per variant and size, plus the long rows (softmax and the best) at the first size."""
    out, runs = tmp_path / "out", tmp_path / "runs"
    done = _run_compare(["--quick", "--kinds", *QUICK_KINDS, "--seeds", "2", "--long-steps", str(LONG_STEPS),
                         "--long-kinds", "softmax", "best",
                         "--data", str(fmnist_shards), "--runs-dir", str(runs), "--out", str(out), "--no-progress"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    rows = parse_markdown_table((out / "compare.md").read_text())
    assert list(rows[0]) == TABLE_COLUMNS
    sizes, steps, long_steps = QUICK["image_sizes"], QUICK["steps"], LONG_STEPS
    payload = json.loads((out / "compare.json").read_text())
    best = payload["best"]
    assert best in QUICK_KINDS[1:]
    assert [(r["kind"], int(r["image px"]), int(r["steps"])) for r in rows] == [
        (k, s, steps) for s in sizes for k in QUICK_KINDS] + [(k, max(sizes), long_steps) for k in ("softmax", best)]

    from ds_linclip.models.flops import attention_flops_per_image

    by_name = {r["name"]: r for r in payload["runs"]}
    for row in rows:
        assert row["seeds"] == "0,1"
        top1, top5, losses = [], [], []
        for seed in (0, 1):
            run_dir = runs / f"{row['kind']}-{row['image px']}px-w{QUICK['width']}-{row['steps']}steps-seed{seed}"
            # numbers the run itself wrote: the eval job's JSON, the trainer's TensorBoard loss, its resolved config
            record = json.loads((run_dir / "eval" / "final_zeroshot.json").read_text())
            assert record["num_samples"] == QUICK["eval_samples"]
            top1.append(100 * record["metrics"]["top1"])
            top5.append(100 * record["metrics"]["top5"])
            losses.append(by_name[run_dir.name]["final_loss"])
            if int(row["steps"]) == steps:
                assert losses[-1] == pytest.approx(_last_loss(run_dir), abs=1e-6)
            cfg = load_config([run_dir / "config.yaml"])
            assert cfg.train.seed == seed and cfg.train.steps == int(row["steps"])
            variant = parse_variant(row["kind"])
            assert resolve_attention(cfg.model.image) == variant.image
            assert resolve_attention(cfg.model.text, causal=True) == variant.text
            assert float(row["attn MFLOPs/image"]) == pytest.approx(attention_flops_per_image(cfg.model) / 1e6, abs=0.006)
        assert row["zero-shot top-1 %"] == f"{statistics.fmean(top1):.2f} ± {statistics.stdev(top1):.2f} (2)"
        assert row["top-5 %"] == f"{statistics.fmean(top5):.2f} ± {statistics.stdev(top5):.2f} (2)"
        assert row["final loss"] == f"{statistics.fmean(losses):.4f} ± {statistics.stdev(losses):.4f} (2)"
        assert int(row["tokens"]) == (int(row["image px"]) // 4) ** 2 + 1
        for column in ("img/s interleaved", "img/s trainer", "activation MiB"):
            assert float(row[column]) > 0, (column, row)
        assert row["peak RSS MiB"] == "-"  # in-process runs share one process: no per-run peak

    assert payload["timing"]["info"]["rounds"] == QUICK["timing_rounds"]
    assert len(payload["runs"]) == 2 * (len(QUICK_KINDS) * len(sizes) + 2)
    for run in payload["runs"]:
        assert [s for s, _ in run["loss_curve"]] == list(range(1, run["steps"] + 1))
    assert set(payload["timing"]["per_run"]) == {f"{k}-{s}px-w{QUICK['width']}" for k in QUICK_KINDS for s in sizes}
    sweep = payload["sweep"]
    assert {(p["kind"], p["image_size"]) for p in sweep["points"]} == {
        (k, s) for k in QUICK_KINDS for s in QUICK["sweep_sizes"]}
    sweep_rows = parse_markdown_table((out / "compare.md").read_text().split("timing sweep over token counts")[1])
    assert [r["kind"] for r in sweep_rows] == QUICK_KINDS
    assert any(t["target"].startswith("zero-shot top-1") for t in payload["targets"])
    for name in ("compare_loss.png", "compare_accuracy_vs_compute.png", "compare_throughput.png", "compare_sweep.png"):
        _assert_png(out / name)

    # a third seed asked for but not trained (--no-train): the rows say 2 of 3
    again = _run_compare(["--quick", "--kinds", *QUICK_KINDS, "--seeds", "3", "--no-train",
                          "--timing-from", str(out / "compare.json"), "--data", str(fmnist_shards), "--runs-dir", str(runs), "--out", str(out), "--no-progress"])
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert ": training " not in again.stdout
    rows_again = parse_markdown_table((out / "compare.md").read_text())
    assert {r["seeds"] for r in rows_again} == {"0,1 (2 of 3)"}
    base = len(QUICK_KINDS) * len(sizes)  # the rows at the base step count
    assert [r["zero-shot top-1 %"] for r in rows_again[:base]] == [r["zero-shot top-1 %"] for r in rows[:base]]
    # the timing pass and the sweep were taken from the first report, not measured again
    assert [r["img/s interleaved"] for r in rows_again[:base]] == [r["img/s interleaved"] for r in rows[:base]]
    assert json.loads((out / "compare.json").read_text())["sweep"] == sweep


@pytest.mark.slow
def test_subprocess_launcher_peak_memory_and_reuse(tmp_path, fmnist_shards):
    """The default launcher: `python -m ds_linclip.train` / `python -m ds_linclip.eval` subprocesses."""
    out, runs = tmp_path / "out", tmp_path / "runs"
    done = _run_compare(["--quick", "--launcher", "subprocess", "--kinds", "linear-affine", "--image-sizes", "12",
                         "--timing-rounds", "1", "--data", str(fmnist_shards), "--runs-dir", str(runs),
                         "--out", str(out), "--no-progress"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (row,) = parse_markdown_table((out / "compare.md").read_text())
    run_dir = runs / f"linear-affine-12px-w32-{QUICK['steps']}steps-seed0"
    assert "python -m ds_linclip.train" in (run_dir / "train.log").read_text().splitlines()[0].replace(sys.executable, "python")
    peak = float(row["peak RSS MiB"])
    assert 100 < peak < 64 * 1024  # a real process RSS in MiB
    assert (run_dir / "DONE").is_file() and (run_dir / "final" / "model.safetensors").is_file()

    # a second invocation reuses the finished, scored run instead of training/scoring it again
    again = _run_compare(["--quick", "--launcher", "subprocess", "--kinds", "linear-affine", "--image-sizes", "12",
                          "--timing-rounds", "0", "--data", str(fmnist_shards), "--runs-dir", str(runs),
                          "--out", str(out), "--no-progress"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reusing the finished run" in again.stdout
    assert ": training " not in again.stdout and ": zero-shot eval" not in again.stdout
    (row_again,) = parse_markdown_table((out / "compare.md").read_text())
    assert row_again["seeds"] == "0"
    assert row_again["zero-shot top-1 %"] == row["zero-shot top-1 %"] and row_again["img/s interleaved"] == "-"


def test_scale_fit_recovers_a_power_law():
    compute = [1e12, 3e12, 1e13, 4e13]
    loss = [5.0 * c ** -0.07 for c in compute]
    fit = fit_power_law(compute, loss)
    assert fit["exponent"] == pytest.approx(0.07, rel=1e-9)
    assert fit["coefficient"] == pytest.approx(5.0, rel=1e-6)
    assert fit["r2"] == pytest.approx(1.0)
    noisy = fit_power_law(compute, [l * f for l, f in zip(loss, (1.01, 0.99, 1.02, 0.98))])
    assert noisy["r2"] < 1.0 and 0 < noisy["exponent"] < 0.2


def test_final_loss_is_the_mean_over_the_last_tenth_of_the_steps():
    curve = [(step, float(step)) for step in range(5, 201, 5)]  # logged every 5 steps
    assert tail_mean_loss(curve, 200) == pytest.approx((185 + 190 + 195 + 200) / 4)  # steps 181..200
    assert tail_mean_loss([(1, 3.0), (2, 2.0)], 2) == 2.0
    assert tail_mean_loss([(10, 4.0)], 30) == 4.0  # nothing logged in the tail: the last window


def test_markdown_table_round_trip():
    header = ["kind", "image px", "top-1 %"]
    rows = [["softmax", "28", "71.20"], ["linear-affine", "56", "-"]]
    text = "# title\n\n" + markdown_table(header, rows) + "\n\nafter\n"
    assert parse_markdown_table(text) == [dict(zip(header, r)) for r in rows]
    with pytest.raises(ValueError, match="no markdown table"):
        parse_markdown_table("no table here")


def test_saved_activation_bytes_counts_saved_tensors_not_parameters():
    weight = torch.nn.Parameter(torch.randn(100, 10))
    # sin saves its input (the parameter: not counted); exp saves its output (4000 bytes of fp32)
    size, out = saved_activation_bytes(lambda: weight.sin().sum(), [weight])
    assert size == 0 and out.requires_grad
    size, _ = saved_activation_bytes(lambda: weight.exp().sum(), [weight])
    assert size == 100 * 10 * 4
    # the same storage saved twice counts once; a fresh intermediate counts
    size, _ = saved_activation_bytes(lambda: (weight.exp() * 2).exp().sum(), [weight])
    assert size == 2 * 100 * 10 * 4
    assert not math.isnan(size)


def test_help_answers():
    done = _run_compare(["--help"], timeout=120)
    assert done.returncode == 0
    for option in ("--steps", "--image-sizes", "--kinds", "--out", "--quick", "--scale"):
        assert option in done.stdout


def test_bad_image_size_is_refused():
    done = _run_compare(["--image-sizes", "30"], timeout=120)
    assert done.returncode == 2 and "not a multiple of the patch size" in done.stderr


# ----------------------------------------------------------------------------- variants


@pytest.mark.parametrize("name, overrides", [
    ("softmax", ["model.image.attention=softmax", "model.text.attention=softmax"]),
    ("linear-affine", ["model.image.attention=linear-affine", "model.image.denominator=count",
                       "model.text.attention=linear-affine", "model.text.denominator=count"]),
    ("linear-affine-kernel", ["model.image.attention=linear-affine", "model.image.denominator=kernel",
                              "model.text.attention=linear-affine", "model.text.denominator=kernel"]),
    ("linear-elu", ["model.image.attention=linear-elu", "model.image.denominator=kernel",
                    "model.text.attention=linear-elu", "model.text.denominator=kernel"]),
    ("linear-relu-count", ["model.image.attention=linear-relu", "model.image.denominator=count",
                           "model.text.attention=linear-relu", "model.text.denominator=count"]),
    ("linear-focused", ["model.image.attention=linear-focused", "model.image.denominator=kernel",
                        "model.text.attention=linear-focused", "model.text.denominator=kernel"]),
    ("linear-focused-local3", ["model.image.attention=linear-focused", "model.image.denominator=kernel",
                               "model.text.attention=linear-focused", "model.text.denominator=kernel",
                               "model.image.local_kernel=3"]),
    ("linear-affine-count-local5", ["model.image.attention=linear-affine", "model.image.denominator=count",
                                    "model.text.attention=linear-affine", "model.text.denominator=count",
                                    "model.image.local_kernel=5"]),
])
def test_variant_names_become_overrides_of_both_towers(name, overrides):
    variant = parse_variant(name)
    assert variant.name == name
    assert variant.overrides() == overrides
    spec_overrides = RunSpec(name, 28, 64, Budget()).model_overrides()
    assert [o for o in spec_overrides if "attention=" in o or "denominator=" in o or "local_kernel=" in o] == overrides


@pytest.mark.parametrize("name, overrides", [
    ("linear-focused-local3+text-softmax", ["model.image.attention=linear-focused", "model.image.denominator=kernel",
                                            "model.text.attention=softmax", "model.image.local_kernel=3"]),
    ("softmax+text-linear-affine", ["model.image.attention=softmax", "model.text.attention=linear-affine",
                                    "model.text.denominator=count"]),
])
def test_a_text_suffix_sets_the_text_tower_apart(name, overrides):
    variant = parse_variant(name)
    assert variant.overrides() == overrides and not variant.linear  # one softmax tower: not O(N)
    cfg = load_config([], RunSpec(name, 28, 64, Budget()).model_overrides())
    # what the trainer builds from those overrides is what the name says, tower by tower
    assert (resolve_attention(cfg.model.image), resolve_attention(cfg.model.text, causal=True)) == (variant.image, variant.text)
    model = build_model(cfg.model)
    assert all(b.attn.spec == variant.image for b in model.visual.blocks)
    assert all(b.attn.spec == variant.text for b in model.text.blocks)


def test_mixed_tower_variants_are_not_picked_as_the_best_O_N_variant():
    kinds = ("softmax", "linear-focused+text-softmax", "linear-affine", "linear-focused")
    specs = [RunSpec(k, s, 64, Budget(steps=150)) for s in (28, 56) for k in kinds]
    top1 = {"softmax": 0.9, "linear-focused+text-softmax": 0.8, "linear-affine": 0.5, "linear-focused": 0.6}
    rows = aggregate(specs, {s: _result(s.kind, s.image_size, 0, top1[s.kind], 0.9, 3.0) for s in specs})
    assert pick_best(rows, 150) == "linear-focused"  # the mixed one scores higher but its text tower is softmax


@pytest.mark.parametrize("name, why", [
    ("linear", "is not an attention name"), ("linear-gelu", "is not an attention name"),
    ("Softmax", "is not an attention name"), ("softmax-local3", "softmax takes no local branch"),
    ("linear-affine-local7", "7 is not one of 0, 3, 5"), ("linear-focused-local3-kernel", "is not an attention name"),
    ("linear-elu-kernel-kernel", "is not an attention name"), ("linear-affine-", "is not an attention name"),
    ("linear-affinekernel", "is not an attention name"), ("linear-focused-p2", "default focused power only"),
    ("linear-focused+text-linear-focused", "the text tower is the image tower's"),
    ("linear-focused-local3+text-linear-focused", "the text tower is the image tower's"),
    ("linear-focused+text-linear-affine-local3", "the local branch is for the image tower only"),
    ("linear-focused+text-softmax+text-softmax", "one '+text-' at most"),
    ("linear-focused+text-linear-gelu", "is not an attention name"),
])
def test_bad_variant_names_are_refused_with_the_grammar(name, why):
    with pytest.raises(VariantError) as err:
        parse_variant(name)
    message = str(err.value)
    assert f"'{name}'" in message and why in message
    if why not in ("default focused power only", "the text tower is the image tower's"):  # these name the fix
        for part in ("softmax", "linear-{affine,focused,elu,relu,pola}", "[-count|-kernel|-mala]", "-local{3,5}",
                     "[-gate]", "-sm<layer>"):
            assert part in message


def test_bad_variant_on_the_command_line():
    done = _run_compare(["--kinds", "softmax", "linear-gelu"], timeout=120)
    assert done.returncode == 2
    assert "'linear-gelu'" in done.stderr and "-local{3,5}" in done.stderr


def test_run_identity_includes_seed_and_steps():
    base = Budget(steps=150, seed=0)
    names = {RunSpec("linear-affine", 56, 64, b).name
             for b in (base, Budget(steps=600, seed=0), Budget(steps=150, seed=1), Budget(steps=600, seed=2))}
    assert len(names) == 4
    assert RunSpec("linear-affine", 56, 64, base).name == "linear-affine-56px-w64-150steps-seed0"
    overrides = RunSpec("linear-affine", 56, 64, Budget(steps=600, seed=2)).train_overrides(Path("d"), Path("r"))
    assert "train.seed=2" in overrides and "train.steps=600" in overrides and "train.warmup_steps=60" in overrides


def test_seeds_option():
    assert parse_seeds([3]) == [0, 1, 2]
    assert parse_seeds([1]) == [0]
    assert parse_seeds([1, 2]) == [1, 2]
    for bad in ([0], [1, 1], [-1, 2]):
        with pytest.raises(ExperimentError):
            parse_seeds(bad)


# ----------------------------------------------------------------------------- seeds aggregation


def _result(kind: str, size: int, seed: int, top1: float, top5: float, loss: float, steps: int = 150) -> RunResult:
    spec = RunSpec(kind, size, 64, Budget(steps=steps, seed=seed))
    return RunResult(name=spec.name, kind=kind, image_size=size, width=64, tokens=spec.tokens, steps=steps, seed=seed,
                     batch_size=128, params=1, attention_flops_per_image=10, image_flops_per_image=100,
                     forward_flops_per_sample=200, train_flops=1e12, final_loss=loss, loss_curve=[(steps, loss)],
                     trainer_images_per_s=100.0 + seed, peak_memory_mib=None, top1=top1, top5=top5, eval_samples=5000,
                     train_seconds=None, reused=True)


def test_mean_std_matches_a_hand_computation():
    # mean (0.60 + 0.64 + 0.65) / 3 = 0.63; deviations -0.03, 0.01, 0.02: sum of squares 0.0014, / (3 - 1) = 0.0007
    stat = mean_std([0.60, 0.64, 0.65])
    assert stat.mean == pytest.approx(0.63) and stat.std == pytest.approx(math.sqrt(0.0007)) and stat.n == 3
    assert stat.cell(".2f", 100) == "63.00 ± 2.65 (3)"
    assert mean_std([0.5]).cell(".2f", 100) == "50.00 (1)"
    assert mean_std([]).cell() == "-"
    assert mean_std([None, 1.0, float("nan")]).n == 1


def test_rows_aggregate_seeds_and_show_missing_ones():
    specs = [RunSpec(kind, size, 64, Budget(steps=150, seed=seed)) for seed in (0, 1, 2) for size in (28, 56)
             for kind in ("softmax", "linear-affine")]
    values = {  # (kind, size) -> per-seed (top1, top5, loss); linear-affine at 56 px lacks seed 2
        ("softmax", 28): [(0.66, 0.98, 3.45), (0.64, 0.97, 3.47), (0.65, 0.99, 3.46)],
        ("linear-affine", 28): [(0.55, 0.97, 3.72), (0.57, 0.98, 3.70), (0.56, 0.96, 3.71)],
        ("softmax", 56): [(0.62, 0.98, 3.55), (0.60, 0.97, 3.57), (0.64, 0.99, 3.53)],
        ("linear-affine", 56): [(0.40, 0.92, 4.07), (0.44, 0.93, 4.03)],
    }
    done = {s: _result(s.kind, s.image_size, s.budget.seed, *values[(s.kind, s.image_size)][s.budget.seed])
            for s in specs if s.budget.seed < len(values[(s.kind, s.image_size)])}
    rows = aggregate(specs, done)
    assert [(r.kind, r.image_size, r.n) for r in rows] == [
        ("softmax", 28, 3), ("linear-affine", 28, 3), ("softmax", 56, 3), ("linear-affine", 56, 2)]
    soft56 = rows[2]
    # top-1 0.62, 0.60, 0.64: mean 0.62, deviations 0, -0.02, 0.02 -> std sqrt(0.0008 / 2) = 0.02
    assert soft56.stat("top1").mean == pytest.approx(0.62) and soft56.stat("top1").std == pytest.approx(0.02)
    assert soft56.stat("final_loss").cell(".4f") == "3.5500 ± 0.0200 (3)"
    assert soft56.stat("trainer_images_per_s").mean == pytest.approx(101.0)
    lin56 = rows[3]
    # top-1 0.40, 0.44: mean 0.42, std sqrt((0.02² + 0.02²) / 1) = 0.0283
    assert lin56.stat("top1").cell(".2f", 100) == "42.00 ± 2.83 (2)"
    assert lin56.seeds_cell() == "0,1 (2 of 3)" and rows[0].seeds_cell() == "0,1,2"

    table = parse_markdown_table(markdown_table(TABLE_COLUMNS, table_rows(rows, {})))
    assert table[3]["zero-shot top-1 %"] == "42.00 ± 2.83 (2)" and table[3]["seeds"] == "0,1 (2 of 3)"

    # best: the linear variant with the highest top-1 averaged over sizes (only one here); targets vs softmax
    assert pick_best(rows, 150) == "linear-affine"
    checks = target_checks(rows, "linear-affine", 150, None, {}, {}, {})
    assert [round(c["value"], 6) for c in checks] == [round(100 * (0.56 - 0.65), 6), round(100 * (0.42 - 0.62), 6)]
    assert not any(c["met"] for c in checks)


def test_pick_best_needs_every_size_and_targets_read_the_sweep():
    rows = aggregate([RunSpec(k, s, 64, Budget(steps=150)) for s in (28, 56) for k in ("softmax", "linear-elu",
                                                                                         "linear-focused")],
                     {s: _result(s.kind, s.image_size, 0, t, 0.9, 3.0) for s, t in zip(
                         [RunSpec(k, s, 64, Budget(steps=150)) for s in (28, 56) for k in ("softmax", "linear-elu",
                                                                                            "linear-focused")],
                         (0.6, 0.5, 0.7, 0.6, 0.5, 0.0)) if not (s.kind == "linear-focused" and s.image_size == 56)})
    assert pick_best(rows, 150) == "linear-elu"  # linear-focused lacks its 56 px run
    sweep = {"batch_size": 16, "points": [{"kind": k, "tokens": n, "images_per_s": r} for k, n, r in (
        ("softmax", 197, 100.0), ("linear-elu", 197, 110.0), ("softmax", 785, 20.0), ("linear-elu", 785, 28.0))]}
    fits = {"softmax": {"exponent": 0.05}, "linear-elu": {"exponent": 0.046}}
    checks = {c["target"].split(":")[0]: c for c in target_checks(rows, "linear-elu", 150, None, fits, sweep, {})}
    assert checks["training images/s, 197 tokens (timing sweep, batch 16)"]["met"]
    big = checks["training images/s, 785 tokens (timing sweep, batch 16)"]
    assert big["value"] == pytest.approx(1.4) and not big["met"]
    assert checks["loss-vs-compute exponent over three widths"]["value"] == pytest.approx(0.92)
