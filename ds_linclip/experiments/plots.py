"""Plots of a study's rows (matplotlib, Agg backend, PNG): loss curves, accuracy vs compute,
throughput and activation memory, timing sweeps, loss vs compute with fitted power laws.
Each function draws one PNG at `path`; `title` is the figure's title."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ds_linclip.experiments.fits import power_law
from ds_linclip.experiments.report import Row
from ds_linclip.experiments.runs import RunResult

COLORS = {"softmax": "tab:blue", "linear-affine": "tab:orange", "linear-affine-kernel": "tab:green",
          "linear-elu": "tab:red", "linear-relu": "tab:purple", "linear-focused": "tab:brown",
          "linear-focused-local3": "tab:pink", "linear-affine-local3": "tab:olive", "linear-focused-local5": "tab:cyan",
          "linear-affine-local5": "tab:gray"}
_EXTRA_COLORS = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d")


def color(kind: str) -> str:
    """A fixed colour per variant name (any name: the unlisted ones get one of a small palette)."""
    return COLORS.get(kind) or _EXTRA_COLORS[sum(map(ord, kind)) % len(_EXTRA_COLORS)]


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: Path) -> None:
    """Lay out, write the PNG (110 dpi) and free the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def style_axes(ax: Any, xlabel: str, ylabel: str | None = None, xlog: bool = True, ylog: bool = False,
               legend: float | None = 8, label_size: float | None = None) -> None:
    """Log axes (x by default), labels, a light grid on major and minor ticks, a legend of `legend` pt."""
    if xlog:
        ax.set_xscale("log")
    if ylog:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel, fontsize=label_size)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    if legend:
        ax.legend(fontsize=legend)


def plot_sweep(sweep: dict[str, Any], path: Path,
               title: str = "Training step speed vs token count, kinds interleaved (nothing trained)") -> None:
    plt = pyplot()

    kinds = list(dict.fromkeys(p["kind"] for p in sweep["points"]))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.3))
    base = {p["image_size"]: p["images_per_s"] for p in sweep["points"] if p["kind"] == "softmax"}
    for kind in kinds:
        points = sorted((p for p in sweep["points"] if p["kind"] == kind), key=lambda p: p["tokens"])
        tokens = [p["tokens"] for p in points]
        axes[0].plot(tokens, [p["images_per_s"] for p in points], marker="o", label=kind, color=color(kind))
        if base:
            axes[1].plot(tokens, [p["images_per_s"] / base[p["image_size"]] for p in points], marker="o", label=kind,
                         color=color(kind))
    axes[0].set_yscale("log")
    axes[0].set_ylabel(f"training images/s (batch {sweep['batch_size']}, median of {sweep['rounds']})")
    axes[1].axhline(1.0, color="gray", linewidth=1)
    axes[1].set_ylabel("speed relative to softmax (>1: faster)")
    for ax in axes:
        style_axes(ax, "image tokens (patches + CLS)")
    fig.suptitle(title)
    save(fig, path)



def _panels(rows: Sequence[Row]) -> list[tuple[int, int]]:
    return sorted({(r.image_size, r.steps) for r in rows if r.n}, key=lambda k: (k[1], k[0]))


def plot_loss(rows: Sequence[Row], path: Path,
              title: str = "Fashion-MNIST CLIP: training loss vs step, same data/steps/seeds/batch per variant") -> None:
    """Loss vs step per (image size, steps): the mean over seeds, shaded between the lowest and highest seed."""
    import numpy as np

    plt = pyplot()

    panels = _panels(rows)
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False, sharey=True)
    for ax, (size, steps) in zip(axes[0], panels):
        for r in (r for r in rows if (r.image_size, r.steps) == (size, steps) and r.n):
            common = sorted(set.intersection(*(set(s for s, _ in run.loss_curve) for run in r.runs)))
            curves = np.array([[dict(run.loss_curve)[s] for s in common] for run in r.runs])
            top1 = r.stat("top1")
            ax.plot(common, curves.mean(axis=0), color=color(r.kind),
                    label=f"{r.kind} (top-1 {top1.cell('.1f', 100)})")
            if r.n > 1:
                ax.fill_between(common, curves.min(axis=0), curves.max(axis=0), color=color(r.kind), alpha=0.15)
        tokens = next(r.tokens for r in rows if r.image_size == size)
        ax.set_title(f"{size} px ({tokens} image tokens), {steps} steps")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("training loss (mean over seeds; band: min-max)")
    fig.suptitle(title)
    save(fig, path)


