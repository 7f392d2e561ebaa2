"""The paper's comparison in miniature: softmax vs linear attention CLIPs on Fashion-MNIST.

    python -m ds_linclip.experiments.compare                 # 4 kinds x 2 image sizes
    python -m ds_linclip.experiments.compare --scale         # + 3 widths, loss-vs-compute fits
    python -m ds_linclip.experiments.compare --quick --out /tmp/cmp   # tiny, for tests

Every run uses OUR trainer (`python -m ds_linclip.train`, one process, DeepSpeed, fp32 on CPU) and
OUR eval job (`python -m ds_linclip.eval --checkpoint R/final`, zero-shot top-1/top-5 on the
Fashion-MNIST test split) under the same budget: same shards, steps, batch, seed, learning-rate
schedule; only the attention variant (both towers, or `<image>+text-<text>`) and, with --scale,
the width change.

Measured per run: zero-shot top-1/top-5, final training loss, the trainer's images/s (median of its
logged windows) and peak memory (the trainer process's peak RSS on CPU / max allocated on GPU),
all read from the run's TensorBoard events (tensorboard's EventAccumulator) and eval JSON.
Analytic: attention FLOPs per image and training compute (ds_linclip.models.flops).

The machine this was written for is small and shared, so a run's own images/s is noisy: other
work may land on one run and not the next. The comparison therefore also runs an *interleaved
timing pass* in this process: for each image size it builds every kind's model (same shapes,
plain PyTorch, AdamW) and times one training step (forward + contrastive loss + backward +
optimizer step) on a batch of the training shape, alternating the kinds and rotating their order
each round, and reports the median over rounds. The same pass measures activation memory: the
bytes of the tensors autograd saves for backward in one step (parameters excluded), which is what
the attention kind changes; process RSS is mostly the framework.

Outputs in --out: compare.md (method + table), compare.json (every number), compare_loss.png
(loss vs step), compare_accuracy_vs_compute.png, compare_throughput.png and, with --scale,
scale_loss_vs_compute.png and its fitted power laws (in compare.md/json). Runs go to --runs-dir;
a run whose R/DONE exists with the same resolved config is reused, not retrained.

This module holds the comparison's grid, targets, report text and CLI; specs, runs, the launcher,
tables, plots, fits and the timing pass are the experiments package's shared pieces.
"""

from __future__ import annotations

import argparse
import functools
import json
import shlex
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Sequence

from ds_linclip.experiments.fits import fit_power_law
from ds_linclip.experiments.launcher import Launcher, parse_study_args, prepare_process, run_specs, run_study
from ds_linclip.experiments.plots import (plot_accuracy_vs_compute, plot_loss, plot_scaling, plot_sweep,
                                          plot_throughput)
from ds_linclip.experiments.report import (Row, aggregate, fmt, load_average_1m, machine_sentence, markdown_table,
                                           run_meta, write_json)
from ds_linclip.experiments.runs import (Budget, ExperimentError, RunResult, RunSpec, ensure_shards, log, parse_seeds,
                                         set_log_prefix, shape_name)
from ds_linclip.experiments.timing import interleaved_timing
from ds_linclip.experiments.variants import HEAD_DIM, VARIANT_GRAMMAR, parse_variant, variant_argument as _variant_argument

CompareError = ExperimentError  # the name the comparison's callers know
BEST = "best"  # in --long-kinds/--scale-kinds/--sweep-kinds: the best linear variant of the comparison

DEFAULT_KINDS = ("softmax", "linear-affine", "linear-focused", "linear-focused-local3", "linear-affine-local3")
SCALE_KINDS = ("softmax", "linear-affine", BEST)
LONG_KINDS = ("softmax", "linear-affine", BEST)

# a variant name, or `best` where the option's help says so
variant_argument = functools.partial(_variant_argument, allowed=(BEST,))


def _attention_flops(spec: RunSpec) -> int:
    from ds_linclip.config import load_config
    from ds_linclip.models.flops import attention_flops_per_image

    return attention_flops_per_image(load_config([], spec.model_overrides()).model)


