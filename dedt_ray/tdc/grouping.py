"""Timestep groups by difficulty (TDC step 2).

Difficulty is the signal-to-noise ratio in decibels, ``SNR_dB(t) = 10 log10(abar_t / (1 -
abar_t))``, which falls as ``t`` grows. A grouping is a list of half-open ranges ``[lo, hi)``
covering ``0 .. T-1`` in increasing ``t``: group 0 is the least noisy (small ``t``), the last
the noisiest.

Rules:

- ``quantile``: equal timestep counts.
- ``equal_snr``: equal-width dB bins between the smallest and the largest finite SNR_dB. Under
  some schedules (cosine, many groups) a bin can hold no timestep at all; that is an error (it
  names the empty bin): the number of groups fixes the FLOPs budgets, so groups are never merged
  silently. Use fewer groups, ``quantile`` or ``explicit`` then.
- ``explicit``: ``n_groups - 1`` cut points, in timesteps (``boundary_unit="timestep"``, the first
  timestep of each next group, increasing) or in dB (``boundary_unit="snr_db"``, decreasing: each
  next group starts at the first timestep whose SNR_dB is below the cut).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

Group = tuple[int, int]
Rule = Literal["equal_snr", "quantile", "explicit"]


def snr_db(scheduler: Any) -> np.ndarray:
    """SNR in dB per training timestep from a diffusers scheduler's ``alphas_cumprod`` (float64).

    A timestep with ``abar_t = 0`` (zero terminal SNR) gives ``-inf``.
    """
    abar = np.asarray(scheduler.alphas_cumprod, dtype=np.float64)
    if abar.ndim != 1 or len(abar) == 0:
        raise ValueError(
            f"scheduler.alphas_cumprod must be a non-empty 1-D array, got {abar.shape}"
        )
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(abar / (1.0 - abar))


def validate_groups(groups: Sequence[Group], num_timesteps: int) -> list[Group]:
    """Check that ``groups`` are ordered, non-empty, contiguous and cover ``0 .. T-1``."""
    if not groups:
        raise ValueError("no timestep groups")
    out = [(int(lo), int(hi)) for lo, hi in groups]
    expected_lo = 0
    for i, (lo, hi) in enumerate(out):
        if lo != expected_lo:
            raise ValueError(
                f"group {i} starts at t={lo} but must start at t={expected_lo} "
                "(groups must be ordered and contiguous from t=0)"
            )
        if hi <= lo:
            raise ValueError(f"group {i} = [{lo}, {hi}) is empty")
        expected_lo = hi
    if expected_lo != num_timesteps:
        raise ValueError(
            f"groups end at t={expected_lo} but must cover all {num_timesteps} timesteps"
        )
    return out


def _from_cuts(cuts: Sequence[int], num_timesteps: int) -> list[Group]:
    edges = [0, *cuts, num_timesteps]
    return [(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]


def _check_decreasing(db: np.ndarray) -> None:
    rises = np.nonzero(np.diff(db) > 0)[0]
    if len(rises):
        raise ValueError(f"the schedule's SNR_dB rises at t={rises[0] + 1}; it must fall with t")


def _equal_snr(db: np.ndarray, n_groups: int) -> list[Group]:
    _check_decreasing(db)
    finite = db[np.isfinite(db)]
    if len(finite) == 0:
        raise ValueError("the schedule has no finite SNR_dB value")
    hi_db, lo_db = float(finite.max()), float(finite.min())
    width = (hi_db - lo_db) / n_groups
    if width <= 0:
        raise ValueError("equal_snr needs an SNR range; the schedule's SNR_dB is constant")
    clipped = np.where(np.isfinite(db), db, lo_db)
    bins = np.minimum(((hi_db - clipped) // width).astype(int), n_groups - 1)
    counts = np.bincount(bins, minlength=n_groups)
    for i, count in enumerate(counts):
        if count == 0:
            top = hi_db - i * width
            raise ValueError(
                f"equal_snr bin {i} ({top:.2f} dB to {top - width:.2f} dB) holds no timestep under "
                f"this schedule with n_groups={n_groups}; use fewer groups, rule='quantile' or "
                "rule='explicit'"
            )
    return _from_cuts(np.cumsum(counts)[:-1].tolist(), len(db))


def _explicit(db: np.ndarray, n_groups: int, boundaries: Sequence[float], unit: str) -> list[Group]:
    num_timesteps = len(db)
    if len(boundaries) != n_groups - 1:
        raise ValueError(
            f"explicit grouping into {n_groups} groups needs {n_groups - 1} boundaries, "
            f"got {len(boundaries)}: {list(boundaries)}"
        )
    if unit == "timestep":
        cuts = []
        for b in boundaries:
            if float(b) != int(b) or not 0 < int(b) < num_timesteps:
                raise ValueError(
                    f"timestep boundary {b} must be an integer in (0, {num_timesteps})"
                )
            if cuts and int(b) <= cuts[-1]:
                raise ValueError(f"timestep boundary {b} is not above the previous one {cuts[-1]}")
            cuts.append(int(b))
        return _from_cuts(cuts, num_timesteps)
    if unit == "snr_db":
        _check_decreasing(db)
        cuts, prev = [], None
        for b in boundaries:
            if prev is not None and not b < prev:
                raise ValueError(f"SNR boundary {b} dB must be below the previous one {prev} dB")
            cut = int(np.argmax(db < b)) if np.any(db < b) else num_timesteps
            lo = cuts[-1] if cuts else 0
            if not lo < cut < num_timesteps:
                raise ValueError(
                    f"SNR boundary {b} dB leaves an empty group (it falls at t={cut}; the "
                    f"schedule spans {db[0]:.2f} dB to {db[-1]:.2f} dB)"
                )
            cuts.append(cut)
            prev = b
        return _from_cuts(cuts, num_timesteps)
    raise ValueError(f"boundary_unit must be 'timestep' or 'snr_db', got {unit!r}")


def group_timesteps(
    scheduler: Any,
    n_groups: int,
    rule: Rule = "quantile",
    boundaries: Sequence[float] | None = None,
    boundary_unit: Literal["timestep", "snr_db"] = "timestep",
) -> list[Group]:
    """Split the scheduler's training timesteps into ``n_groups`` ranges ``[lo, hi)``."""
    db = snr_db(scheduler)
    num_timesteps = len(db)
    if not 1 <= n_groups <= num_timesteps:
        raise ValueError(f"n_groups must be in [1, {num_timesteps}], got {n_groups}")
    if rule == "quantile":
        cuts = [round(i * num_timesteps / n_groups) for i in range(1, n_groups)]
        groups = _from_cuts(cuts, num_timesteps)
    elif rule == "equal_snr":
        groups = _equal_snr(db, n_groups)
    elif rule == "explicit":
        if boundaries is None:
            raise ValueError("rule='explicit' needs boundaries")
        groups = _explicit(db, n_groups, boundaries, boundary_unit)
    else:
        raise ValueError(f"rule must be 'equal_snr', 'quantile' or 'explicit', got {rule!r}")
    return validate_groups(groups, num_timesteps)


