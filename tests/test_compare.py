"""The comparison experiment: the --quick form end to end (real trainer, real eval job, real shards),
checked against what the runs themselves wrote (TensorBoard events via EventAccumulator, the eval
job's JSON, ds_linclip.models.flops); plus unit tests of its measuring and fitting helpers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ds_linclip.experiments.compare import (
    DEFAULT_KINDS, QUICK, TABLE_COLUMNS, fit_power_law, markdown_table, parse_markdown_table,
    saved_activation_bytes, tail_mean_loss,
)

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


@pytest.mark.slow
def test_quick_comparison_end_to_end(tmp_path, fmnist_shards):
    out, runs = tmp_path / "out", tmp_path / "runs"
    done = _run_compare(["--quick", "--data", str(fmnist_shards), "--runs-dir", str(runs), "--out", str(out),
                         "--no-progress"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    rows = parse_markdown_table((out / "compare.md").read_text())
    assert list(rows[0]) == TABLE_COLUMNS
    sizes = QUICK["image_sizes"]
    assert {(r["kind"], int(r["image px"])) for r in rows} == {(k, s) for k in DEFAULT_KINDS for s in sizes}
    assert len(rows) == len(DEFAULT_KINDS) * len(sizes)

    from ds_linclip.config import load_config
    from ds_linclip.models.flops import attention_flops_per_image

    for row in rows:
        run_dir = runs / f"{row['kind']}-{row['image px']}px-w{QUICK['width']}"
        # numbers the run itself wrote: the eval job's JSON and the trainer's TensorBoard loss
        record = json.loads((run_dir / "eval" / "final_zeroshot.json").read_text())
        assert record["num_samples"] == QUICK["eval_samples"]
        assert float(row["zero-shot top-1 %"]) == pytest.approx(100 * record["metrics"]["top1"], abs=0.006)
        assert float(row["top-5 %"]) == pytest.approx(100 * record["metrics"]["top5"], abs=0.006)
        assert float(row["final loss"]) == pytest.approx(_last_loss(run_dir), abs=6e-5)
        # analytic attention FLOPs of the model the run trained (its own resolved config)
        model_cfg = load_config([run_dir / "config.yaml"]).model
        assert model_cfg.image.attention == ("linear-affine" if row["kind"] == "linear-affine-kernel" else row["kind"])
        assert model_cfg.image.denominator == ("kernel" if row["kind"] == "linear-affine-kernel" else "count")
        assert model_cfg.text.attention == model_cfg.image.attention
        assert float(row["attn MFLOPs/image"]) == pytest.approx(attention_flops_per_image(model_cfg) / 1e6, abs=0.006)
        assert int(row["tokens"]) == (int(row["image px"]) // 4) ** 2 + 1
        for column in ("img/s interleaved", "img/s trainer", "activation MiB"):
            assert float(row[column]) > 0, (column, row)
        assert 0 <= float(row["zero-shot top-1 %"]) <= float(row["top-5 %"]) <= 100
        assert row["peak RSS MiB"] == "-"  # in-process runs share one process: no per-run peak

    payload = json.loads((out / "compare.json").read_text())
    assert [r["name"] for r in payload["runs"]] == [f"{k}-{s}px-w{QUICK['width']}" for s in sizes for k in DEFAULT_KINDS]
    assert payload["timing"]["info"]["rounds"] == QUICK["timing_rounds"]
    for run in payload["runs"]:
        assert len(payload["timing"]["per_run"][run["name"]]["seconds"]) == QUICK["timing_rounds"]
        assert [s for s, _ in run["loss_curve"]] == list(range(1, QUICK["steps"] + 1))
    sweep = payload["sweep"]
    assert {(p["kind"], p["image_size"]) for p in sweep["points"]} == {
        (k, s) for k in DEFAULT_KINDS for s in QUICK["sweep_sizes"]}
    assert all(p["images_per_s"] > 0 and p["activation_mib"] > 0 for p in sweep["points"])
    sweep_rows = parse_markdown_table((out / "compare.md").read_text().split("timing sweep over token counts")[1])
    assert [r["kind"] for r in sweep_rows] == list(DEFAULT_KINDS)
    for name in ("compare_loss.png", "compare_accuracy_vs_compute.png", "compare_throughput.png", "compare_sweep.png"):
        _assert_png(out / name)



@pytest.mark.slow
def test_subprocess_launcher_peak_memory_and_reuse(tmp_path, fmnist_shards):
    """The default launcher: `python -m ds_linclip.train` / `python -m ds_linclip.eval` subprocesses."""
    out, runs = tmp_path / "out", tmp_path / "runs"
    done = _run_compare(["--quick", "--launcher", "subprocess", "--kinds", "linear-affine", "--image-sizes", "12",
                         "--timing-rounds", "1", "--data", str(fmnist_shards), "--runs-dir", str(runs),
                         "--out", str(out), "--no-progress"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (row,) = parse_markdown_table((out / "compare.md").read_text())
    run_dir = runs / "linear-affine-12px-w32"
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