def sweep_rows(sweep: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Markdown rows of the timing sweep: per kind, img/s at each size and the ratio to softmax."""
    sizes = sorted({p["image_size"] for p in sweep["points"]})
    kinds = list(dict.fromkeys(p["kind"] for p in sweep["points"]))
    at = {(p["kind"], p["image_size"]): p for p in sweep["points"]}
    tokens = {p["image_size"]: p["tokens"] for p in sweep["points"]}
    header = ["kind"] + [f"{s} px / {tokens[s]} tok: img/s" for s in sizes]
    rows = []
    for kind in kinds:
        cells = [kind]
        for size in sizes:
            rate = at[(kind, size)]["images_per_s"]
            base = at.get(("softmax", size), {}).get("images_per_s")
            cells.append(f"{rate:.1f}" + (f" ({rate / base:.2f}x)" if base and kind != "softmax" else ""))
        rows.append(cells)
    return header, rows


def pick_best(rows: Sequence[Row], steps: int) -> str | None:
    """The linear variant (both towers linear: an O(N) model) with the highest zero-shot top-1, averaged
    over the image sizes of the `steps`-step rows (each size's mean over seeds); only variants with runs at
    every size count."""
    sizes = {r.image_size for r in rows if r.steps == steps}
    scores: dict[str, list[float]] = {}
    for row in rows:
        if row.steps == steps and parse_variant(row.kind).linear and row.n:
            scores.setdefault(row.kind, []).append(row.stat("top1").mean)
    complete = {k: sum(v) / len(v) for k, v in scores.items() if len(v) == len(sizes)}
    return max(complete, key=complete.get) if complete else None


def _row(rows: Sequence[Row], kind: str, size: int, steps: int) -> Row | None:
    return next((r for r in rows if (r.kind, r.image_size, r.steps) == (kind, size, steps) and r.n), None)


def target_checks(rows: Sequence[Row], best: str | None, base_steps: int, long_steps: int | None,
                  fits: dict[str, dict], sweep: dict[str, Any], timing: dict[str, dict]) -> list[dict[str, Any]]:
    """The comparison's targets for the best variant against softmax, each with the measured value and whether it is met:
    zero-shot top-1 no worse than softmax - 0.5 points (every size at the base steps, the long rows), loss-vs-compute
    exponent >= 0.9x softmax's, interleaved training images/s >= 1.0x at 197 tokens and >= 1.5x at 785 tokens."""
    if not best:
        return []
    checks = []
    sizes = sorted({r.image_size for r in rows})
    for steps in [base_steps] + ([long_steps] if long_steps and long_steps != base_steps else []):
        for size in sizes:
            ours, theirs = _row(rows, best, size, steps), _row(rows, "softmax", size, steps)
            if not ours or not theirs:
                continue
            delta = 100 * (ours.stat("top1").mean - theirs.stat("top1").mean)
            checks.append({
                "target": f"zero-shot top-1 at {ours.tokens} tokens, {steps} steps: {best} >= softmax - 0.5 points",
                "measured": f"{ours.stat('top1').cell(scale=100)} vs {theirs.stat('top1').cell(scale=100)}: "
                            f"{delta:+.2f} points", "value": delta, "threshold": -0.5, "met": delta >= -0.5,
                "n": [ours.n, theirs.n]})
    if best in fits and "softmax" in fits and fits["softmax"]["exponent"]:
        ratio = fits[best]["exponent"] / fits["softmax"]["exponent"]
        checks.append({"target": f"loss-vs-compute exponent over three widths: {best} >= 0.9x softmax",
                       "measured": f"{fits[best]['exponent']:.4f} vs {fits['softmax']['exponent']:.4f}: {ratio:.2f}x",
                       "value": ratio, "threshold": 0.9, "met": ratio >= 0.9})

    def speed(label: str, rate: float | None, base: float | None, threshold: float) -> None:
        if rate and base:
            checks.append({"target": f"training images/s, {label}: {best} >= {threshold:.1f}x softmax",
                           "measured": f"{rate:.1f} vs {base:.1f} img/s: {rate / base:.2f}x", "value": rate / base,
                           "threshold": threshold, "met": rate / base >= threshold})

    for row in rows:
        if row.kind == best and row.tokens == 197 and row.steps == base_steps:
            soft = timing.get(shape_name("softmax", row.image_size, row.width), {})
            speed(f"197 tokens (interleaved pass, batch {soft.get('batch_size', '?')})",
                  timing.get(row.shape_name, {}).get("images_per_s"), soft.get("images_per_s"), 1.0)
    points = {(p["kind"], p["tokens"]): p["images_per_s"] for p in (sweep or {}).get("points", [])}
    for tokens, threshold in ((197, 1.0), (785, 1.5)):
        speed(f"{tokens} tokens (timing sweep, batch {sweep.get('batch_size') if sweep else '?'})",
              points.get((best, tokens)), points.get(("softmax", tokens)), threshold)
    return checks


def targets_markdown(checks: Sequence[dict[str, Any]]) -> str:
    return markdown_table(["target", "measured (mean ± std (n))", "met"],
                          [[c["target"], c["measured"], "yes" if c["met"] else
                            f"no, by {abs(c['value'] - c['threshold']):.2f}" + (" points" if "top-1" in c["target"] else "x")]
                           for c in checks])


# ----------------------------------------------------------------------------- outputs


TABLE_COLUMNS = [
    "kind", "image px", "tokens", "steps", "seeds", "zero-shot top-1 %", "top-5 %", "final loss",
    "img/s interleaved", "img/s trainer", "activation MiB", "peak RSS MiB",
    "attn MFLOPs/image", "attn % of image fwd", "train TFLOPs",
]


def table_rows(rows: Sequence[Row], timing: dict[str, dict]) -> list[list[str]]:
    out = []
    for r in rows:
        t = timing.get(r.shape_name, {})
        attention, image = r.first("attention_flops_per_image"), r.first("image_flops_per_image")
        peak = [x.peak_memory_mib for x in r.runs if x.peak_memory_mib is not None]
        out.append([
            r.kind, str(r.image_size), str(r.tokens), str(r.steps), r.seeds_cell(),
            r.stat("top1").cell(".2f", 100), r.stat("top5").cell(".2f", 100), r.stat("final_loss").cell(".4f"),
            fmt(t.get("images_per_s"), ".1f"), fmt(r.stat("trainer_images_per_s").mean, ".1f"),
            fmt(t.get("activation_mib"), ".1f"), fmt(max(peak) if peak else None, ".0f"),
            fmt(attention / 1e6 if attention else None, ".2f"),
            fmt(100 * attention / image if attention and image else None, ".1f"),
            fmt(r.first("train_flops") / 1e12 if r.runs else None, ".4g"),
        ])
    return out


SUMMARY_HEADER = ["attention (image[+text])", "px (tokens)", "steps", "zero-shot top-1 %", "top-5 %", "final loss",
                  "train img/s (vs softmax)", "activations MiB", "attn MFLOPs/img"]


def summary_markdown(command: str, budget: Budget, rows: Sequence[Row], timing: dict[str, dict]) -> str:
    """The compact table for a README: accuracy and loss (mean ± std (n) over seeds), measured speed
    (and vs softmax), memory, attention FLOPs."""
    out = []
    for r in rows:
        t = timing.get(r.shape_name, {})
        rate, base = t.get("images_per_s"), timing.get(shape_name("softmax", r.image_size, r.width), {}).get("images_per_s")
        attention = r.first("attention_flops_per_image")
        out.append([
            r.kind, f"{r.image_size} ({r.tokens})", str(r.steps), r.stat("top1").cell(".1f", 100),
            r.stat("top5").cell(".1f", 100), r.stat("final_loss").cell(".3f"),
            fmt(rate, ".1f") + (f" ({rate / base:.2f}x)" if rate and base and r.kind != "softmax" else ""),
            fmt(t.get("activation_mib"), ".0f"), fmt(attention / 1e6 if attention else None, ".2f"),
        ])
    return "\n".join([f"`{command}`", "", f"batch {budget.batch_size}, width {budget.width}, {budget.layers} layers per "
                      f"tower, patch {budget.patch_size}; cells: mean ± std (n seeds).", "",
                      markdown_table(SUMMARY_HEADER, out)])


def write_report(out: Path, command: str, budget: Budget, rows: Sequence[Row], timing: dict[str, dict],
                 timing_info: dict[str, Any], scale_results: Sequence[RunResult], fits: dict[str, dict],
                 meta: dict[str, Any], sweep: dict[str, Any] | None = None, best: str | None = None,
                 checks: Sequence[dict[str, Any]] = ()) -> dict[str, Path]:
    """compare.md, compare_summary.md, compare.json and the PNGs into `out`; returns {name: path}."""
    out.mkdir(parents=True, exist_ok=True)
    for optional in ("compare_sweep.png", "scale_loss_vs_compute.png"):  # from an earlier invocation: not ours now
        (out / optional).unlink(missing_ok=True)
    paths = {"markdown": out / "compare.md", "json": out / "compare.json", "loss_png": out / "compare_loss.png",
             "accuracy_png": out / "compare_accuracy_vs_compute.png", "throughput_png": out / "compare_throughput.png"}
    if any(r.n for r in rows):
        plot_loss(rows, paths["loss_png"])
        plot_accuracy_vs_compute(rows, timing, paths["accuracy_png"])
    if timing:
        plot_throughput(rows, timing, paths["throughput_png"])
    if sweep:
        paths["sweep_png"] = out / "compare_sweep.png"
        plot_sweep(sweep, paths["sweep_png"])
    if scale_results and fits:
        paths["scale_png"] = out / "scale_loss_vs_compute.png"
        plot_scaling(scale_results, fits, paths["scale_png"])

    b = budget
    eval_note = f"first {b.eval_samples} of the 10,000 test images" if b.eval_samples else "all 10,000 test images"
    steps = sorted({r.steps for r in rows})
    missing = [r for r in rows if r.n < len(r.seeds_asked)]
    md = [
        "# Softmax vs linear attention CLIP on Fashion-MNIST (the paper's comparison in miniature)",
        "",
        f"Command: `{command}`  ",
        machine_sentence(meta),
        "",
        f"Budget, the same for every variant: {' or '.join(map(str, steps))} steps x batch {b.batch_size} (one process, "
        f"DeepSpeed ZeRO-0, fp32), AdamW lr {b.lr:g} (warm-up 10% of the steps, then cosine), weight decay "
        f"{b.weight_decay:g}; both towers {b.layers} layers, width {b.width}, head dim {HEAD_DIM}; patch {b.patch_size}, "
        f"text context {b.context_length}. Both towers use the row's attention variant (`{VARIANT_GRAMMAR}`; "
        "`-kernel`/`-count` set the normaliser, `-local3`/`-local5` add a depthwise k x k branch on V to the image "
        "tower). One run per (variant, image size, steps, seed); each seed sets the weights and the data order. "
        f"Zero-shot: our eval job, {eval_note}, templates `{b.eval_templates}`.",
        "",
        "Cells with several seeds read **mean ± std (n)**: mean and sample standard deviation over the n seeds that "
        "finished (the `seeds` column lists them; `(k of m)` when fewer than asked have finished so far)."
        + (f" Best linear variant (highest top-1 averaged over the image sizes at {min(steps)} steps): **{best}**."
           if best else ""),
        "",
        markdown_table(TABLE_COLUMNS, table_rows(rows, timing)),
        "",
    ]
    if missing:
        md += ["Not yet finished (a later run of the same command fills them; finished runs are reused): " + "; ".join(
            f"{r.kind} {r.image_size} px {r.steps} steps seeds "
            + ",".join(str(s) for s in r.seeds_asked if s not in r.seeds) for r in missing) + ".", ""]
    if checks:
        md += ["## Targets: the best linear variant against softmax", "", targets_markdown(checks), ""]
    md += [
        "How each column was measured:",
        "",
        "- **zero-shot top-1/top-5**: `python -m ds_linclip.eval --checkpoint R/final` (R/eval/final_zeroshot.json).",
        "- **final loss**: the trainer's `train/loss` averaged over the last 10% of the steps (its logged windows "
        "there), read from R/tensorboard with TensorBoard's EventAccumulator.",
        f"- **img/s interleaved**: one process, {timing_info.get('rounds', 0)} rounds; in each round one training step "
        "(forward, contrastive loss, backward, AdamW) of every variant at that image size, on a batch of "
        f"{timing_info.get('batch_size', '?')} inputs of the training shape, variants alternating with the order "
        "rotated each round; median over rounds. Variants share the machine's noise alike, so compare these across a "
        "row group. Seeds and steps do not change a step's cost: one measurement per variant and size.",
        "- **img/s trainer**: the trainer's own `perf/images_per_s` (median of its logged windows, the first left out; "
        "mean over seeds); runs happen one or two at a time, so load from other work can favour one run over another.",
        "- **activation MiB**: bytes of the tensors autograd saved for backward in one training step "
        "(distinct storages, parameters excluded), from the interleaved pass. On CPU, softmax runs "
        "PyTorch's fused scaled-dot-product attention, which does not keep the N x N matrix.",
        "- **peak RSS MiB**: the trainer's `memory/peak_mb` (process peak RSS on CPU: mostly torch + DeepSpeed; the "
        "highest over seeds); `-` when runs were trained in-process.",
        "- **attn MFLOPs/image**: image-tower token-mixing FLOPs per image (`ds_linclip.models.flops`): softmax "
        "4·N²·width per layer, linear 4·N·head_dim·width; **attn %**: of the image tower's forward FLOPs.",
        "- **train TFLOPs**: 3 x forward FLOPs (image + caption) x samples seen.",
    ]
    if sweep:
        header, sweep_table = sweep_rows(sweep)
        md += [
            "",
            "## Where linear attention overtakes softmax: timing sweep over token counts",
            "",
            f"Nothing trained: the same interleaved training-step timing (batch {sweep['batch_size']}, "
            f"{sweep['rounds']} rounds, median) at more image sizes; in brackets the speed relative to softmax.",
            "",
            markdown_table(header, sweep_table),
        ]
    if scale_results:
        md += [
            "",
            "## Scaling in miniature: loss vs training compute over three widths",
            "",
            f"Same budget ({scale_results[0].steps} steps, seed {scale_results[0].seed}), image size "
            f"{scale_results[0].image_size} px, widths "
            f"{', '.join(str(w) for w in sorted({r.width for r in scale_results}))} (heads = width/{HEAD_DIM}, "
            "embed dim = width). Fit: final loss L = a·C^-b over the widths (least squares in log-log).",
            "",
            markdown_table(["kind", "width", "params (M)", "train TFLOPs", "final loss", "zero-shot top-1 %"],
                           [[r.kind, str(r.width), fmt(r.params / 1e6, ".2f"), fmt(r.train_flops / 1e12, ".4g"),
                             fmt(r.final_loss, ".4f"), fmt(100 * r.top1, ".2f")] for r in scale_results]),
            "",
            markdown_table(["fit", "exponent b", "coefficient a", "R²", "points"],
                           [[k, fmt(f["exponent"], ".4f"), fmt(f["coefficient"], ".4g"), fmt(f["r2"], ".3f"),
                             str(f["points"])] for k, f in fits.items()]),
        ]
    md += ["", "Plots: " + ", ".join(f"`{p.name}`" for k, p in paths.items() if k.endswith("png") and p.exists()), ""]
    paths["summary"] = out / "compare_summary.md"
    paths["summary"].write_text(summary_markdown(command, budget, rows, timing) + "\n")
    paths["markdown"].write_text("\n".join(md))
    payload = {
        "command": command, **meta, "budget": asdict(budget), "best": best, "targets": list(checks),
        "timing": {"info": timing_info, "per_run": timing},
        "rows": [r.summary() for r in rows],
        "runs": [asdict(run) for r in rows for run in r.runs],
        "sweep": sweep or {},
        "scale": {"runs": [asdict(r) for r in scale_results], "fits": fits},
    }
    write_json(paths["json"], payload)
    return paths


# ----------------------------------------------------------------------------- CLI


QUICK = {"steps": 4, "batch_size": 8, "width": 32, "layers": 1, "image_sizes": [12, 24], "eval_samples": 200,
         "eval_templates": "simple", "eval_batch_size": 100, "timing_rounds": 2, "sweep_sizes": [12, 24],
         "sweep_batch": 4, "scale_widths": [32, 64, 96]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ds_linclip.experiments.compare",
        description=(
            "Train softmax and linear-attention CLIPs on Fashion-MNIST under the same budget (same shards, steps, "
            "batch, seeds, schedule) with ds_linclip's trainer, score each with the eval job (zero-shot top-1/top-5 "
            "on the test split) and report per variant, image size and step count, as mean ± std over seeds: "
            "zero-shot accuracy and final loss; plus training images/s (the trainer's, and an interleaved "
            "side-by-side timing pass), activation and peak memory, attention FLOPs per image, and the "
            "comparison's targets for the best linear variant against softmax. Writes markdown tables, a JSON file and PNG plots to --out."
        ),
        epilog=(
            f"attention variants: {VARIANT_GRAMMAR}\n"
            "examples:\n"
            "  python -m ds_linclip.experiments.compare --seeds 3 --steps 150 --image-sizes 28 56\n"
            "  python -m ds_linclip.experiments.compare --kinds softmax linear-affine linear-focused-local3 \\\n"
            "      --long-steps 600 --long-kinds softmax linear-affine best --long-size 56\n"
            "  python -m ds_linclip.experiments.compare --scale --scale-widths 32 64 128 --scale-kinds softmax best\n"
            "  python -m ds_linclip.experiments.compare --no-train ...   # report the runs that have finished\n"
            "  python -m ds_linclip.experiments.compare --quick --out /tmp/compare   # seconds-scale smoke run\n"
            "Each (variant, size, steps, seed) is one run folder in --runs-dir; a finished one with the same resolved "
            "config is reused, so a later run of the same command fills only what is missing (delete a folder to retrain it)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--kinds", nargs="+", default=list(DEFAULT_KINDS), type=variant_argument, metavar="VARIANT",
                        help="attention variants (grammar below; a plain name sets both towers). Default: %(default)s")
    parser.add_argument("--image-sizes", nargs="+", type=int, default=[28, 56], metavar="PX",
                        help="image sizes in pixels, multiples of the patch size (default: %(default)s -> 49 and 196 "
                             "patches with patch 4; the data pipeline resizes the 28 px images)")
    parser.add_argument("--steps", type=int, default=200, help="training steps per run (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=128, help="batch per step (default %(default)s)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1], metavar="S",
                        help="--seeds N: seeds 0..N-1; --seeds A B ...: those seeds. Each seed sets the weights and the "
                             "data order of one run per (variant, size, steps); tables report mean ± std (n) "
                             "(default: 1, i.e. seed 0)")
    parser.add_argument("--long-steps", type=int, default=None,
                        help="also train --long-kinds for this many steps at --long-size (same seeds), reported as "
                             "their own rows (default: none)")
    parser.add_argument("--long-kinds", nargs="+", type=variant_argument, default=list(LONG_KINDS), metavar="VARIANT",
                        help=f"variants of the --long-steps rows; `{BEST}` = the best linear variant of the comparison "
                             "(see --best) (default: %(default)s)")
    parser.add_argument("--long-seeds", nargs="+", type=int, default=None, metavar="S",
                        help="seeds of the --long-steps rows, as --seeds (default: --seeds); fewer than --seeds "
                             "leave the long rows for a later run of the same command")
    parser.add_argument("--long-size", type=int, default=None,
                        help="image size of the --long-steps rows (default: the largest of --image-sizes)")
    parser.add_argument("--best", type=variant_argument, default=None, metavar="VARIANT",
                        help=f"the variant `{BEST}` stands for (default: the linear variant with the highest zero-shot "
                             "top-1 averaged over the image sizes at --steps, mean over seeds)")
    parser.add_argument("--lr", type=float, default=2.0e-3, help="peak learning rate (default %(default)s)")
    parser.add_argument("--width", type=int, default=128, help="tower width (default %(default)s; heads = width/32)")
    parser.add_argument("--layers", type=int, default=4, help="layers per tower (default %(default)s)")
    parser.add_argument("--context-length", type=int, default=16,
                        help="text context (default %(default)s: every caption and prompt here is at most 14 tokens)")
    parser.add_argument("--eval-samples", type=int, default=None,
                        help="score only the first N test images (default: all 10,000)")
    parser.add_argument("--eval-templates", default="openai",
                        help="zero-shot prompt templates: openai | simple | a file (default %(default)s)")
    parser.add_argument("--eval-batch-size", type=int, default=500, help="eval batch (default %(default)s)")
    parser.add_argument("--timing-rounds", type=int, default=5,
                        help="rounds of the interleaved timing pass (0 = skip it; default %(default)s)")
    parser.add_argument("--timing-batch", type=int, default=None,
                        help="batch of the interleaved timing pass (default: --batch-size)")
    parser.add_argument("--sweep-sizes", nargs="*", type=int, default=[28, 56, 84, 112], metavar="PX",
                        help="image sizes of an extra interleaved timing sweep (nothing trained): every --sweep-kinds "
                             "variant at every size on the same batch (--sweep-batch), to show where linear attention "
                             "overtakes softmax as the token count grows (default: %(default)s; none = skip)")
    parser.add_argument("--sweep-kinds", nargs="+", type=variant_argument, default=None, metavar="VARIANT",
                        help=f"variants of the timing sweep (`{BEST}` allowed; default: --kinds)")
    parser.add_argument("--sweep-batch", type=int, default=16, help="batch of the timing sweep (default %(default)s)")
    parser.add_argument("--timing-from", type=Path, default=None, metavar="JSON",
                        help="take the interleaved timing pass and the sweep from an earlier compare.json instead of "
                             "measuring them again (the timing of a shape does not change with seeds or steps; the "
                             "pass is the one step that wants the machine to itself)")
    parser.add_argument("--scale", action="store_true",
                        help="also train --scale-kinds at three widths (--scale-widths) on the first image size, first "
                             "seed, and fit final loss against training compute (a power law per variant)")
    parser.add_argument("--scale-widths", nargs=3, type=int, default=[64, 128, 192], metavar="W",
                        help="widths for --scale (default: %(default)s)")
    parser.add_argument("--scale-kinds", nargs="+", default=list(SCALE_KINDS), type=variant_argument, metavar="VARIANT",
                        help=f"variants for --scale (`{BEST}` allowed; default: %(default)s)")
    parser.add_argument("--no-train", action="store_true",
                        help="train nothing: report the runs that earlier runs of the command finished (scoring any not yet scored); "
                             "rows show how many of their seeds exist")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs trained at the same time (subprocess launcher; default %(default)s). The "
                             "interleaved timing pass always runs alone, after them")
    parser.add_argument("--data", type=Path, default=Path("data/fmnist"),
                        help="Fashion-MNIST shard folder (train/, test/, classnames.txt); written if missing "
                             "(default: %(default)s)")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/compare"),
                        help="where the training runs go (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("docs/results"),
                        help="where compare.md, compare.json and the PNGs go (default: %(default)s)")
    parser.add_argument("--launcher", choices=("subprocess", "inprocess"), default=None,
                        help="run the trainer/eval as `python -m` subprocesses (default; per-run peak memory) or "
                             "in this process (faster start-up; the default with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny everything for tests: " + ", ".join(f"{k}={v}" for k, v in QUICK.items())
                             + " (explicit options still win)")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op CPU threads of every process (trainer, eval, timing; default %(default)s): on a "
                             "shared machine OpenMP threads that wait for each other under load make a step many times "
                             "slower (measured here: 2 threads 10x slower than 1 at load 8 on 2 cores); 0 = torch's default")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    set_log_prefix("compare")
    return run_study(lambda: _main(argv))


