"""Where linear attention sits on the accuracy-vs-training-compute frontier, against softmax with
the token-reduction tools in use today (FLIP patch dropout, CLIPA-style low-then-high resolution).

    python -m ds_linclip.experiments.frontier --plan          # the grid, FLOPs, estimated CPU-minutes
    python -m ds_linclip.experiments.frontier --jobs 2        # probe + frontier, finished runs reused
    python -m ds_linclip.experiments.frontier --quick --out /tmp/frontier

Two parts, one report (docs/results/frontier.md/.json + frontier.png):

1. the probe: do more tokens pay on this task? softmax at the low and the full input resolution
   (fixed patch size, so 4x the tokens), equal steps, several seeds. The data are Fashion-MNIST
   items drawn small on a larger canvas (`python -m ds_linclip.data.writer fashion-mnist-canvas`):
   at half the resolution an item keeps half its pixels per side.
2. the frontier: every configuration (attention x patch dropout x phases) trained to the same
   training-FLOP budgets (ds_linclip.models.flops, forward + backward = 3 x forward, per phase, the
   dropped tokens and the local branch counted as the trainer runs them), scored by the eval job.
"""

from __future__ import annotations

import argparse
import math
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from ds_linclip.experiments.fits import lower_envelope
from ds_linclip.experiments.launcher import Launcher, failures_exit_code, parse_study_args, prepare_process, run_specs, run_study
from ds_linclip.experiments.report import (fmt, load_average_1m, machine_sentence, markdown_table,
                                           mean_std, run_meta, write_json)
from ds_linclip.experiments.runs import (Budget, RunResult, RunSpec, log, parse_seeds, phase_flops, planned_phases,
                                        resolved_run, set_log_prefix, train_flops)

# ----------------------------------------------------------------------------- configurations


@dataclass(frozen=True)
class Phase:
    """One entry of train.phases: a fraction of the steps at `image_size` px (None: the full size) with
    `patch_dropout` (None: the configuration's)."""

    fraction: float
    image_size: int | None = None
    patch_dropout: float | None = None

    def yaml(self) -> str:
        fields = [f"fraction: {self.fraction:g}"]
        if self.image_size is not None:
            fields.append(f"image_size: {self.image_size}")
        if self.patch_dropout is not None:
            fields.append(f"patch_dropout: {self.patch_dropout:g}")
        return "{" + ", ".join(fields) + "}"


@dataclass(frozen=True)
class Config:
    """One point family of the frontier: an attention variant, a patch dropout, optional phases.
    `name` is its row and (unless plain) its run folders' label."""

    name: str
    kind: str
    patch_dropout: float = 0.0
    phases: tuple[Phase, ...] = ()

    @property
    def linear(self) -> bool:
        return self.kind.startswith("linear")

    def overrides(self) -> tuple[str, ...]:
        out = []
        if self.patch_dropout:
            out.append(f"model.image.patch_dropout={self.patch_dropout:g}")
        if self.phases:
            out.append("train.phases=[" + ", ".join(p.yaml() for p in self.phases) + "]")
        return tuple(out)

    def describe(self, full_size: int) -> str:
        if not self.phases:
            return f"{full_size} px, dropout {self.patch_dropout:g}"
        return " -> ".join(
            f"{p.fraction:.0%} at {p.image_size or full_size} px, dropout "
            f"{self.patch_dropout if p.patch_dropout is None else p.patch_dropout:g}" for p in self.phases)

    def spec(self, image_size: int, width: int, budget: Budget) -> RunSpec:
        # the plain configuration keeps the unlabelled run folder, so the probe's full-size runs are reused
        label = "" if self.name == self.kind and not self.overrides() else self.name
        return RunSpec(self.kind, image_size, width, budget, overrides=self.overrides(), label=label)


LINEAR = "linear-focused-local3"


def default_configs(low_size: int) -> list[Config]:
    """softmax, softmax + FLIP dropout 0.5, the recommended linear variant, linear + dropout 0.5, and a
    CLIPA-style schedule for each attention: 80% of the steps at `low_size` px, then 20% at the full size."""
    low_then_full = (Phase(0.8, image_size=low_size), Phase(0.2))
    return [Config("softmax", "softmax"), Config("softmax-pd0.5", "softmax", patch_dropout=0.5),
            Config(LINEAR, LINEAR), Config("linear-pd0.5", LINEAR, patch_dropout=0.5),
            Config("softmax-lowres0.8", "softmax", phases=low_then_full),
            Config("linear-lowres0.8", LINEAR, phases=low_then_full)]