def plot_accuracy_vs_compute(rows: Sequence[Row], timing: dict[str, dict], path: Path,
                             title: str = "Zero-shot accuracy vs compute, analytic (left) and measured (right)") -> None:
    plt = pyplot()

    markers = ["o", "s", "^", "D", "v", "P", "X"]
    panels = _panels(rows)
    kinds = list(dict.fromkeys(r.kind for r in rows if r.n))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in (r for r in rows if r.n):
        marker = markers[panels.index((r.image_size, r.steps)) % len(markers)]
        # the linear variants have (nearly) equal FLOPs: spread them by 2% per variant so none hides another
        spread = 1.0 + 0.02 * (kinds.index(r.kind) - (len(kinds) - 1) / 2)
        top1 = r.stat("top1")
        error = 100 * top1.std if top1.std is not None else None
        axes[0].errorbar(r.first("train_flops") * spread, 100 * top1.mean, yerr=error, color=color(r.kind),
                         marker=marker, markersize=7, capsize=3, linestyle="")
        rate = timing.get(r.shape_name, {}).get("images_per_s")
        if rate:
            axes[1].errorbar(r.steps * r.first("batch_size") / rate * spread, 100 * top1.mean, yerr=error,
                             color=color(r.kind), marker=marker, markersize=7, capsize=3, linestyle="")
    for ax, label in ((axes[0], "training compute (FLOPs, 3 x forward x samples; equal values spread 2%)"),
                      (axes[1], "training time at the interleaved img/s (s, steps x batch / img/s)")):
        style_axes(ax, label, "zero-shot top-1 % (mean ± std over seeds)", legend=None, label_size=9)
    handles = [plt.Line2D([], [], color=color(k), marker="o", linestyle="", label=k) for k in kinds]
    handles += [plt.Line2D([], [], color="gray", marker=markers[i % len(markers)], linestyle="",
                           label=f"{size} px, {steps} steps") for i, (size, steps) in enumerate(panels)]
    axes[1].legend(handles=handles, fontsize=7)
    fig.suptitle(title)
    save(fig, path)


def plot_throughput(rows: Sequence[Row], timing: dict[str, dict], path: Path,
                    title: str = "Training step cost per variant, measured side by side") -> None:
    import numpy as np

    plt = pyplot()

    shapes = {(r.kind, r.image_size): r for r in rows}  # one bar per variant and size, whatever the steps
    sizes = sorted({s for _, s in shapes})
    kinds = list(dict.fromkeys(k for k, _ in shapes))
    tokens = {r.image_size: r.tokens for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / max(1, len(kinds))
    for i, kind in enumerate(kinds):
        xs = np.arange(len(sizes)) + i * width
        at = [timing.get(shapes[(kind, s)].shape_name, {}) if (kind, s) in shapes else {} for s in sizes]
        axes[0].bar(xs, [t.get("images_per_s") or 0 for t in at], width, label=kind, color=color(kind))
        axes[1].bar(xs, [t.get("activation_mib") or 0 for t in at], width, label=kind, color=color(kind))
    for ax, label in ((axes[0], "training images/s (interleaved, median)"),
                      (axes[1], "activation memory saved for backward (MiB/step)")):
        ax.set_xticks(np.arange(len(sizes)) + width * (len(kinds) - 1) / 2)
        ax.set_xticklabels([f"{s} px ({tokens[s]} tokens)" for s in sizes])
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    save(fig, path)


def plot_scaling(results: Sequence[RunResult], fits: dict[str, dict], path: Path,
                 title: str = "Loss vs compute over three widths (fixed steps and batch)") -> None:
    import numpy as np

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.8))
    for kind, fit in fits.items():
        runs = sorted((r for r in results if r.kind == kind), key=lambda r: r.train_flops)
        color_ = color(kind)
        for r in runs:  # the whole curve against cumulative compute, thin
            per_step = r.train_flops / r.steps
            steps, losses = zip(*r.loss_curve)
            ax.plot(np.asarray(steps) * per_step, losses, color=color_, alpha=0.25, linewidth=1)
        xs = np.array([r.train_flops for r in runs])
        ax.scatter(xs, [r.final_loss for r in runs], color=color_, s=50, zorder=3)
        for r in runs:
            ax.annotate(f"w{r.width}", (r.train_flops, r.final_loss), textcoords="offset points", xytext=(4, 4), fontsize=8)
        grid = np.geomspace(xs.min(), xs.max(), 50)
        ax.plot(grid, power_law(grid, fit), color=color_, linestyle="--",
                label=f"{kind}: L = {fit['coefficient']:.3g}·C^(-b), b = {fit['exponent']:.3f} (R² {fit['r2']:.2f})")
    style_axes(ax, "training compute C (FLOPs)", "final training loss L", ylog=True)
    ax.set_title(title)
    save(fig, path)


