"""Quality-against-compute plots (matplotlib, PNG bytes), for the report and the study."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any


def _figure(width: float = 6.0, height: float = 3.6) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height), dpi=100)


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def curves_png(
    curves: dict[str, Sequence[dict[str, Any]]],
    metric: str,
    noise_floor: float | None = None,
    target: float | None = None,
) -> bytes:
    """`metric` against training FLOPs (log scale), one line per named curve; the noise floor
    (real vs real at the curve's sample count) and a target as horizontal lines."""
    fig, ax = _figure()
    for name, points in curves.items():
        pts = sorted((p["train_flops"], p[metric]) for p in points if p.get(metric) is not None)
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-", ms=3, label=name)
    _axes(ax, metric, "training FLOPs", noise_floor, target, 8)
    return _png(fig)


def spread_png(
    settings: dict[str, dict[str, Sequence[dict[str, Any]]]],
    metric: str,
    noise_floor: float | None = None,
    target: float | None = None,
    grid_points: int = 40,
) -> bytes:
    """One colour per setting: the mean over seeds of `metric` against training FLOPs, the
    seeds' range shaded (each seed's curve interpolated in log-compute on a common grid)."""
    import numpy as np

    fig, ax = _figure(7.0, 4.2)
    for name, seeds in settings.items():
        curves = [sorted((p["train_flops"], p[metric]) for p in pts if p.get(metric) is not None)
                  for pts in seeds.values()]  # fmt: skip
        curves = [c for c in curves if len(c) >= 2]
        if not curves:
            continue
        lo = max(c[0][0] for c in curves)
        hi = min(c[-1][0] for c in curves)
        if hi <= lo:
            continue
        grid = np.geomspace(lo, hi, grid_points)
        ys = np.array([np.interp(np.log(grid), np.log([x for x, _ in c]), [y for _, y in c])
                       for c in curves])  # fmt: skip
        (line,) = ax.plot(grid, ys.mean(0), label=f"{name} ({len(curves)} seeds)")
        ax.fill_between(grid, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.2)
    _axes(ax, metric, "training FLOPs (incl. selection / reference / proxy compute)",
          noise_floor, target, 7)  # fmt: skip
    return _png(fig)


def _axes(
    ax: Any, metric: str, xlabel: str, noise_floor: float | None, target: float | None,
    fontsize: int,
) -> None:  # fmt: skip
    """Log compute axis, labels, grid, legend; the noise floor and the target as lines."""
    if noise_floor is not None and noise_floor == noise_floor:
        ax.axhline(noise_floor, color="gray", ls=":", label="noise floor (real vs real)")
    if target is not None:
        ax.axhline(target, color="tab:red", ls="--", lw=1, label="target")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{metric} (lower is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=fontsize)
