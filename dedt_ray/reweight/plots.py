"""The two pictures of the reweight stage (matplotlib, Agg): weights over steps, final bars."""

from __future__ import annotations

import io

import numpy as np

MAX_LINES = 12  # more classes: only the 6 highest and 6 lowest final weights get a line


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def weights_over_steps_png(
    steps: np.ndarray, weights: np.ndarray, average: np.ndarray, names: list[str]
) -> bytes:
    """Current weight (solid) and running average (dashed) of each class against step."""
    plt = _pyplot()
    k = weights.shape[1]
    order = np.argsort(-average[-1]) if len(average) else np.arange(k)
    shown = order if k <= MAX_LINES else np.concatenate([order[:6], order[-6:]])
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    colors = plt.get_cmap("tab10" if len(shown) <= 10 else "tab20")
    for i, c in enumerate(shown):
        color = colors(i % colors.N)
        ax.plot(steps, weights[:, c], color=color, lw=1.2, label=names[c])
        ax.plot(steps, average[:, c], color=color, lw=1.0, ls="--")
    ax.axhline(1.0 / k, color="0.4", lw=0.8, ls=":", label="uniform")
    if len(weights) and weights[:, shown].max() / max(weights[:, shown].min(), 1e-12) > 50:
        ax.set_yscale("log")
    ax.set_xlabel("proxy step")
    ax.set_ylabel("class weight")
    title = "DRO class weights (solid: current, dashed: running average)"
    if k > MAX_LINES:
        title += f"; 12 of {k} classes"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2, loc="best")
    return _png(fig)


def final_weights_png(weights: np.ndarray, names: list[str]) -> bytes:
    """The averaged (output) weights as bars, the uniform weight as a line."""
    plt = _pyplot()
    k = len(weights)
    fig, ax = plt.subplots(figsize=(max(5.0, min(14.0, 0.45 * k + 2)), 3.8))
    if k <= 40:
        ax.bar(range(k), weights, color="tab:blue")
        ax.set_xticks(range(k), names, rotation=90 if max(map(len, names)) > 3 else 0, fontsize=8)
        ax.set_xlabel("class")
    else:  # too many to label: sorted
        ax.bar(range(k), np.sort(weights)[::-1], width=1.0, color="tab:blue")
        ax.set_xlabel(f"{k} classes, sorted by weight")
    ax.axhline(1.0 / k, color="k", lw=0.8, ls=":", label=f"uniform 1/{k}")
    ax.set_ylabel("class weight (average over steps)")
    ax.set_title("DRO class weights used by the train stage", fontsize=9)
    ax.legend(fontsize=8)
    return _png(fig)
