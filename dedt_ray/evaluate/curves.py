"""Time to quality, as arithmetic on quality curves (pure numpy).

A curve is a run's sequence of (training compute, metric) points, lower metric better.
- `noise`: the metric's noise at the curve's sample count, from the evaluations themselves:
  each evaluation measures two disjoint halves of its samples, and half their difference
  (`|m_a - m_b| / 2`, the spread of one full-size measurement for a statistic whose variance
  scales as 1/n) is pooled over the evaluations by the median.
- `convergence`: the stopping rule of `train.until: converged`.
- `compute_to_target`: the first crossing of a target, interpolated linearly in log-compute.
- `bootstrap_speedup` / `mean_interval`: uncertainty over seeds.
- `summarize_study`: a study's target, and per setting the compute to reach it, the speed-up
  against the baseline and the metric at the baseline's number of epochs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

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


def value_at(compute: Sequence[float], values: Sequence[float], at: float) -> float | None:
    """The curve's value at compute `at`, interpolated linearly in log-compute; None outside
    the evaluated range."""
    pts = sorted((c, v) for c, v in zip(compute, values, strict=True) if np.isfinite(v) and c > 0)
    if not pts or not pts[0][0] <= at <= pts[-1][0]:
        return None
    c, v = np.log([p[0] for p in pts]), [p[1] for p in pts]
    return float(np.interp(math.log(at), c, v))


# -- a study: settings x seeds ------------------------------------------------------------------
@dataclass
class SeedRun:
    """One finished run of a study: its curve points (`train_flops`, `images_seen`, the
    metric and its split halves), training rows, the final evaluation's metric, images seen."""

    points: list[dict]
    rows: int
    evaluated: float | None = None
    images_seen: int = 0


def _interval(values: Sequence[float | None], level: float) -> dict[str, float | None]:
    mean, low, high = mean_interval([v for v in values if v is not None], level)
    out = {"mean": mean, "low": low, "high": high}
    return {k: None if v is None or not math.isfinite(v) else v for k, v in out.items()}


def to_target(run: SeedRun, metric: str, target: float) -> float | None:
    """Compute (training FLOPs incl. offsets) at which the run first reaches `target`."""
    flops, values = [p["train_flops"] for p in run.points], [p[metric] for p in run.points]
    return compute_to_target(flops, values, target)


def at_images(run: SeedRun, metric: str, images: float) -> float | None:
    """The run's metric after `images` images seen (interpolated in log-images)."""
    return value_at([p["images_seen"] for p in run.points], [p[metric] for p in run.points], images)


def run_noise(run: SeedRun, metric: str) -> float:
    """The noise of one evaluation of the run's curve (`noise` of its split halves)."""
    return noise([p[f"{metric}_half_a"] for p in run.points],
                 [p[f"{metric}_half_b"] for p in run.points])  # fmt: skip


def setting_summary(
    runs: dict[int, SeedRun],
    base: dict[int, SeedRun],
    metric: str,
    target: float,
    epochs: float | None,
    draws: int = 2000,
    level: float = 0.95,
) -> dict:
    """One setting against the baseline: final metric, compute to target per seed, speed-up
    with a bootstrap interval over seeds, the metric at the baseline's `epochs`."""
    reach = {seed: to_target(r, metric, target) for seed, r in runs.items()}
    speed: tuple = (None, None, None)
    if runs:
        baseline = [to_target(r, metric, target) for r in base.values()]
        speed = bootstrap_speedup(baseline, list(reach.values()), draws, 0, level)
    equal = {s: at_images(r, metric, epochs * r.rows) for s, r in runs.items()} if epochs else {}
    done = [r for r in runs.values() if r.points]
    return {
        "seeds": sorted(runs),
        "final": _interval([r.points[-1][metric] for r in done], level),
        "evaluated": _interval([r.evaluated for r in done], level),
        "compute_spent": _interval([r.points[-1]["train_flops"] for r in done], level),
        "compute_to_target": {str(s): "not reached" if c is None else c for s, c in reach.items()},
        "speedup": dict(zip(("point", "low", "high"), speed, strict=True)),
        "equal_epochs": {
            "epochs": epochs,
            "values": {str(s): "beyond the run" if v is None else v for s, v in equal.items()},
            **_interval(list(equal.values()), level),
        },
        "noise": float(np.nanmedian([run_noise(r, metric) for r in done])) if done else None,
    }


def summarize_study(
    runs: dict[str, dict[int, SeedRun]],
    baseline: str,
    metric: str,
    tolerance: float,
    draws: int = 2000,
    level: float = 0.95,
) -> dict:
    """The target (the baseline's final metric, mean over seeds, x (1 + tolerance)) and each
    setting's summary (`setting_summary`); the baseline's epochs (images seen per training
    row) give every setting's equal-epochs point."""
    base = runs[baseline]
    final = mean_interval([r.points[-1][metric] for r in base.values() if r.points], level)[0]
    target = final * (1 + tolerance)
    per_row = [r.images_seen / r.rows for r in base.values() if r.rows]
    epochs = float(np.mean(per_row)) if per_row else None
    return {
        "metric": metric,
        "baseline": baseline,
        "baseline_final": final,
        "tolerance": tolerance,
        "target": target,
        "level": level,
        "baseline_epochs": epochs,
        "settings": {
            name: setting_summary(seeds, base, metric, target, epochs, draws, level)
            for name, seeds in runs.items()
        },
    }


SUMMARY_HEADER = [
    "setting", "status", "seeds done", "seeds failed", "final mean", "final low", "final high",
    "evaluated mean", "at baseline epochs", "FLOPs spent", "FLOPs to target per seed",
    "speed-up", "speed-up low", "speed-up high",
]  # fmt: skip


def summary_rows(summary: dict) -> list[list]:
    """A study summary (as `dedt-ray study` writes it) as the rows of its speed-up table."""
    rows = []
    for name, s in summary["settings"].items():
        speed, final = s.get("speedup") or {}, s.get("final") or {}
        reach = "; ".join(
            f"{seed}: {v if isinstance(v, str) else f'{v:.3g}'}"
            for seed, v in (s.get("compute_to_target") or {}).items()
        )
        rows.append([
            name, s.get("status"), len(s.get("seeds") or []), len(s.get("failed") or {}),
            final.get("mean"), final.get("low"), final.get("high"),
            (s.get("evaluated") or {}).get("mean"), (s.get("equal_epochs") or {}).get("mean"),
            (s.get("compute_spent") or {}).get("mean"), reach,
            speed.get("point"), speed.get("low"), speed.get("high"),
        ])  # fmt: skip
    return rows
