"""Does linear attention keep up with softmax as CLIP models grow? A compute-frontier scaling study.

    python -m ds_linclip.experiments.scaling --plan                 # the grid, its FLOPs and CPU-minutes
    python -m ds_linclip.experiments.scaling --jobs 2               # train what is missing, write the report
    python -m ds_linclip.experiments.scaling --no-train             # report what has finished
    python -m ds_linclip.experiments.scaling --quick --out /tmp/s   # tiny, for tests

Design (Hoffmann et al. 2022 approach 1; Cherti et al. 2023; Porian et al. 2024): several model sizes
(width, depth) per attention variant, each trained at a few peak learning rates (the sweep runs on the
first seed; the other seeds train at the size's best one, by final loss); every run logs its training loss
about 40 times, and each logged point is placed on a compute axis with the analytic training FLOPs of
ds_linclip.models.flops (attention, local branch and all). Per attention, the lower envelope of all its
runs' (compute, loss) points is the compute frontier; the frontiers of all attentions are fitted jointly
by L = E + A_k * C^-alpha_k with one irreducible loss E shared by all of them, beside a pure power law per
attention. Intervals come from a bootstrap over whole runs. The compute multiplier says how many times
less compute a linear model needs to reach the loss softmax reaches at the compute of its smallest and
largest size.

This module holds the grid, the plan, the analysis and the report; specs, runs, the launcher, fits and
plots are the experiments package's shared pieces.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from ds_linclip.experiments.fits import (bootstrap_curves, fit_compute_multiplier, compute_to_reach_loss, fit_power_law,
                                         fit_shared_floor, lower_envelope)
from ds_linclip.experiments.launcher import (Launcher, explicit_option, parse_study_args, prepare_process, run_specs,
                                             run_study)
from ds_linclip.experiments.plots import plot_envelope_fits, plot_metric_vs_compute
from ds_linclip.experiments.report import fmt, load_average_1m, machine_sentence, markdown_table, mean_std, run_meta, write_json
from ds_linclip.experiments.runs import (Budget, ExperimentError, RunResult, RunSpec, ensure_shards, log, model_cost_of,
                                         parse_seeds, read_scalars, set_log_prefix, train_flops_per_step,
                                         window_mean_loss)
from ds_linclip.experiments.variants import HEAD_DIM, VARIANT_GRAMMAR, variant_argument

REFERENCE = "softmax"  # every multiplier and exponent ratio is against it
DEFAULT_KINDS = (REFERENCE, "linear-focused-local3", "linear-affine")
DEFAULT_WIDTHS = (32, 48, 64, 96, 128)
DEFAULT_LAYERS = (2, 2, 2, 3, 3)  # depth grows with width: 2 layers up to width 64, then 3
DEFAULT_LRS = (5e-4, 1e-3, 2e-3)
CURVE_START = 0.25  # a curve enters the frontier from this fraction of its steps: before, warm-up and a high lr


@dataclass(frozen=True)
class Size:
    """One model size: both towers' width and layers, at one image size (px)."""

    width: int
    layers: int
    image_size: int

    @property
    def label(self) -> str:
        return f"w{self.width} L{self.layers} {self.image_size}px"


@dataclass(frozen=True)
class Grid:
    """What the study trains: sizes x attention kinds x learning rates (first seed) + the other seeds at the best lr."""

    sizes: tuple[Size, ...]
    kinds: tuple[str, ...]
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    steps: dict[int, int]  # width -> steps
    budget: Budget
    lrs_at: dict[int, tuple[float, ...]] = field(default_factory=dict)  # image size -> its lrs, where not `lrs`

    def lrs_for(self, size: Size) -> tuple[float, ...]:
        """The learning rates swept at this size's image size (a subset of `lrs`, in their order)."""
        return self.lrs_at.get(size.image_size, self.lrs)

    def spec(self, kind: str, size: Size, lr: float, seed: int) -> RunSpec:
        budget = replace(self.budget, layers=size.layers, lr=lr, steps=self.steps[size.width], seed=seed)
        return RunSpec(kind, size.image_size, size.width, budget, label=f"L{size.layers}-lr{lr:g}")

    def sweep(self) -> list[RunSpec]:
        """The first seed at every learning rate: lr-major in the order given, smallest sizes first, so a study
        stopped early has every size at the first learning rates (give the likeliest best first)."""
        return [self.spec(kind, size, lr, self.seeds[0]) for lr in self.lrs for size in self.sizes for kind in self.kinds
                if lr in self.lrs_for(size)]

    def at_best(self, best: dict[tuple[str, Size], float]) -> list[RunSpec]:
        """Every seed at each (kind, size)'s best lr (the first seed's run is a sweep run, reused); seed-major."""
        return [self.spec(kind, size, best[(kind, size)], seed) for seed in self.seeds
                for size in self.sizes for kind in self.kinds if (kind, size) in best]


