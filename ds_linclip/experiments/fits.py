"""Fits of loss against training compute.

Every fit function takes (compute, loss) sequences (FLOPs, loss values) and returns a plain dict
(it goes into a study's JSON as is) with at least:
    "exponent" (alpha), "coefficient" (A), "r2" (of the fit, in the space it was fitted in), "points",
and optionally "irreducible" (E; absent means 0), so that `power_law(compute, fit)` evaluates any of
them: L(C) = E + A * C^-alpha. `fit_power_law` is the pure power law (E = 0, least squares in log-log);
a fit with an irreducible term sits beside it with the same signature, and `bootstrap` gives
percentile intervals of any such fit's parameters by resampling the points.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

Fit = dict[str, float]


def fit_power_law(compute: Sequence[float], loss: Sequence[float]) -> Fit:
    """Least-squares fit of log10(loss) = log10(a) - b * log10(compute): loss = a * C^-b."""
    import numpy as np

    x, y = np.log10(np.asarray(compute, float)), np.log10(np.asarray(loss, float))
    slope, intercept = np.polyfit(x, y, 1)
    predicted = slope * x + intercept
    ss_res = float(((y - predicted) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return {"exponent": float(-slope), "coefficient": float(10 ** intercept),
            "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan"), "points": len(x)}


def power_law(compute: Any, fit: Fit) -> Any:
    """L(C) = E + A * C^-alpha for a fit dict (E = fit.get("irreducible", 0)); compute a float or an array."""
    return fit.get("irreducible", 0.0) + fit["coefficient"] * compute ** (-fit["exponent"])


def bootstrap(fit: Callable[[Sequence[float], Sequence[float]], Fit], compute: Sequence[float],
              loss: Sequence[float], resamples: int = 1000, level: float = 0.95, seed: int = 0,
              keys: Sequence[str] = ("exponent", "coefficient", "irreducible")) -> dict[str, tuple[float, float]]:
    """Percentile intervals {key: (low, high)} at `level` of `fit`'s parameters over `resamples` resamplings
    of the (compute, loss) points with replacement (a resample with fewer than 2 distinct compute values,
    or on which the fit fails, is skipped). Keys the fit does not return are left out."""
    import numpy as np

    x, y = np.asarray(compute, float), np.asarray(loss, float)
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {key: [] for key in keys}
    for _ in range(resamples):
        index = rng.integers(0, len(x), len(x))
        if len(set(x[index].tolist())) < 2:
            continue
        try:
            result = fit(x[index], y[index])
        except (ValueError, RuntimeError, np.linalg.LinAlgError):
            continue
        for key in keys:
            if key in result:
                samples[key].append(result[key])
    tail = 100 * (1 - level) / 2
    return {key: (float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail)))
            for key, values in samples.items() if values}


def lower_envelope(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The compute frontier of (compute, loss) points: sorted by compute, each point whose loss is lower than
    every point's at smaller or equal compute (the best loss reached at each compute)."""
    frontier: list[tuple[float, float]] = []
    for c, value in sorted(points):
        if not frontier or value < frontier[-1][1]:  # at equal compute the lowest loss sorts first
            frontier.append((c, value))
    return frontier


