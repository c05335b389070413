"""The select stage's pictures: scored examples per group, and a few duplicate pairs."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa

from dedt_ray.config import Config


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def _show(ax, img: np.ndarray | None) -> None:
    if img is not None:
        ax.imshow(img.squeeze(), cmap="gray" if img.shape[-1] == 1 else None)


def _bands(table: pa.Table, groups: int, per_band: int) -> tuple[list, list]:
    """The first `groups` groups' highest / middle / lowest scored rows (duplicates left out):
    the groups shown and (group, ids, kept) per band."""
    table = table.filter(pa.compute.invert(table.column("duplicate")))
    group = table.column("group").to_numpy()
    scores = table.column("score").to_numpy()
    ids = np.asarray(table.column("id").to_pylist(), dtype=object)
    kept = table.column("kept").to_numpy(zero_copy_only=False)
    chosen = np.unique(group)[:groups]
    picks = []
    for g in chosen:
        idx = np.flatnonzero(group == g)
        order = idx[np.argsort(-scores[idx], kind="stable")]
        mid = max(0, len(order) // 2 - per_band // 2)
        for sl in (order[:per_band], order[mid : mid + per_band], order[-per_band:]):
            picks.append((int(g), list(ids[sl]), list(kept[sl])))
    return list(chosen), picks


def examples_png(
    cfg: Config, table: pa.Table, mode: str, groups: int = 6, per_band: int = 4
) -> bytes:
    """Highest / middle / lowest scored images of a few groups, side by side."""
    from dedt_ray.data import fetch_images

    plt = _pyplot()
    chosen, picks = _bands(table, groups, per_band)
    images = fetch_images(cfg.data, {i for _, row, _ in picks for i in row})
    fig, axes = plt.subplots(
        len(chosen), 3 * per_band, figsize=(3 * per_band * 0.9, len(chosen) * 1.0), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    name = {"labels": "class", "clusters": "cluster"}.get(mode, "all")
    for n, (g, row_ids, row_kept) in enumerate(picks):
        r, c0 = n // 3, (n % 3) * per_band
        for j, (rid, was_kept) in enumerate(zip(row_ids, row_kept, strict=True)):
            ax = axes[r, c0 + j]
            _show(ax, images.get(rid))
            ax.set_title(
                "kept" if was_kept else "dropped", fontsize=6, color="green" if was_kept else "red"
            )
            if j == 0 and c0 == 0:
                label = f"{name} {g}" if mode != "none" else "all rows"
                ax.text(-0.15, 0.5, label, transform=ax.transAxes, fontsize=7, ha="right")
    fig.suptitle(
        f"select: {cfg.select.criterion} scores; {per_band} columns each of the highest, "
        "middle and lowest scored",
        fontsize=9,
    )
    return _png(fig)


def duplicates_png(cfg: Config, duplicates: pa.Table, pairs: int = 8) -> bytes:
    """A few removed rows beside the row kept for them, at evenly spaced similarities."""
    from dedt_ray.data import fetch_images

    plt = _pyplot()
    table = duplicates.sort_by([("similarity", "ascending"), ("id", "ascending")])
    at = np.unique(np.linspace(0, len(table) - 1, min(pairs, len(table))).round().astype(int))
    rows = [table.slice(int(i), 1).to_pylist()[0] for i in at]
    images = fetch_images(cfg.data, {r["id"] for r in rows} | {r["duplicate_of"] for r in rows})
    fig, axes = plt.subplots(2, len(rows), figsize=(1.3 * len(rows), 2.9), squeeze=False)
    for j, row in enumerate(rows):
        for i, (rid, what) in enumerate(((row["duplicate_of"], "kept"), (row["id"], "removed"))):
            ax = axes[i, j]
            ax.axis("off")
            _show(ax, images.get(rid))
            title = f"{what}\ncos {row['similarity']:.3f}" if i else what
            ax.set_title(title, fontsize=6, color="red" if i else "green")
    fig.suptitle(
        f"select: {len(duplicates)} near-duplicates removed (cosine >= {cfg.select.dedup}); "
        "kept row above, removed below",
        fontsize=8,
    )
    return _png(fig)