def group_sizes(groups: Sequence[Group]) -> list[int]:
    """Number of timesteps in each group."""
    return [hi - lo for lo, hi in groups]


def group_of(t: int | np.ndarray | Any, groups: Sequence[Group]) -> int | np.ndarray:
    """Index of the group holding timestep ``t`` (an int, or elementwise for an array/tensor)."""
    starts = np.asarray([lo for lo, _ in groups])
    end = groups[-1][1]
    arr = np.asarray(t.cpu() if hasattr(t, "cpu") else t)
    if np.any(arr < 0) or np.any(arr >= end):
        bad = arr[(arr < 0) | (arr >= end)].ravel()[0]
        raise ValueError(f"timestep {bad} is outside the groups' range [0, {end})")
    idx = np.searchsorted(starts, arr, side="right") - 1
    return int(idx) if idx.ndim == 0 else idx


def describe_groups(scheduler: Any, groups: Sequence[Group]) -> list[dict[str, Any]]:
    """One row per group for logging: range, size, SNR_dB range (max at lo, min at hi - 1)."""
    db = snr_db(scheduler)
    return [
        {
            "group": i,
            "t_lo": lo,
            "t_hi": hi,
            "size": hi - lo,
            "snr_db_max": float(db[lo]),
            "snr_db_min": float(db[hi - 1]),
        }
        for i, (lo, hi) in enumerate(groups)
    ]