def fit_shared_floor(groups: dict[str, tuple[Sequence[float], Sequence[float]]], huber_delta: float = 1e-3,
                     start: dict[str, Fit] | None = None) -> dict[str, Fit]:
    """Joint fit of L = E + A_g * C^-alpha_g over several groups (e.g. attentions) with ONE irreducible loss E
    shared by all of them; each group its own A_g and alpha_g.

    groups: {name: (compute (FLOPs), loss)}, each group at least 2 points and 5 points in all. Objective (as
    Hoffmann et al. 2022): Huber loss (delta `huber_delta`) of log(predicted) - log(observed), minimised by
    scipy's least_squares from a small grid of starting points (or from `start`, an earlier result, alone: the
    bootstrap's warm start). Compute is divided by the geometric mean of all of it for conditioning. Returns
    {name: {"exponent", "coefficient", "irreducible", "r2" (of log loss, that group's points), "points"}}.
    Raises ValueError when there are too few points.
    """
    import numpy as np
    from scipy.optimize import least_squares

    names = list(groups)
    xs = {n: np.asarray(groups[n][0], float) for n in names}
    ys = {n: np.asarray(groups[n][1], float) for n in names}
    if any(len(xs[n]) < 2 for n in names) or sum(len(xs[n]) for n in names) < 1 + 2 * len(names) + 2:
        raise ValueError("the joint fit needs at least 2 points per group and 2 more than its parameters in all")
    reference = float(np.exp(np.mean(np.log(np.concatenate([xs[n] for n in names])))))
    scaled = {n: xs[n] / reference for n in names}
    logs = {n: np.log(ys[n]) for n in names}
    floor = float(min(ys[n].min() for n in names))

    def residuals(theta):
        energy = np.exp(theta[0])
        out = []
        for i, n in enumerate(names):
            amplitude, exponent = np.exp(theta[1 + 2 * i]), theta[2 + 2 * i]
            out.append(np.log(energy + amplitude * scaled[n] ** -exponent) - logs[n])
        return np.concatenate(out)

    def initial(energy: float, exponent: float) -> list[float]:
        theta = [np.log(energy)]
        for n in names:
            theta += [np.log(max(float(np.median(ys[n])) - energy, 1e-6)), exponent]
        return theta

    if start:
        energy = start[names[0]]["irreducible"]
        starts = [[np.log(energy)] + [v for n in names for v in (
            np.log(start[n]["coefficient"] * reference ** -start[n]["exponent"]), start[n]["exponent"])]]
    else:
        starts = [initial(fraction * floor, exponent) for fraction in (1e-3, 0.5, 0.8, 0.95) for exponent in (0.1, 0.3, 0.7)]
    lower = [-np.inf] + [-np.inf, 0.0] * len(names)
    upper = [np.log(floor)] + [np.inf, 10.0] * len(names)
    best = None
    for theta0 in starts:
        theta0 = np.clip(theta0, np.asarray(lower) + 1e-9, np.asarray(upper) - 1e-9)
        result = least_squares(residuals, theta0, loss="huber", f_scale=huber_delta, bounds=(lower, upper))
        if best is None or result.cost < best.cost:
            best = result
    theta = best.x
    energy = float(np.exp(theta[0]))
    fits: dict[str, Fit] = {}
    for i, n in enumerate(names):
        exponent = float(theta[2 + 2 * i])
        coefficient = float(np.exp(theta[1 + 2 * i]) * reference ** exponent)
        predicted = np.log(energy + coefficient * xs[n] ** -exponent)
        ss_res = float(((logs[n] - predicted) ** 2).sum())
        ss_tot = float(((logs[n] - logs[n].mean()) ** 2).sum())
        fits[n] = {"exponent": exponent, "coefficient": coefficient, "irreducible": energy,
                   "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan"), "points": len(xs[n])}
    return fits


def bootstrap_curves(statistic: Callable[[dict[str, list[Any]]], dict[str, float]], curves: dict[str, list[Any]],
                     resamples: int = 300, level: float = 0.95, seed: int = 0) -> dict[str, tuple[float, float]]:
    """Percentile intervals {name: (low, high)} of `statistic`'s values over `resamples` resamplings of whole
    runs: in each, every group's list of curves (e.g. one attention's runs) is drawn with replacement, to its
    own length. statistic(resampled {group: [curve, ...]}) -> {name: value}; a resample on which it raises
    ValueError/RuntimeError/LinAlgError is skipped."""
    import numpy as np

    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {}
    for _ in range(resamples):
        drawn = {group: [items[i] for i in rng.integers(0, len(items), len(items))] for group, items in curves.items()}
        try:
            values = statistic(drawn)
        except (ValueError, RuntimeError, np.linalg.LinAlgError):
            continue
        for name, value in values.items():
            if value is not None and np.isfinite(value):
                samples.setdefault(name, []).append(float(value))
    tail = 100 * (1 - level) / 2
    return {name: (float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))) for name, v in samples.items()}


def compute_to_reach_loss(frontier: Sequence[tuple[float, float]], target: float) -> float | None:
    """The compute at which a frontier (`lower_envelope`, sorted by compute) first reaches loss <= `target`,
    interpolated linearly in log-log between the two frontier points around it; None when the frontier never
    gets that low or is already below it at its first point (not bracketed: no honest value)."""
    import math

    for i, (c, value) in enumerate(frontier):
        if value <= target:
            if i == 0:
                return None
            (c0, v0), (c1, v1) = frontier[i - 1], (c, value)
            t = (math.log(target) - math.log(v0)) / (math.log(v1) - math.log(v0))
            return math.exp(math.log(c0) + t * (math.log(c1) - math.log(c0)))
    return None


def fit_compute_multiplier(compute: float, reference: Fit, other: Fit) -> float | None:
    """How many times less compute `other` needs than `reference` to reach the loss `reference` reaches at
    `compute` (both fits of L = E + A*C^-alpha): compute / C_other with power_law(C_other, other) =
    power_law(compute, reference). > 1: `other` needs less. None when `other` never gets that low (its E is
    at or above the target)."""
    target = power_law(compute, reference)
    excess = target - other.get("irreducible", 0.0)
    if excess <= 0:
        return None
    return compute / (excess / other["coefficient"]) ** (-1.0 / other["exponent"])
