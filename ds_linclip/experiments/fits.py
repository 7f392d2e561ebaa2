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