# ----------------------------------------------------------------------------- FLOPs and steps


def steps_for_flops(spec: RunSpec, flops: float) -> int:
    """The step count (>= 1) whose run spends the training FLOPs closest to `flops`, phases included
    (their boundaries round with the step count, so the neighbours of the first estimate are tried)."""
    phases = phase_flops(spec.with_steps(1000))
    per_step, fractions = [p for _, p in phases], [s / 1000 for s, _ in phases]
    estimate = max(1, round(flops / sum(f * p for f, p in zip(fractions, per_step))))
    candidates = [s for s in range(max(1, estimate - 2), estimate + 3) if s >= len(per_step)]
    return min(candidates, key=lambda s: (abs(train_flops(spec.with_steps(s)) - flops), s))


# ----------------------------------------------------------------------------- frontier and multiplier


def pareto_frontier(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The accuracy-vs-compute frontier of (compute, accuracy) points: sorted by compute, each point more
    accurate than every point at smaller or equal compute."""
    return [(c, -negative) for c, negative in lower_envelope([(c, -a) for c, a in points])]


def compute_to_reach_accuracy(curve: Sequence[tuple[float, float]], target: float) -> float | None:
    """The compute at which a (compute, accuracy) curve first reaches `target`, interpolated linearly in
    log(compute) between the two measured budgets around the crossing. None when the curve never reaches
    `target`, or already exceeds it at its smallest budget (the crossing lies below what was measured)."""
    ordered = sorted(curve)
    for index, (compute, accuracy) in enumerate(ordered):
        if accuracy >= target:
            if index == 0:
                return compute if accuracy == target else None
            c0, a0 = ordered[index - 1]
            share = (target - a0) / (accuracy - a0)
            return math.exp(math.log(c0) + share * (math.log(compute) - math.log(c0)))
    return None


def compute_ratio_at_accuracy(linear_curve: Sequence[tuple[float, float]],
                              softmax_curve: Sequence[tuple[float, float]], target: float) -> float | None:
    """compute(linear reaches target) / compute(softmax reaches target); None where either cannot be read."""
    linear, softmax = compute_to_reach_accuracy(linear_curve, target), compute_to_reach_accuracy(softmax_curve, target)
    return None if linear is None or softmax is None else linear / softmax


# ----------------------------------------------------------------------------- the grid


@dataclass(frozen=True)
class Grid:
    """The probe's and the frontier's runs. budgets: training FLOPs, one per --budget-steps (softmax at the
    full size for that many steps); frontier: {(config name, budget index): [spec per seed]}."""

    probe_low: list[RunSpec]
    probe_full: list[RunSpec]
    budgets: list[float]
    budget_steps: list[int]  # what each budget is: softmax at the full size for this many steps
    configs: list[Config]
    frontier: dict[tuple[str, int], list[RunSpec]]

    def specs(self, part: str) -> list[RunSpec]:
        """Seed-major, so a stopped study leaves every row with the same number of seeds."""
        probe = [s for pair in zip(self.probe_low, self.probe_full) for s in pair] if part in ("probe", "all") else []
        frontier: list[RunSpec] = []
        if part in ("frontier", "all"):
            seeds = max(len(v) for v in self.frontier.values())
            for seed_index in range(seeds):
                for specs in self.frontier.values():
                    if seed_index < len(specs) and specs[seed_index] not in probe + frontier:
                        frontier.append(specs[seed_index])
        return probe + frontier


def build_grid(configs: Sequence[Config], budget: Budget, low_size: int, full_size: int, width: int,
               probe_seeds: Sequence[int], seeds: Sequence[int], budget_steps: Sequence[int]) -> Grid:
    softmax = Config("softmax", "softmax")
    probe_low = [softmax.spec(low_size, width, replace(budget, seed=s)) for s in probe_seeds]
    probe_full = [softmax.spec(full_size, width, replace(budget, seed=s)) for s in probe_seeds]
    budgets = [train_flops(softmax.spec(full_size, width, replace(budget, steps=n))) for n in budget_steps]
    frontier: dict[tuple[str, int], list[RunSpec]] = {}
    for config in configs:
        base = config.spec(full_size, width, budget)
        for index, flops in enumerate(budgets):
            steps = steps_for_flops(base, flops)
            frontier[config.name, index] = [config.spec(full_size, width, replace(budget, steps=steps, seed=s))
                                            for s in seeds]
    return Grid(probe_low, probe_full, budgets, list(budget_steps), list(configs), frontier)


def estimated_cpu_minutes(spec: RunSpec, gflops_per_s: float, overhead_s: float) -> float:
    """A run's CPU-minutes: its training FLOPs at `gflops_per_s` (one thread) plus start-up and eval."""
    return (train_flops(spec) / (gflops_per_s * 1e9) + overhead_s) / 60


def phase_cell(spec: RunSpec) -> str:
    """'steps x tokens/img' per phase: '240 x 50 + 60 x 197'."""
    from ds_linclip.models.flops import model_cost

    cfg, _ = resolved_run(spec)
    return " + ".join(f"{p.steps} x {model_cost(cfg.model, p.image_size, p.patch_dropout).image.tokens}"
                      for p in planned_phases(spec))


def plan_text(grid: Grid, part: str, gflops_per_s: float, overhead_s: float, reusable: set[RunSpec]) -> str:
    header = ["part", "configuration", "budget", "steps x image tokens (per phase)", "train TFLOPs", "seeds",
              "est. CPU-min (all seeds)"]
    rows, total = [], 0.0
    if part in ("probe", "all"):
        for name, specs in (("probe low", grid.probe_low), ("probe full", grid.probe_full)):
            minutes = sum(estimated_cpu_minutes(s, gflops_per_s, overhead_s) for s in specs)
            total += minutes
            rows.append([name, f"softmax {specs[0].image_size} px", "-", phase_cell(specs[0]),
                         f"{train_flops(specs[0]) / 1e12:.3f}", str(len(specs)), f"{minutes:.1f}"])
    if part in ("frontier", "all"):
        for (name, index), specs in grid.frontier.items():
            todo = [s for s in specs if s not in reusable]
            minutes = sum(estimated_cpu_minutes(s, gflops_per_s, overhead_s) for s in todo)
            total += minutes
            rows.append(["frontier", name, f"{index}: {grid.budgets[index] / 1e12:.3f} TFLOPs", phase_cell(specs[0]),
                         f"{train_flops(specs[0]) / 1e12:.3f}", str(len(specs)),
                         f"{minutes:.1f}" + (f" ({len(specs) - len(todo)} from the probe)" if len(todo) < len(specs)
                                             else "")])
    return (markdown_table(header, rows) + f"\n\nestimated total: {total:.0f} CPU-minutes at {gflops_per_s:g} "
            f"GFLOP/s per run (one thread) + {overhead_s:g} s per run for start-up and eval")


# ----------------------------------------------------------------------------- results


def _accuracy(result: RunResult) -> float:
    return 100.0 * float(result.top1)


def probe_summary(grid: Grid, done: dict[RunSpec, RunResult]) -> dict[str, Any]:
    """Top-1 (%) of softmax at the low and the full size, per seed and mean ± std, and the verdict:
    more tokens pay when the full size is ahead by more than twice the standard error of the difference."""
    out: dict[str, Any] = {}
    for key, specs in (("low", grid.probe_low), ("full", grid.probe_full)):
        values = [_accuracy(done[s]) for s in specs if s in done]
        out[key] = {"image_size": specs[0].image_size, "tokens": specs[0].tokens, "steps": specs[0].budget.steps,
                    "top1": values, "seeds": [s.budget.seed for s in specs if s in done],
                    "train_tflops": train_flops(specs[0]) / 1e12, **mean_std(values).__dict__}
    low, full = out["low"], out["full"]
    if low["n"] >= 2 and full["n"] >= 2:
        difference = full["mean"] - low["mean"]
        error = math.sqrt(low["std"] ** 2 / low["n"] + full["std"] ** 2 / full["n"])
        out["difference"], out["standard_error"] = difference, error
        out["more_tokens_pay"] = bool(difference > 0 and difference > 2 * error)
    else:
        out["more_tokens_pay"] = None
    return out


def frontier_points(grid: Grid, done: dict[RunSpec, RunResult]) -> list[dict[str, Any]]:
    """One point per (configuration, budget) with a finished seed: compute (the runs' training FLOPs),
    top-1 (%) mean ± std over seeds, per-seed values."""
    points = []
    for (name, index), specs in grid.frontier.items():
        finished = [s for s in specs if s in done]
        if not finished:
            continue
        values = [_accuracy(done[s]) for s in finished]
        stat = mean_std(values)
        points.append({"config": name, "budget_index": index, "budget_flops": grid.budgets[index],
                       "flops": train_flops(finished[0]), "steps": finished[0].budget.steps,
                       "phases": phase_cell(finished[0]), "seeds": [s.budget.seed for s in finished],
                       "runs": [s.name for s in finished],
                       "top1_per_seed": values, "top1": stat.mean, "top1_std": stat.std, "n": stat.n,
                       "final_loss": statistics.fmean(done[s].final_loss for s in finished),
                       "seeds_asked": len(specs)})
    return points


def best_per_budget(points: Sequence[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    best: dict[int, dict[str, Any]] = {}
    for point in points:
        index = point["budget_index"]
        if index not in best or point["top1"] > best[index]["top1"]:
            best[index] = point
    return best


def multiplier_summary(grid: Grid, points: Sequence[dict[str, Any]], target: float | None) -> dict[str, Any]:
    """The best linear and the best softmax configuration (highest mean top-1 at the largest budget both
    attentions reached), the compute each needs to reach `target` (default: the best softmax's accuracy
    there) on its mean curve, their ratio, and the ratio per seed (seed curves) as mean ± std."""
    linear_names = {c.name for c in grid.configs if c.linear}
    reached = sorted({p["budget_index"] for p in points if p["config"] in linear_names}
                     & {p["budget_index"] for p in points if p["config"] not in linear_names})
    if not reached:
        return {}
    last = reached[-1]
    at_last = [p for p in points if p["budget_index"] == last]
    best_linear = max((p for p in at_last if p["config"] in linear_names), key=lambda p: p["top1"])
    best_softmax = max((p for p in at_last if p["config"] not in linear_names), key=lambda p: p["top1"])
    target = best_softmax["top1"] if target is None else target

    def curve(name: str, seed_index: int | None = None) -> list[tuple[float, float]]:
        out = []
        for p in points:
            if p["config"] != name:
                continue
            if seed_index is None:
                out.append((p["flops"], p["top1"]))
            elif seed_index < len(p["top1_per_seed"]):
                out.append((p["flops"], p["top1_per_seed"][seed_index]))
        return out

    linear_curve, softmax_curve = curve(best_linear["config"]), curve(best_softmax["config"])
    per_seed = []
    for seed_index in range(max(p["n"] for p in points)):
        value = compute_ratio_at_accuracy(curve(best_linear["config"], seed_index), curve(best_softmax["config"], seed_index),
                                   target)
        if value is not None:
            per_seed.append(value)
    return {"budget_index": last, "budget_flops": grid.budgets[last], "target_top1": target,
            "best_linear": best_linear["config"], "best_linear_top1": best_linear["top1"],
            "best_linear_top1_std": best_linear["top1_std"], "best_linear_n": best_linear["n"],
            "best_softmax": best_softmax["config"], "best_softmax_top1": best_softmax["top1"],
            "best_softmax_top1_std": best_softmax["top1_std"], "best_softmax_n": best_softmax["n"],
            "linear_flops_to_target": compute_to_reach_accuracy(linear_curve, target),
            "softmax_flops_to_target": compute_to_reach_accuracy(softmax_curve, target),
            "multiplier": compute_ratio_at_accuracy(linear_curve, softmax_curve, target),
            "multiplier_per_seed": per_seed, "budgets_on_curves": len(linear_curve)}


def target_checks(summary: dict[str, Any]) -> list[dict[str, Any]]:
    if not summary:
        return []
    gap = summary["best_linear_top1"] - summary["best_softmax_top1"]
    multiplier = summary["multiplier"]
    stds = [(summary[f"best_{a}_top1_std"], summary[f"best_{a}_n"]) for a in ("linear", "softmax")]
    error = math.sqrt(sum(std ** 2 / n for std, n in stds)) if all(std is not None for std, _ in stds) else None
    noise = ("one seed: no spread" if error is None else
             f"standard error of the difference {error:.2f}; "
             + ("beyond" if abs(gap) > 2 * error else "within") + " 2 standard errors")
    return [
        {"target": f"largest budget measured ({summary['budget_flops'] / 1e12:.3f} TFLOPs): best linear "
                   f"({summary['best_linear']}) >= best softmax ({summary['best_softmax']}) + 1.0 point",
         "measured": f"{summary['best_linear_top1']:.2f} vs {summary['best_softmax_top1']:.2f}: {gap:+.2f} points "
                     f"({noise})",
         "met": gap >= 1.0, "standard_error": error},
        {"target": f"best linear reaches best softmax's {summary['target_top1']:.2f}% with <= 0.7x its compute",
         "measured": (f"{multiplier:.2f}x" if multiplier is not None else
                      "not readable with one budget" if summary["budgets_on_curves"] < 2 else
                      "not readable (needs the crossing between two measured budgets of both curves)"),
         "met": multiplier is not None and multiplier <= 0.7},
    ]


# ----------------------------------------------------------------------------- report


def _cell(mean: float | None, std: float | None, n: int) -> str:
    from ds_linclip.experiments.report import Stat

    return Stat(mean, std, n).cell()


def plot_frontier(points: Sequence[dict[str, Any]], configs: Sequence[Config], path: Path) -> None:
    """Top-1 vs training FLOPs, one line per configuration (mean, error bars: std over seeds), and the
    Pareto frontier of all the mean points."""
    from ds_linclip.experiments.plots import color, pyplot, save, style_axes

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    markers = "osD^vP*X"
    for index, config in enumerate(configs):
        mine = sorted((p for p in points if p["config"] == config.name), key=lambda p: p["budget_flops"])
        if not mine:
            continue
        # each configuration spends its budget to within one step: drawn at the budget, nudged apart to be seen
        nudge = 1 + 0.015 * (index - (len(configs) - 1) / 2)
        ax.errorbar([p["budget_flops"] * nudge for p in mine], [p["top1"] for p in mine],
                    yerr=[p["top1_std"] or 0 for p in mine], marker=markers[index % len(markers)], capsize=3,
                    linestyle="--" if config.linear else "-", color=color(config.name), label=config.name)
    front = pareto_frontier([(p["budget_flops"], p["top1"]) for p in points])
    if front:
        ax.step([c for c, _ in front], [a for _, a in front], where="post", color="black", alpha=0.5, linewidth=3,
                marker="_", markersize=40, label="Pareto frontier", zorder=0)
        budgets = sorted({p["budget_flops"] for p in points})
        ax.set_xlim(budgets[0] / 1.3, budgets[-1] * 1.3)
    style_axes(ax, "training FLOPs budget (forward + backward, per phase)", "zero-shot top-1 %")
    ax.set_title("Accuracy vs training compute: softmax (solid) vs linear (dashed)")
    save(fig, path)


def report_markdown(command: str, meta: dict[str, Any], budget: Budget, low_size: int, full_size: int,
                    grid: Grid, probe: dict[str, Any], points: Sequence[dict[str, Any]],
                    summary: dict[str, Any], checks: Sequence[dict[str, Any]]) -> str:
    lines = ["# The accuracy-vs-compute frontier: linear attention against softmax with token reduction", "",
             f"Command: `{command}`  ", machine_sentence(meta), "",
             f"Data: Fashion-MNIST items drawn at {full_size // 7} px at random places on a {full_size} px canvas "
             f"with faint clutter (`python -m ds_linclip.data.writer fashion-mnist-canvas --canvas {full_size} "
             f"--item-size {full_size // 7}`); captions from the OpenAI templates around the class name. "
             f"Model: both towers {budget.layers} layers, width {budget.width}, "
             f"head dim 32, patch {budget.patch_size}, text context {budget.context_length}; batch "
             f"{budget.batch_size}, AdamW lr {budget.lr:g} (warm-up 10% of the steps, then cosine), weight decay "
             f"{budget.weight_decay:g}, fp32, one process. Zero-shot top-1 by the eval job on the first "
             f"{budget.eval_samples or 10000} test images, templates `{budget.eval_templates}`. Cells read "
             "**mean ± std (n)** over seeds (sample std).", ""]

    lines += ["## Do more tokens pay? softmax at two input resolutions, equal steps", ""]
    rows = []
    for key in ("low", "full"):
        part = probe[key]
        rows.append([f"softmax {part['image_size']} px", str(part["tokens"]), str(part["steps"]),
                     f"{part['train_tflops']:.3f}", ",".join(map(str, part["seeds"])) or "none",
                     _cell(part["mean"], part["std"], part["n"]),
                     " ".join(f"{v:.2f}" for v in part["top1"])])
    lines.append(markdown_table(["run", "image tokens", "steps", "train TFLOPs", "seeds", "top-1 %",
                                 "per seed"], rows))
    if probe.get("more_tokens_pay") is None:
        lines += ["", "Verdict: not enough seeds finished (two per size needed)."]
    else:
        lines += ["", f"Verdict: {probe['full']['tokens']} tokens vs {probe['low']['tokens']}: "
                      f"{probe['difference']:+.2f} points (standard error of the difference "
                      f"{probe['standard_error']:.2f}): more tokens **"
                      f"{'pay' if probe['more_tokens_pay'] else 'do not pay (not by more than 2 standard errors)'}"
                      "** here at equal steps."]

    lines += ["", "## The frontier: every configuration at the same training-FLOP budgets", "",
              "Budgets are the training FLOPs of softmax at the full size for "
              + ", ".join(map(str, grid.budget_steps))
              + " steps; each configuration gets the step count whose FLOPs are closest (phases counted per phase, "
              "dropped tokens not counted, the local branch's full-grid convolution counted; "
              "`ds_linclip.models.flops`, forward + backward = 3 x forward).", ""]
    header = ["configuration", "schedule", "budget", "steps x image tokens", "train TFLOPs", "seeds", "top-1 %",
              "final loss (mean)"]
    rows = []
    described = {c.name: c.describe(full_size) for c in grid.configs}
    for p in sorted(points, key=lambda p: (p["budget_index"], -p["top1"])):
        rows.append([p["config"], described[p["config"]], str(p["budget_index"]), p["phases"],
                     f"{p['flops'] / 1e12:.3f}",
                     ",".join(map(str, p["seeds"])) + (f" ({p['n']} of {p['seeds_asked']})"
                                                       if p["n"] < p["seeds_asked"] else ""),
                     _cell(p["top1"], p["top1_std"], p["n"]), f"{p['final_loss']:.4f}"])
    lines.append(markdown_table(header, rows) if rows else "No frontier run has finished yet.")

    best = best_per_budget(points)
    if best:
        lines += ["", "### Best configuration at each budget", ""]
        front = {c for c, _ in pareto_frontier([(p["budget_flops"], p["top1"]) for p in points])}
        lines.append(markdown_table(
            ["budget", "budget TFLOPs", "best configuration", "top-1 %", "on the Pareto frontier"],
            [[str(i), f"{grid.budgets[i] / 1e12:.3f}", b["config"], _cell(b["top1"], b["top1_std"], b["n"]),
              "yes" if b["budget_flops"] in front else "no"] for i, b in sorted(best.items())]))

    if summary:
        ratio = summary["multiplier"]
        per_seed = mean_std(summary["multiplier_per_seed"])
        lines += ["", "### Compute multiplier: best linear vs best softmax", "",
                  f"At the largest budget both reached (budget {summary['budget_index']}, "
                  f"{summary['budget_flops'] / 1e12:.3f} TFLOPs) the best linear configuration is "
                  f"**{summary['best_linear']}** "
                  f"({_cell(summary['best_linear_top1'], summary['best_linear_top1_std'], summary['best_linear_n'])}) "
                  f"and the best softmax one **{summary['best_softmax']}** "
                  f"({_cell(summary['best_softmax_top1'], summary['best_softmax_top1_std'], summary['best_softmax_n'])}). "
                  + ("The compute multiplier needs two or more budgets (a curve per configuration); this report "
                     "has one." if summary["budgets_on_curves"] < 2 else
                  f"Compute to reach {summary['target_top1']:.2f}% top-1 (interpolated in log compute on the mean "
                  f"curves over {summary['budgets_on_curves']} budget(s)): linear "
                  f"{fmt(summary['linear_flops_to_target'] and summary['linear_flops_to_target'] / 1e12, '.3f')} "
                  f"TFLOPs, softmax "
                  f"{fmt(summary['softmax_flops_to_target'] and summary['softmax_flops_to_target'] / 1e12, '.3f')} "
                  f"TFLOPs: multiplier **{fmt(ratio, '.2f')}x**; per seed {per_seed.cell()} "
                  "(seeds whose curves both cross the target between two budgets).")]
    if checks:
        lines += ["", "## Targets", "", markdown_table(
            ["target", "measured", "met"], [[c["target"], c["measured"], "yes" if c["met"] else "no"] for c in checks])]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- CLI

QUICK = {"width": 32, "layers": 1, "batch_size": 8, "probe_steps": 4, "budget_steps": [4, 8], "low_size": 12,
         "full_size": 24, "eval_samples": 200, "eval_templates": "simple", "eval_batch_size": 100, "seeds": [1],
         "probe_seeds": [1], "configs": ["softmax", "softmax-pd0.5", LINEAR, "linear-lowres0.8"]}


def ensure_canvas_shards(data_dir: Path, canvas: int, quick: bool) -> Path:
    """Canvas shards in data_dir (train/, test/, classnames.txt), written by the writer if missing."""
    data_dir = data_dir.expanduser().resolve()
    if not ((data_dir / "classnames.txt").is_file() and list((data_dir / "train").glob("shard-*.tar"))
            and list((data_dir / "test").glob("shard-*.tar"))):
        from ds_linclip.data.writer import write_fashion_mnist_canvas

        log(f"no canvas shards in {data_dir}: writing them (python -m ds_linclip.data.writer fashion-mnist-canvas)")
        write_fashion_mnist_canvas(data_dir, canvas=canvas, item_size=canvas // 7,
                                   train_samples=512 if quick else None, test_samples=200 if quick else None,
                                   shard_size=256 if quick else 5000, test_shard_size=100 if quick else 1000)
    return data_dir


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ds_linclip.experiments.frontier",
        description="Accuracy vs training compute: softmax, softmax + FLIP patch dropout, linear attention, linear + "
                    "dropout, and low-then-full resolution schedules, every one trained to the same training-FLOP "
                    "budgets (several seeds) and scored zero-shot; first a probe that checks more tokens pay on the "
                    "task. Writes frontier.md, frontier.json and frontier.png to --out. Finished runs are reused.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--part", choices=("probe", "frontier", "all"), default="all", help="what to train and report")
    parser.add_argument("--plan", action="store_true", help="print the grid with FLOPs and CPU-minutes; train nothing")
    parser.add_argument("--configs", nargs="+", default=None, metavar="NAME",
                        help="frontier configurations (default: all of softmax, softmax-pd0.5, "
                             f"{LINEAR}, linear-pd0.5, softmax-lowres0.8, linear-lowres0.8), or any attention name "
                             "(e.g. linear-pola), trained plain: full size, no dropout")
    parser.add_argument("--low-size", type=int, default=28, help="the low input resolution, px")
    parser.add_argument("--full-size", type=int, default=56, help="the full input resolution (the canvas), px")
    parser.add_argument("--probe-steps", type=int, default=300, help="steps of every probe run")
    parser.add_argument("--probe-seeds", nargs="+", type=int, default=[3], metavar="S", help="as --seeds")
    parser.add_argument("--budget-steps", nargs="+", type=int, default=[150, 300, 600], metavar="N",
                        help="the FLOP budgets: softmax at the full size for N steps")
    parser.add_argument("--seeds", nargs="+", type=int, default=[3], metavar="S",
                        help="N: seeds 0..N-1; A B ...: those seeds")
    parser.add_argument("--target", type=float, default=None,
                        help="top-1 %% for the compute multiplier (default: best softmax at the largest budget)")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2.0e-3)
    parser.add_argument("--eval-samples", type=int, default=5000)
    parser.add_argument("--eval-templates", default="openai")
    parser.add_argument("--eval-batch-size", type=int, default=500)
    parser.add_argument("--cpu-gflops", type=float, default=15.0,
                        help="training GFLOP/s of one single-thread run, for --plan's estimate (measured: ~17 for "
                             "softmax at 197 tokens, width 64)")
    parser.add_argument("--no-train", action="store_true", help="report the runs that have finished; train nothing")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (subprocess launcher)")
    parser.add_argument("--data", type=Path, default=Path("data/fmnist-canvas56"),
                        help="canvas shards (written if missing)")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/frontier"))
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    parser.add_argument("--launcher", choices=("subprocess", "inprocess"), default=None,
                        help="default: subprocess (inprocess with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny everything for tests: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    set_log_prefix("frontier")
    return run_study(lambda: study(*parse_study_args(build_parser(), argv, QUICK)))


def study(args: argparse.Namespace, argv: list[str]) -> int:
    """The command: --plan prints the grid; otherwise fill it (finished runs reused) and write the report."""
    launcher_mode = args.launcher or ("inprocess" if args.quick else "subprocess")
    jobs = 1 if launcher_mode == "inprocess" else args.jobs  # in-process runs share one DeepSpeed process
    known = {c.name: c for c in default_configs(args.low_size)}
    names = args.configs or list(known)
    from ds_linclip.models.attention import AttentionSpecError, parse_attention_name

    for name in names:  # besides the named configurations: any attention name, plain (full size, no dropout)
        if name not in known:
            try:
                parse_attention_name(name)
            except AttentionSpecError:
                print(f"error: --configs {name}: neither a configuration ({' '.join(known)}) nor an attention "
                      "name (docs/attention_variants.md)", file=sys.stderr)
                return 2
            known[name] = Config(name, name)
    for size in (args.low_size, args.full_size):
        if size % 4:
            print(f"error: image size {size} is not a multiple of the patch size 4", file=sys.stderr)
            return 2
    prepare_process(args.threads)
    budget = Budget(steps=args.probe_steps, batch_size=args.batch_size, lr=args.lr, layers=args.layers,
                    width=args.width, eval_samples=args.eval_samples, eval_templates=args.eval_templates,
                    eval_batch_size=args.eval_batch_size)
    grid = build_grid([known[n] for n in names], budget, args.low_size, args.full_size, args.width,
                      parse_seeds(args.probe_seeds), parse_seeds(args.seeds), args.budget_steps)
    specs = grid.specs(args.part)
    if args.plan:
        probe_specs = set(grid.probe_full) if args.part == "all" else set()
        print(plan_text(grid, args.part, args.cpu_gflops, 45.0, probe_specs))
        return 0

    from tqdm import tqdm

    command = "python -m ds_linclip.experiments.frontier " + shlex.join(argv)
    meta = run_meta()
    start = time.perf_counter()
    data_dir = ensure_canvas_shards(args.data, args.full_size, args.quick)
    runs_dir = args.runs_dir.expanduser().resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    launcher = Launcher(launcher_mode, runs_dir, data_dir)
    log(f"{len(specs)} runs ({args.part}); runs in {runs_dir}, results to {args.out}"
        + (" (--no-train: finished runs only)" if args.no_train else ""))
    done: dict[RunSpec, RunResult] = {}
    bar = tqdm(total=len(specs), desc="runs", unit="run", disable=args.no_progress)
    failures = run_specs(specs, launcher, done, jobs, not args.no_train, bar)
    bar.close()

    # every run of the grid that has finished goes into the report, whatever part was asked for
    if args.part != "all":
        run_specs([s for s in grid.specs("all") if s not in done], launcher, done, 1, train=False)
    probe = probe_summary(grid, done)
    points = frontier_points(grid, done)
    summary = multiplier_summary(grid, points, args.target)
    checks = target_checks(summary)
    meta.update(load_average_end=load_average_1m(), wall_seconds=round(time.perf_counter() - start, 1))
    args.out.mkdir(parents=True, exist_ok=True)
    markdown = report_markdown(command, meta, budget, args.low_size, args.full_size, grid, probe, points, summary,
                               checks)
    (args.out / "frontier.md").write_text(markdown)
    plot_frontier(points, grid.configs, args.out / "frontier.png")
    write_json(args.out / "frontier.json", {
        "command": command, **meta, "budget": budget.__dict__, "low_size": args.low_size,
        "full_size": args.full_size, "budgets_flops": grid.budgets,
        "configs": [{"name": c.name, "kind": c.kind, "overrides": list(c.overrides()),
                     "schedule": c.describe(args.full_size)} for c in grid.configs],
        "probe": probe, "points": points,
        "pareto": pareto_frontier([(p["budget_flops"], p["top1"]) for p in points]),
        "best_per_budget": {str(i): b["config"] for i, b in best_per_budget(points).items()},
        "multiplier": summary, "targets": checks})
    print(markdown)
    log(f"wrote {args.out / 'frontier.md'}, frontier.json, frontier.png ({meta['wall_seconds']:.0f} s)")
    return failures_exit_code(failures)


if __name__ == "__main__":
    raise SystemExit(main())