def best_learning_rates(grid: Grid, done: dict[RunSpec, RunResult]) -> dict[tuple[str, Size], float]:
    """Per (kind, size): the lr whose first-seed run has the lowest final loss (among the finished ones)."""
    best = {}
    for size in grid.sizes:
        for kind in grid.kinds:
            finished = [(done[s].final_loss, lr) for lr in grid.lrs_for(size)
                        if (s := grid.spec(kind, size, lr, grid.seeds[0])) in done]
            if finished:
                best[(kind, size)] = min(finished)[1]
    return best


# ----------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class CostModel:
    """CPU-seconds of one run (one thread): start-up + train FLOPs / rate (+ the eval job for scored runs)."""

    flops_per_second: float
    startup_seconds: float = 20.0
    eval_seconds: float = 15.0
    source: str = ""

    def seconds(self, spec: RunSpec, scored: bool) -> float:
        return (self.startup_seconds + train_flops_per_step(spec) * spec.budget.steps / self.flops_per_second
                + (self.eval_seconds if scored else 0.0))


def measured_rate(specs: Sequence[RunSpec], runs_dir: Path, probe: RunSpec, rounds: int = 3) -> tuple[float, str]:
    """Training FLOP/s of one thread: the median over finished runs in runs_dir of the trainer's logged images/s
    x FLOPs per image (up to 6 runs read), else one interleaved timing pass of `probe` (plain PyTorch steps)."""
    rates = []
    for spec in specs:
        if len(rates) >= 6:
            break
        run_dir = runs_dir / spec.name
        if (run_dir / "DONE").is_file():
            series = [v for _, v in read_scalars(run_dir / "tensorboard").get("perf/images_per_s", [])][1:]
            if series:
                rates.append(statistics.median(series) * train_flops_per_step(spec) / spec.budget.batch_size)
    if rates:
        return statistics.median(rates), f"the trainer's logged images/s of {len(rates)} finished runs"
    from ds_linclip.experiments.timing import interleaved_timing

    images_per_s = interleaved_timing([probe], rounds, probe.budget.batch_size, progress=False)[probe.shape_name][
        "images_per_s"]
    return (images_per_s * train_flops_per_step(probe) / probe.budget.batch_size,
            f"a {rounds}-round timing pass of {probe.shape_name} (L{probe.budget.layers}, batch {probe.budget.batch_size})")