def plot_envelope_fits(curves: dict[str, list[list[tuple[float, float]]]], frontiers: dict[str, list[tuple[float, float]]],
                       fits: dict[str, dict], pure_fits: dict[str, dict], path: Path,
                       title: str = "Loss vs training compute: every run's curve, the frontier, the fits") -> None:
    """Per group (attention): every curve thin, its lower envelope as dots, the joint fit (E shared) dashed and
    the pure power law dotted. curves/frontiers: [(compute FLOPs, loss)]; fits: `fits.power_law` dicts."""
    import numpy as np

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.2))
    for kind, runs in curves.items():
        color_ = color(kind)
        for curve in runs:
            xs, ys = zip(*curve)
            ax.plot(xs, ys, color=color_, alpha=0.2, linewidth=0.8)
        if frontiers.get(kind):
            xs, ys = zip(*frontiers[kind])
            ax.scatter(xs, ys, color=color_, s=12, zorder=3, label=f"{kind}: frontier")
            grid = np.geomspace(min(xs), max(xs), 60)
            if kind in fits:
                f = fits[kind]
                ax.plot(grid, power_law(grid, f), color=color_, linestyle="--",
                        label=f"{kind}: E + A·C^-α, α = {f['exponent']:.3f}, E = {f['irreducible']:.3f}")
            if kind in pure_fits:
                ax.plot(grid, power_law(grid, pure_fits[kind]), color=color_, linestyle=":",
                        label=f"{kind}: A·C^-α, α = {pure_fits[kind]['exponent']:.3f}")
    style_axes(ax, "training compute C (FLOPs, 3 x forward x samples)", "training loss L", ylog=True, legend=7)
    from matplotlib.ticker import FormatStrFormatter

    for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):  # plain numbers on the log loss axis
        axis(FormatStrFormatter("%.2f"))
    ax.set_title(title, fontsize=10)
    save(fig, path)


def plot_metric_vs_compute(points: dict[tuple[str, str], list[tuple[float, float, float | None, str]]], path: Path,
                           ylabel: str, title: str) -> None:
    """Per series (kind, label: colour by kind, line style by label): (compute, value, std or None, annotation)
    markers with error bars, joined in compute order."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.6))
    labels = list(dict.fromkeys(label for _, label in points))
    for (kind, label), rows in points.items():
        rows = sorted(rows)
        xs, ys = [r[0] for r in rows], [r[1] for r in rows]
        ax.errorbar(xs, ys, yerr=[r[2] or 0 for r in rows], color=color(kind), marker="o", capsize=3,
                    linestyle=("-", "--", ":", "-.")[labels.index(label) % 4], label=f"{kind} {label}")
        for x, y, _, note in rows:
            ax.annotate(note, (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    style_axes(ax, "training compute (FLOPs)", ylabel)
    ax.set_title(title, fontsize=10)
    save(fig, path)