def _main(argv: Sequence[str] | None = None) -> int:
    args, argv = parse_study_args(build_parser(), argv, QUICK)
    launcher_mode = args.launcher or ("inprocess" if args.quick else "subprocess")
    seeds = parse_seeds(args.seeds)
    long_seeds = parse_seeds(args.long_seeds) if args.long_seeds else seeds
    long_size = args.long_size or max(args.image_sizes)
    for size in args.image_sizes + [long_size]:
        if size % 4:
            print(f"error: --image-sizes {size} is not a multiple of the patch size 4", file=sys.stderr)
            return 2
    for width in [args.width] + (args.scale_widths if args.scale else []):
        if width % HEAD_DIM and width >= HEAD_DIM:
            print(f"error: width {width} is not a multiple of the head dim {HEAD_DIM}", file=sys.stderr)
            return 2
    if args.steps < 1 or args.batch_size < 1 or (args.long_steps is not None and args.long_steps < 1):
        print("error: --steps, --long-steps and --batch-size must be positive", file=sys.stderr)
        return 2
    if BEST in args.kinds:
        print(f"error: --kinds lists the variants the best is picked from; `{BEST}` is for --long-kinds, "
              "--scale-kinds and --sweep-kinds", file=sys.stderr)
        return 2
    jobs = args.jobs if launcher_mode == "subprocess" else 1  # in-process runs share one DeepSpeed process

    import torch
    from tqdm import tqdm

    prepare_process(args.threads)
    budget = Budget(steps=args.steps, batch_size=args.batch_size, seed=seeds[0], lr=args.lr, layers=args.layers,
                    context_length=args.context_length,
                    width=args.width, eval_samples=args.eval_samples, eval_templates=args.eval_templates,
                    eval_batch_size=args.eval_batch_size)
    command = "python -m ds_linclip.experiments.compare " + shlex.join(argv)
    meta = {**run_meta(), "launcher": launcher_mode, "seeds": seeds, "long_seeds": long_seeds}
    data_dir = ensure_shards(args.data)
    runs_dir = args.runs_dir.expanduser().resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    launcher = Launcher(launcher_mode, runs_dir, data_dir)

    def spec(kind: str, size: int, width: int = args.width, steps: int = args.steps, seed: int = seeds[0]) -> RunSpec:
        return RunSpec(kind, size, width, replace(budget, steps=steps, seed=seed))

    # seed-major, so a run of the command that is stopped early leaves every variant with the same number of seeds
    specs = [spec(kind, size, seed=seed) for seed in seeds for size in args.image_sizes for kind in args.kinds]
    n_long = len(long_seeds) * len(args.long_kinds) if args.long_steps else 0
    n_scale = 2 * len(args.scale_kinds) if args.scale else 0  # the first width's runs may be comparison runs
    log(f"{len(specs)} comparison runs ({len(args.kinds)} variants x {len(args.image_sizes)} sizes x seeds {seeds}, "
         f"{args.steps} steps x batch {args.batch_size})" + (f" + up to {n_long} runs of {args.long_steps} steps"
                                                               if n_long else "")
         + (f" + up to {n_scale} scaling runs" if n_scale else "") + f"; runs in {runs_dir}, results to {args.out}"
         + (" (--no-train: finished runs only)" if args.no_train else ""))

    done: dict[RunSpec, RunResult] = {}
    failures: list[str] = []
    start = time.perf_counter()
    bar = tqdm(total=len(specs) + n_long + n_scale, desc="runs", unit="run", disable=args.no_progress)
    failures += run_specs(specs, launcher, done, jobs, not args.no_train, bar)
    rows = aggregate(specs, done)
    best = args.best or pick_best(rows, args.steps)
    log(f"best linear variant: {best}" + ("" if args.best else " (highest mean top-1 over the image sizes)"))

    def resolve(kinds: Sequence[str]) -> list[str]:
        if BEST in kinds and not best:
            log(f"no best linear variant yet (no linear run finished at every size): `{BEST}` left out")
        return list(dict.fromkeys(best if k == BEST else k for k in kinds if k != BEST or best))

    long_specs: list[RunSpec] = []
    if args.long_steps:
        long_specs = [spec(kind, long_size, steps=args.long_steps, seed=seed)
                      for seed in long_seeds for kind in resolve(args.long_kinds)]
        failures += run_specs(long_specs, launcher, done, jobs, not args.no_train, bar)
    rows = aggregate(specs + long_specs, done)

    timing: dict[str, dict] = {}
    sweep: dict[str, Any] = {}
    timing_batch = args.timing_batch or args.batch_size
    timing_specs = [spec(kind, size) for size in args.image_sizes for kind in args.kinds]
    earlier = json.loads(args.timing_from.read_text()) if args.timing_from else None
    if earlier:
        timing, sweep = earlier["timing"]["per_run"], earlier.get("sweep") or {}
        timing_info = dict(earlier["timing"]["info"], source=f"{args.timing_from} ({earlier.get('date')})")
        log(f"timing pass and sweep from {args.timing_from} ({earlier.get('date')})")
        absent = [s.shape_name for s in timing_specs if s.shape_name not in timing]
        if absent:
            log(f"  not in it (shown as -): {', '.join(absent)}")
    else:
        timing_info = {"rounds": args.timing_rounds, "batch_size": timing_batch,
                       "torch_threads": torch.get_num_threads()}
    if not earlier and args.timing_rounds > 0:
        log(f"interleaved timing pass: {args.timing_rounds} rounds x {len(args.kinds)} variants x "
             f"{len(args.image_sizes)} sizes, batch {timing_batch}")
        timing = interleaved_timing(timing_specs, args.timing_rounds, timing_batch, progress=not args.no_progress)
        for s in timing_specs:
            t = timing[s.shape_name]
            log(f"  {s.shape_name}: {t['images_per_s']:.1f} img/s (median of {len(t['seconds'])}), "
                 f"activations {t['activation_mib']:.1f} MiB")
    if args.sweep_sizes and args.timing_rounds > 0 and not earlier:
        sweep_kinds = resolve(args.sweep_kinds or args.kinds)
        if "softmax" not in sweep_kinds:
            sweep_kinds.insert(0, "softmax")  # the reference every ratio is against
        sweep_specs = [spec(kind, size) for size in args.sweep_sizes for kind in sweep_kinds]
        log(f"timing sweep: {sweep_kinds} at {args.sweep_sizes} px, batch {args.sweep_batch}, "
             f"{args.timing_rounds} rounds")
        per_run = interleaved_timing(sweep_specs, args.timing_rounds, args.sweep_batch, progress=not args.no_progress)
        sweep = {"batch_size": args.sweep_batch, "rounds": args.timing_rounds, "points": [
            {"kind": s.kind, "image_size": s.image_size, "tokens": s.tokens,
             "images_per_s": per_run[s.shape_name]["images_per_s"],
             "activation_mib": per_run[s.shape_name]["activation_mib"],
             "attention_flops_per_image": _attention_flops(s)} for s in sweep_specs]}
        for size in args.sweep_sizes:
            points = {p["kind"]: p for p in sweep["points"] if p["image_size"] == size}
            log(f"  {size} px ({points['softmax']['tokens']} tokens): " + ", ".join(
                f"{k} {p['images_per_s']:.1f} img/s" for k, p in points.items()))

    def report(scale_results: list[RunResult], fits: dict[str, dict]) -> None:
        checks = target_checks(rows, best, args.steps, args.long_steps, fits, sweep, timing)
        meta["load_average_end"] = load_average_1m()
        meta["wall_seconds"] = round(time.perf_counter() - start, 1)
        paths = write_report(args.out, command, budget, rows, timing, timing_info, scale_results, fits, meta, sweep,
                             best, checks)
        log("wrote " + ", ".join(str(p) for p in paths.values()) + f" ({meta['wall_seconds']:.0f} s)")
        for check in checks:
            log(f"  target {'met' if check['met'] else 'MISSED'}: {check['target']}: {check['measured']}")

    # the comparison is reported before --scale runs: a long --scale never holds back its results
    report([], {})
    print(markdown_table(TABLE_COLUMNS, table_rows(rows, timing)))
    if args.scale:
        scale_kinds = resolve(args.scale_kinds)
        scale_specs = [spec(kind, args.image_sizes[0], width=width) for width in args.scale_widths for kind in scale_kinds]
        failures += run_specs(scale_specs, launcher, done, jobs, not args.no_train, bar)
        scale_results = [done[s] for s in scale_specs if s in done]
        fits: dict[str, dict] = {}
        for kind in scale_kinds:
            points = [r for r in scale_results if r.kind == kind]
            if len(points) < len(args.scale_widths):
                log(f"scaling fit {kind}: only {len(points)} of {len(args.scale_widths)} widths finished: no fit")
                continue
            fits[kind] = fit_power_law([r.train_flops for r in points], [r.final_loss for r in points])
            log(f"scaling fit {kind}: loss = a * C^(-b), b = {fits[kind]['exponent']:.4f}, "
                 f"a = {fits[kind]['coefficient']:.4g} (R² {fits[kind]['r2']:.3f})")
        report(scale_results, fits)
    bar.close()
    if failures:
        print("error: some runs failed (left out of the tables):\n  " + "\n  ".join(f.splitlines()[0] for f in failures),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