def plan_rows(grid: Grid, cost: CostModel, finished: set[str]) -> tuple[list[list[str]], float, float]:
    """Markdown rows of the plan (one per size and kind), the grid's CPU-minutes and those still to run.
    Seeds after the first count once each at an lr of the sweep (the cost does not depend on the lr)."""
    rows, total, todo = [], 0.0, 0.0
    for size in grid.sizes:
        for kind in grid.kinds:
            lrs = grid.lrs_for(size)
            specs = [(grid.spec(kind, size, lr, grid.seeds[0]), lr == lrs[0]) for lr in lrs]
            specs += [(grid.spec(kind, size, lrs[0], seed), True) for seed in grid.seeds[1:]]
            minutes = [cost.seconds(s, scored) / 60 for s, scored in specs]
            left = sum(m for (s, _), m in zip(specs, minutes) if s.name not in finished)
            total, todo = total + sum(minutes), todo + left
            per_step = train_flops_per_step(specs[0][0])
            params = model_cost_of(specs[0][0]).params
            rows.append([kind, size.label, str(max(1, size.width // HEAD_DIM)), f"{params / 1e6:.3f}",
                         str(grid.steps[size.width]), str(len(specs)), f"{per_step / 1e9:.2f}",
                         f"{per_step * grid.steps[size.width] * len(specs) / 1e12:.2f}", f"{sum(minutes):.1f}",
                         f"{left:.1f}"])
    return rows, total, todo


PLAN_HEADER = ["attention", "size", "heads", "params (M)", "steps", "runs", "GFLOPs/step", "train TFLOPs (all runs)",
               "CPU-min", "CPU-min to run"]


# ----------------------------------------------------------------------------- analysis


def smoothed_curve(result: RunResult, start: float = CURVE_START) -> list[tuple[float, float]]:
    """A run's logged losses from `start` x its steps on, each the mean over the trailing 10% of the steps seen
    (`window_mean_loss`), at compute = step x FLOPs per step: [(FLOPs, loss)]."""
    return [(step * result.flops_per_step, window_mean_loss(result.loss_curve, step))
            for step, _ in result.loss_curve if step >= start * result.steps]


def frontier(curves: Sequence[Sequence[tuple[float, float]]]) -> list[tuple[float, float]]:
    return lower_envelope([point for curve in curves for point in curve])


def joint_fit(curves: dict[str, list[list[tuple[float, float]]]], start: dict[str, dict] | None = None) -> dict[str, dict]:
    """fit_shared_floor on each kind's frontier."""
    groups = {}
    for kind, runs in curves.items():
        points = frontier(runs)
        groups[kind] = ([c for c, _ in points], [v for _, v in points])
    return fit_shared_floor(groups, start=start)


def fit_statistic(curves: dict[str, list[list[tuple[float, float]]]], start: dict[str, dict]) -> dict[str, float]:
    """What the bootstrap records of one resample: E, every kind's alpha and A, and alpha / the reference's."""
    fits = joint_fit(curves, start)
    out = {"E": next(iter(fits.values()))["irreducible"]}
    for kind, f in fits.items():
        out[f"{kind}.exponent"] = f["exponent"]
        out[f"{kind}.coefficient"] = f["coefficient"]
        if REFERENCE in fits and kind != REFERENCE and fits[REFERENCE]["exponent"] > 0:
            out[f"{kind}.ratio"] = f["exponent"] / fits[REFERENCE]["exponent"]
    return out


def verdict(kind: str, ratio: float, interval: tuple[float, float] | None, multipliers: dict[str, Any]) -> str:
    """One sentence on `kind` against softmax, from the exponent ratio, its interval and the multipliers."""
    if interval is None:
        judged = f"α ratio {ratio:.2f} (no interval: too few runs to resample)"
    elif interval[0] > 1:
        judged = f"scales better than softmax: α ratio {ratio:.2f}, 95% interval [{interval[0]:.2f}, {interval[1]:.2f}] above 1"
    elif interval[1] < 1:
        judged = f"scales worse than softmax: α ratio {ratio:.2f}, 95% interval [{interval[0]:.2f}, {interval[1]:.2f}] below 1"
    else:
        width = interval[1] - interval[0]
        judged = (f"shows no measurable difference in scaling from softmax: α ratio {ratio:.2f}, 95% interval "
                  f"[{interval[0]:.2f}, {interval[1]:.2f}] contains 1"
                  + (" (an interval this wide is weak evidence either way)" if width > 0.5 else ""))
    def said(m: float) -> str:
        return f"{m:.2f}x" if m >= 1 else f"{1 / m:.2f}x MORE compute"

    parts = []
    for where in ("smallest", "largest"):
        m, measured = multipliers.get(where, {}).get("fit"), multipliers.get(where, {}).get("frontier")
        if m is not None:
            parts.append(f"{said(m)} at the {where} size"
                         + (f" (but the measured frontier says {said(measured)}: the fitted law does not describe "
                            "this size)" if measured is not None and (m >= 1) != (measured >= 1) else ""))
    need = ("; compute multiplier (softmax's compute / the compute it needs for softmax's loss, >1 = it needs less): "
            + ", ".join(parts)) if parts else ""
    return f"**{kind}** {judged}{need}."


def analyse(grid: Grid, size_group: Sequence[Size], done: dict[RunSpec, RunResult], best: dict[tuple[str, Size], float],
            resamples: int, level: float = 0.95) -> dict[str, Any]:
    """Frontiers, joint and pure fits, bootstrap intervals, multipliers and verdicts for one image size."""
    curves: dict[str, list[list[tuple[float, float]]]] = {}
    for kind in grid.kinds:
        runs = [done[s] for size in size_group for lr in grid.lrs for seed in grid.seeds
                if (s := grid.spec(kind, size, lr, seed)) in done]
        kept = [c for c in (smoothed_curve(r) for r in runs) if len(c) >= 2]
        if kept:
            curves[kind] = kept
    frontiers = {kind: frontier(runs) for kind, runs in curves.items()}
    pure = {kind: fit_power_law(*zip(*points)) for kind, points in frontiers.items() if len(points) >= 3}
    out: dict[str, Any] = {"image_size": size_group[0].image_size, "runs": {k: len(v) for k, v in curves.items()},
                           "frontiers": frontiers, "pure_fits": pure, "fits": {}, "intervals": {}, "multipliers": {},
                           "verdicts": {}, "curves": curves}
    try:
        fits = joint_fit(curves)
    except ValueError as err:
        out["fit_error"] = str(err)
        return out
    out["fits"] = fits
    if resamples and all(len(runs) >= 2 for runs in curves.values()):
        out["intervals"] = bootstrap_curves(lambda drawn: fit_statistic(drawn, fits), curves, resamples, level)
    out["resamples"] = resamples
    if REFERENCE not in fits:
        return out

    def final(kind: str, size: Size) -> tuple[float, float] | None:
        """(compute, mean final loss over seeds) of a kind's runs at its best lr."""
        if (kind, size) not in best:
            return None
        runs = [done[s] for seed in grid.seeds if (s := grid.spec(kind, size, best[(kind, size)], seed)) in done]
        return (runs[0].train_flops, statistics.fmean(r.final_loss for r in runs)) if runs else None

    for kind in fits:
        if kind == REFERENCE:
            continue
        ratio = fits[kind]["exponent"] / fits[REFERENCE]["exponent"] if fits[REFERENCE]["exponent"] > 0 else float("nan")
        multipliers = {}
        for where, size in (("smallest", size_group[0]), ("largest", size_group[-1])):
            reached = final(REFERENCE, size)
            if reached is None:
                continue
            compute, loss = reached
            empirical = compute_to_reach_loss(frontiers[kind], loss)
            multipliers[where] = {"size": size.label, "softmax_compute": compute, "softmax_final_loss": loss,
                                  "fit": fit_compute_multiplier(compute, fits[REFERENCE], fits[kind]),
                                  "frontier": compute / empirical if empirical else None}
        out["multipliers"][kind] = multipliers
        interval = out["intervals"].get(f"{kind}.ratio")
        out["verdicts"][kind] = verdict(kind, ratio, interval, multipliers)
        fits[kind]["ratio_to_softmax"] = ratio
    return out


# ----------------------------------------------------------------------------- report


def _interval(intervals: dict[str, tuple[float, float]], key: str, spec: str) -> str:
    return f"[{format(intervals[key][0], spec)}, {format(intervals[key][1], spec)}]" if key in intervals else "-"


def headline_rows(analysis: dict[str, Any]) -> list[list[str]]:
    rows = []
    fits, intervals, pure = analysis["fits"], analysis["intervals"], analysis["pure_fits"]
    for kind, f in fits.items():
        m = analysis["multipliers"].get(kind, {})
        rows.append([kind, str(analysis["runs"].get(kind, 0)), f"{f['exponent']:.3f} {_interval(intervals, kind + '.exponent', '.3f')}",
                     f"{f['coefficient']:.4g}",
                     fmt(f.get("ratio_to_softmax"), ".2f") + (" " + _interval(intervals, kind + ".ratio", ".2f")
                                                               if kind != REFERENCE else ""),
                     f"{pure[kind]['exponent']:.3f} (R² {pure[kind]['r2']:.2f})" if kind in pure else "-",
                     fmt(m.get("smallest", {}).get("fit"), ".2f") + " / " + fmt(m.get("smallest", {}).get("frontier"), ".2f"),
                     fmt(m.get("largest", {}).get("fit"), ".2f") + " / " + fmt(m.get("largest", {}).get("frontier"), ".2f")])
    return rows


HEADLINE_HEADER = ["attention", "runs", "α (E + A·C^-α, E shared) [95%]", "A", "α / α_softmax [95%]",
                   "pure power law α (R²)", "multiplier, smallest size: fit / frontier",
                   "multiplier, largest size: fit / frontier"]


def size_rows(grid: Grid, done: dict[RunSpec, RunResult], best: dict[tuple[str, Size], float]) -> list[list[str]]:
    rows = []
    for size in grid.sizes:
        for kind in grid.kinds:
            lr = best.get((kind, size))
            runs = [done[s] for seed in grid.seeds if lr is not None and (s := grid.spec(kind, size, lr, seed)) in done]
            sweep = [fmt(done[s].final_loss, ".3f") if (s := grid.spec(kind, size, x, grid.seeds[0])) in done else "-"
                     for x in sorted(grid.lrs)]
            first = runs[0] if runs else None
            rows.append([kind, size.label, fmt(first.params / 1e6 if first else None, ".3f"),
                         str(grid.steps[size.width]), fmt(first.train_flops / 1e12 if first else None, ".3f"),
                         " / ".join(sweep), fmt(lr, "g"), mean_std(r.final_loss for r in runs).cell(".3f"),
                         mean_std(r.top1 for r in runs).cell(".1f", 100)])
    return rows


SIZE_HEADER = ["attention", "size", "params (M)", "steps", "train TFLOPs", "final loss at lr {lrs} (first seed)",
               "best lr", "final loss at best lr", "zero-shot top-1 %"]


def runs_span_minutes(runs_dir: Path, names: Sequence[str]) -> float | None:
    """Minutes from the first of these runs' start (its config.yaml) to the last one's end (its DONE or eval
    JSON): the wall time the grid took, over however many invocations trained it."""
    starts = [(runs_dir / n / "config.yaml").stat().st_mtime for n in names if (runs_dir / n / "config.yaml").is_file()]
    ends = [(runs_dir / n / end).stat().st_mtime for n in names for end in ("DONE", "eval/final_zeroshot.json")
            if (runs_dir / n / end).is_file()]
    return (max(ends) - min(starts)) / 60 if starts and ends else None


def write_report(out: Path, command: str, grid: Grid, done: dict[RunSpec, RunResult], best: dict[tuple[str, Size], float],
                 analyses: list[dict[str, Any]], meta: dict[str, Any], missing: list[str], plan: dict[str, Any]) -> dict[str, Path]:
    """scaling.md, scaling.json, scaling_loss_vs_compute.png (+ _56px... per extra image size) and
    scaling_accuracy_vs_compute.png into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "scaling.md", "json": out / "scaling.json"}
    for a in analyses:
        suffix = "" if a is analyses[0] else f"_{a['image_size']}px"
        if a["curves"]:
            paths[f"loss_png{suffix}"] = out / f"scaling_loss_vs_compute{suffix}.png"
            plot_envelope_fits(a["curves"], a["frontiers"], a["fits"], a["pure_fits"], paths[f"loss_png{suffix}"],
                               title=f"{a['image_size']} px: loss vs compute, every run (thin), the frontier (dots), "
                                     "joint fit (dashed), pure power law (dotted)")
    accuracy: dict[tuple[str, str], list] = {}
    for size in grid.sizes:
        for kind in grid.kinds:
            lr = best.get((kind, size))
            runs = [done[s] for seed in grid.seeds if lr is not None and (s := grid.spec(kind, size, lr, seed)) in done]
            scored = [r for r in runs if r.top1 is not None]
            if scored:
                stat = mean_std(100 * r.top1 for r in scored)
                accuracy.setdefault((kind, f"{size.image_size}px"), []).append((scored[0].train_flops, stat.mean, stat.std, f"w{size.width}"))
    if accuracy:
        paths["accuracy_png"] = out / "scaling_accuracy_vs_compute.png"
        plot_metric_vs_compute(accuracy, paths["accuracy_png"], "zero-shot top-1 % (best lr; mean ± std over seeds)",
                               "Zero-shot accuracy vs training compute per attention (one point per size)")

    b = grid.budget
    md = ["# Scaling: does linear attention keep up with softmax as CLIP models grow?", "",
          f"Command: `{command}`  ", machine_sentence(meta) + f" This invocation: {meta['wall_seconds'] / 60:.1f} min; "
          f"the {len(done)} finished runs span {fmt(meta.get('runs_span_minutes'), '.1f')} min of wall time from the "
          f"first start to the last end ({meta['jobs']} runs at a time, one thread each).", ""]
    for a in analyses:
        md += [f"## {a['image_size']} px ({(a['image_size'] // b.patch_size) ** 2 + 1} image tokens)", ""]
        if a.get("fit_error") or not a["fits"]:
            md += [f"No joint fit: {a.get('fit_error', 'no finished runs')}.", ""]
            continue
        energy = next(iter(a["fits"].values()))["irreducible"]
        md += [markdown_table(HEADLINE_HEADER, headline_rows(a)), "",
               f"Shared irreducible loss E = {energy:.3f} {_interval(a['intervals'], 'E', '.3f')}. Intervals: "
               + (f"{a.get('resamples')} bootstrap resamples of whole runs per attention (percentile, 95%)."
                  if a["intervals"] else "none (" + ("--resamples 0" if not a.get("resamples") else
                                                     "fewer than 2 runs of some attention") + ")."), ""]
        md += [v for v in a["verdicts"].values()] + [""]
    md += ["## Runs", "", markdown_table([h.format(lrs=" / ".join(f"{x:g}" for x in sorted(grid.lrs))) for h in SIZE_HEADER],
                                         size_rows(grid, done, best)), ""]
    if missing:
        md += [f"Not finished ({len(missing)}; a later run of the same command trains them, finished runs are reused): "
               + ", ".join(missing) + ".", ""]
    steps_text = ", ".join(f"w{w}: {s}" for w, s in grid.steps.items())
    md += [
        "## How it was measured", "",
        f"- Sizes: {', '.join(s.label for s in grid.sizes)}; both towers the same width and depth, heads = "
        f"max(1, width // {HEAD_DIM}) (a width that is not a multiple of {HEAD_DIM} has one head of its width), "
        f"embed dim = width, patch {b.patch_size}, text context {b.context_length}. Attention of both towers by the "
        f"row's variant ({VARIANT_GRAMMAR}).",
        f"- Training: our trainer (one process, DeepSpeed ZeRO-0, fp32, CPU), batch {b.batch_size}, steps per width "
        f"{steps_text}; AdamW, weight decay {b.weight_decay:g}, warm-up 10% of the steps then cosine to 0; peak lr "
        f"{', '.join(f'{x:g}' for x in grid.lrs)} on seed {grid.seeds[0]}"
        + "".join(f" ({', '.join(f'{x:g}' for x in lrs)} only at {px} px)" for px, lrs in grid.lrs_at.items())
        + ", seeds "
        f"{', '.join(map(str, grid.seeds[1:])) or '(none)'} at each size's best lr (lowest final loss: the mean of the "
        "logged losses over the last 10% of the steps).",
        "- Compute: analytic training FLOPs (`ds_linclip.models.flops`: 3 x forward of one image and one caption, "
        "attention and the local branch included) x samples seen; each logged loss (every 1/40 of the steps) sits at "
        "step x FLOPs per step.",
        f"- Frontier: per attention, every run's curve (all sizes, lrs and seeds) from {CURVE_START:.0%} of its steps "
        "on (earlier: warm-up and the highest lr), each point the mean of the logged losses over the trailing 10% of "
        "the steps; the lower envelope of all of them (the lowest loss reached at or below each compute).",
        "- Fits: the frontiers of all attentions jointly, L = E + A_k·C^-α_k with one E, Huber loss (δ = 1e-3) on "
        "log L (Hoffmann et al. 2022), scipy least_squares from a grid of starts; beside it a pure power law "
        "L = A·C^-α per attention (least squares in log-log).",
        "- Compute multiplier: softmax's compute at its smallest/largest size (best lr) divided by the compute the "
        "linear model needs to reach the loss softmax reaches there: **fit** from the two fitted laws at that "
        "compute; **frontier** from softmax's measured final loss and the linear frontier (log-log interpolation; "
        "`-` where the frontier does not bracket it). > 1: the linear model needs less compute.",
        "- Zero-shot: our eval job on the Fashion-MNIST test split "
        f"({'first ' + str(b.eval_samples) + ' images' if b.eval_samples else 'all 10,000 images'}, templates "
        f"`{b.eval_templates}`), runs at the best lr only.",
        f"- Plan: {plan['source']}; estimated {plan['total_cpu_minutes']:.0f} CPU-minutes for the grid, "
        f"{plan['todo_cpu_minutes']:.0f} of them still to run at the start of this invocation.",
        "",
        "Plots: " + ", ".join(f"`{p.name}`" for k, p in paths.items() if k.endswith("png") or "png" in k), "",
    ]
    paths["markdown"].write_text("\n".join(md))
    payload = {
        "command": command, **meta, "budget": asdict(b), "grid": {
            "sizes": [asdict(s) for s in grid.sizes], "kinds": list(grid.kinds), "lrs": list(grid.lrs),
            "lrs_at": {str(px): list(lrs) for px, lrs in grid.lrs_at.items()},
            "seeds": list(grid.seeds), "steps": grid.steps}, "plan": plan,
        "best_lr": [{"kind": k, **asdict(s), "lr": lr} for (k, s), lr in best.items()],
        "analyses": [{k: v for k, v in a.items() if k != "curves"} for a in analyses],
        "missing": missing,
        "runs": [asdict(r) for r in done.values()],
    }
    write_json(paths["json"], payload)
    return paths


# ----------------------------------------------------------------------------- CLI


QUICK = {"widths": [32, 48], "layers": [1, 1], "steps": [6], "batch_size": 8, "image_size": 12, "lrs": [1e-3, 3e-3],
         "seeds": [2], "kinds": [REFERENCE, "linear-focused-local3"], "eval_samples": 200, "eval_templates": "simple",
         "eval_batch_size": 100, "resamples": 20, "rate_gflops": 1.0}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ds_linclip.experiments.scaling",
        description=("Compute-frontier scaling study of softmax vs linear attention CLIPs on Fashion-MNIST: model sizes "
                     "x attention x learning rates (+ seeds at the best lr) with our trainer, the loss curves on an "
                     "analytic FLOPs axis, the lower envelope per attention fitted jointly by L = E + A·C^-α (E shared), "
                     "bootstrap intervals, compute multipliers and zero-shot accuracy. Writes scaling.md, scaling.json "
                     "and PNGs to --out."),
        epilog=(f"attention variants: {VARIANT_GRAMMAR}\n"
                "examples:\n"
                "  python -m ds_linclip.experiments.scaling --plan --max-cpu-minutes 480\n"
                "  python -m ds_linclip.experiments.scaling --jobs 2 --max-cpu-minutes 480\n"
                "  python -m ds_linclip.experiments.scaling --kinds softmax linear-focused-local3 --large-widths\n"
                "  python -m ds_linclip.experiments.scaling --no-train   # report the runs that have finished\n"
                "Each run is one folder in --runs-dir; a finished one with the same resolved config is reused, so a "
                "later run of the same command trains only what is missing."),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", nargs="+", type=variant_argument, default=list(DEFAULT_KINDS), metavar="VARIANT",
                        help=f"attention variants, {REFERENCE} first-class as the reference (default: %(default)s)")
    parser.add_argument("--widths", nargs="+", type=int, default=list(DEFAULT_WIDTHS), help="model widths (default %(default)s)")
    parser.add_argument("--layers", nargs="+", type=int, default=list(DEFAULT_LAYERS),
                        help="layers per tower, one per width (default %(default)s)")
    parser.add_argument("--steps", nargs="+", type=int, default=[500],
                        help="training steps: one value for every width, or one per width (default %(default)s)")
    parser.add_argument("--image-size", type=int, default=28, help="image size, px (default %(default)s: 50 tokens)")
    parser.add_argument("--large-size", type=int, default=56,
                        help="a second, larger image size trained at --large-widths (default %(default)s: 197 tokens)")
    parser.add_argument("--large-widths", nargs="*", type=int, default=[32, 64],
                        help="the widths also trained at --large-size (default %(default)s; none = skip it)")
    parser.add_argument("--lrs", nargs="+", type=float, default=list(DEFAULT_LRS),
                        help="peak learning rates swept on the first seed (default %(default)s)")
    parser.add_argument("--large-lrs", nargs="+", type=float, default=None,
                        help="the learning rates swept at --large-size, a subset of --lrs (default: all of --lrs); "
                             "the way to cut the costly size's sweep to the lrs that made the small size's envelope")
    parser.add_argument("--seeds", nargs="+", type=int, default=[2], metavar="S",
                        help="--seeds N: 0..N-1; --seeds A B ...: those (default: 2). Seeds after the first train at "
                             "the best lr of the first")
    parser.add_argument("--batch-size", type=int, default=128, help="batch per step (default %(default)s)")
    parser.add_argument("--eval-samples", type=int, default=2000, help="zero-shot test images (default %(default)s)")
    parser.add_argument("--eval-templates", default="openai", help="zero-shot templates (default %(default)s)")
    parser.add_argument("--eval-batch-size", type=int, default=500, help="eval batch (default %(default)s)")
    parser.add_argument("--resamples", type=int, default=300, help="bootstrap resamples (default %(default)s)")
    parser.add_argument("--plan", action="store_true", help="print the grid, its FLOPs and CPU-minutes, and stop")
    parser.add_argument("--max-cpu-minutes", type=float, default=None,
                        help="refuse to start when the runs still to train are estimated above this many CPU-minutes")
    parser.add_argument("--rate-gflops", type=float, default=None,
                        help="training GFLOP/s of one thread for the plan (default: measured, from finished runs' "
                             "logged images/s or a short timing pass at width 64)")
    parser.add_argument("--startup-seconds", type=float, default=20.0,
                        help="per-run trainer start-up in the plan (default %(default)s)")
    parser.add_argument("--eval-seconds", type=float, default=15.0, help="per scored run in the plan (default %(default)s)")
    parser.add_argument("--no-train", action="store_true", help="train nothing: report the runs that have finished")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (subprocess launcher; default %(default)s)")
    parser.add_argument("--data", type=Path, default=Path("data/fmnist"), help="Fashion-MNIST shards (written if missing)")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/scaling"), help="run folders (default %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("docs/results"), help="report folder (default %(default)s)")
    parser.add_argument("--launcher", choices=("subprocess", "inprocess"), default=None,
                        help="trainer/eval as subprocesses (default) or in this process (the default with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny everything for tests: " + ", ".join(f"{k}={v}" for k, v in QUICK.items())
                             + ", no --large-size (explicit options still win)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process (default %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def build_grid(args: argparse.Namespace) -> Grid:
    """The Grid of the parsed options; ExperimentError naming the option when they do not fit together."""
    if len(args.layers) != len(args.widths):
        raise ExperimentError(f"--layers gives {len(args.layers)} values for {len(args.widths)} --widths: give one per width")
    if len(args.steps) not in (1, len(args.widths)):
        raise ExperimentError(f"--steps gives {len(args.steps)} values: give one, or one per width ({len(args.widths)})")
    if min(args.steps) < 1 or args.batch_size < 1 or min(args.lrs) <= 0:
        raise ExperimentError("--steps, --batch-size and --lrs must be positive")
    if REFERENCE not in args.kinds:
        raise ExperimentError(f"--kinds must include {REFERENCE}: the exponents and multipliers are against it")
    unknown = [w for w in args.large_widths if w not in args.widths]
    if unknown:
        raise ExperimentError(f"--large-widths {unknown} are not in --widths")
    for size in [args.image_size] + ([args.large_size] if args.large_widths else []):
        if size % 4:
            raise ExperimentError(f"image size {size} is not a multiple of the patch size 4")
    large_lrs = args.large_lrs if args.large_widths else None
    if large_lrs is not None and (stray := [x for x in large_lrs if x not in args.lrs]):
        raise ExperimentError(f"--large-lrs {stray} are not in --lrs {args.lrs}")
    layers = dict(zip(args.widths, args.layers))
    sizes = [Size(w, layers[w], args.image_size) for w in args.widths]
    sizes += [Size(w, layers[w], args.large_size) for w in args.widths if w in args.large_widths]
    budget = Budget(batch_size=args.batch_size, eval_samples=args.eval_samples, eval_templates=args.eval_templates,
                    eval_batch_size=args.eval_batch_size)
    steps = dict(zip(args.widths, args.steps * len(args.widths) if len(args.steps) == 1 else args.steps))
    lrs_at = {} if large_lrs is None else {args.large_size: tuple(x for x in args.lrs if x in large_lrs)}
    return Grid(tuple(sizes), tuple(dict.fromkeys(args.kinds)), tuple(args.lrs), tuple(parse_seeds(args.seeds)), steps,
                budget, lrs_at)


def main(argv: Sequence[str] | None = None) -> int:
    set_log_prefix("scaling")
    return run_study(lambda: _main(argv))


def _main(argv: Sequence[str] | None = None) -> int:
    args, argv = parse_study_args(build_parser(), argv, QUICK)
    if args.quick and not explicit_option(argv, "--large-widths"):
        args.large_widths = []
    grid = build_grid(args)
    launcher_mode = args.launcher or ("inprocess" if args.quick else "subprocess")
    jobs = args.jobs if launcher_mode == "subprocess" else 1
    prepare_process(args.threads)
    command = "python -m ds_linclip.experiments.scaling " + shlex.join(argv)
    runs_dir = args.runs_dir.expanduser().resolve()
    sweep = grid.sweep()
    finished = {p.name for p in runs_dir.glob("*") if (p / "DONE").is_file()} if runs_dir.is_dir() else set()

    probe_width = 64 if 64 in grid.steps else grid.sizes[0].width
    probe = next(s for s in sweep if s.width == probe_width)
    if args.rate_gflops:
        rate, source = args.rate_gflops * 1e9, f"a given rate of {args.rate_gflops:g} GFLOP/s"
    else:
        rate, source = measured_rate(sweep, runs_dir, probe)
    cost = CostModel(rate, args.startup_seconds, args.eval_seconds, source)
    rows, total, todo = plan_rows(grid, cost, finished)
    plan = {"source": f"{rate / 1e9:.1f} GFLOP/s per thread from {source}, + {args.startup_seconds:g} s start-up per "
                      f"run, + {args.eval_seconds:g} s per scored run", "flops_per_second": rate,
            "total_cpu_minutes": total, "todo_cpu_minutes": todo, "jobs": jobs}
    log(f"plan: {plan['source']}")
    print(markdown_table(PLAN_HEADER, rows))
    print(f"grid: {total:.0f} CPU-minutes, {todo:.0f} still to run (~{todo / max(1, jobs):.0f} wall-minutes at "
          f"{jobs} job(s) x {args.threads or 'default'} thread(s) on free cores)")
    sys.stdout.flush()
    if args.plan:
        return 0
    if args.max_cpu_minutes is not None and todo > args.max_cpu_minutes and not args.no_train:
        raise ExperimentError(f"the runs still to train need an estimated {todo:.0f} CPU-minutes, above "
                              f"--max-cpu-minutes {args.max_cpu_minutes:g}: cut --steps, --lrs, --seeds or "
                              "--large-widths (see --plan)")

    from tqdm import tqdm

    meta = {**run_meta(), "launcher": launcher_mode, "jobs": jobs}
    data_dir = ensure_shards(args.data)
    runs_dir.mkdir(parents=True, exist_ok=True)
    launcher = Launcher(launcher_mode, runs_dir, data_dir)
    done: dict[RunSpec, RunResult] = {}
    start = time.perf_counter()
    bar = tqdm(total=len(sweep) + len(grid.sizes) * len(grid.kinds) * (len(grid.seeds) - 1), desc="runs", unit="run",
               disable=args.no_progress)
    failures = run_specs(sweep, launcher, done, jobs, not args.no_train, bar, evaluate=False)
    best = best_learning_rates(grid, done)
    scored = grid.at_best(best)
    for spec in scored:  # the first seed's best run was trained unscored in the sweep: run_one now scores it
        if spec in done and done[spec].top1 is None:
            del done[spec]
    failures += run_specs(scored, launcher, done, jobs, not args.no_train, bar, evaluate=True)
    bar.close()
    missing = [s.name for s in sweep + scored if s not in done]
    analyses = []
    for image_size in dict.fromkeys(s.image_size for s in grid.sizes):
        group = [s for s in grid.sizes if s.image_size == image_size]
        log(f"{image_size} px: frontier fits and {args.resamples} bootstrap resamples")
        analyses.append(analyse(grid, group, done, best, args.resamples))
        for line in analyses[-1]["verdicts"].values():
            log("  " + line.replace("**", ""))
    meta["load_average_end"] = load_average_1m()
    meta["wall_seconds"] = round(time.perf_counter() - start, 1)
    meta["runs_span_minutes"] = runs_span_minutes(runs_dir, [r.name for r in done.values()])
    paths = write_report(args.out, command, grid, done, best, analyses, meta, missing, plan)
    log("wrote " + ", ".join(str(p) for p in paths.values()))
    if failures:
        print("error: some runs failed (left out):\n  " + "\n  ".join(f.splitlines()[0] for f in failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
