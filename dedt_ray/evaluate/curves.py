"""Time to quality, as arithmetic on quality curves (pure numpy).

A curve is a run's sequence of (training compute, metric) points, lower metric better.
- `noise`: the metric's noise at the curve's sample count, from the evaluations themselves:
  each evaluation measures two disjoint halves of its samples, and half their difference
  (`|m_a - m_b| / 2`, the spread of one full-size measurement for a statistic whose variance
  scales as 1/n) is pooled over the evaluations by the median.
- `convergence`: the stopping rule of `train.until: converged`.
- `compute_to_target`: the first crossing of a target, interpolated linearly in log-compute.
- `bootstrap_speedup` / `mean_interval`: uncertainty over seeds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats


def noise(half_a: Sequence[float], half_b: Sequence[float]) -> float:
    """The metric's noise at full sample size: the median over evaluations of |a - b| / 2."""
    a, b = np.asarray(half_a, np.float64), np.asarray(half_b, np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    if not ok.any():
        return float("nan")
    return float(np.median(np.abs(a[ok] - b[ok]) / 2.0))


def convergence(values: Sequence[float], sigma: float, patience: int) -> tuple[bool, str]:
    """Stop when `patience` evaluations in a row have not improved on the best value so far by
    more than the noise `sigma`. Returns (stop, why) in words."""
    if patience < 1:
        raise ValueError(f"patience must be >= 1, got {patience}")
    best, since = math.inf, 0
    for value in values:
        if value < best - (sigma if math.isfinite(best) else 0.0):
            best, since = value, 0
        else:
            best, since = min(best, value), since + 1
    if len(values) > patience and since >= patience:
        why = (
            f"converged: {since} evaluations without improving on {best:.4g} by more than "
            f"its noise {sigma:.3g}"
        )
        return True, why
    return False, f"improving (best {best:.4g}, {since} evaluations since)"


def compute_to_target(
    compute: Sequence[float], values: Sequence[float], target: float
) -> float | None:
    """The compute at which the curve first reaches `target` (value <= target), interpolated
    linearly in log-compute between the evaluated points; None when it never does."""
    c, v = np.asarray(compute, np.float64), np.asarray(values, np.float64)
    order = np.argsort(c, kind="stable")
    c, v = c[order], v[order]
    for i in range(len(c)):
        if not np.isfinite(v[i]) or v[i] > target:
            continue
        if i == 0 or not np.isfinite(v[i - 1]) or v[i - 1] == v[i]:
            return float(c[i])
        frac = (v[i - 1] - target) / (v[i - 1] - v[i])
        lo, hi = math.log(c[i - 1]), math.log(c[i])
        return float(math.exp(lo + frac * (hi - lo)))
    return None


def mean_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): a Student-t interval over seeds (the mean alone for one seed)."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], np.float64)
    if len(x) == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(x.mean())
    if len(x) < 2:
        return mean, mean, mean
    half = float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return mean, mean - half, mean + half


def bootstrap_speedup(
    baseline: Sequence[float | None],
    setting: Sequence[float | None],
    draws: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float | None, float | None, float | None]:
    """Speed-up = mean baseline compute to target / mean setting compute to target, with a
    bootstrap interval (seeds of both resampled with replacement). A seed that never reaches
    the target counts as infinite compute: a resample whose mean is infinite gives speed-up 0
    (for the setting) or infinity (for the baseline). (point, low, high); None if the point
    itself is undefined."""
    b = np.asarray([math.inf if x is None else x for x in baseline], np.float64)
    s = np.asarray([math.inf if x is None else x for x in setting], np.float64)
    if not len(b) or not len(s):
        return None, None, None
    with np.errstate(invalid="ignore", divide="ignore"):
        point = float(b.mean() / s.mean())
        rng = np.random.default_rng(seed)
        rb = b[rng.integers(0, len(b), (draws, len(b)))].mean(1)
        rs = s[rng.integers(0, len(s), (draws, len(s)))].mean(1)
        ratios = rb / rs
    ratios = ratios[~np.isnan(ratios)]
    if math.isnan(point):
        return None, None, None
    if not len(ratios):
        return point, point, point
    lo, hi = np.quantile(ratios, [(1 - level) / 2, (1 + level) / 2])
    return point, float(lo), float(hi)
