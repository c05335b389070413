"""Stage `select`: class-wise coreset scores with Ray Data, one class per group.

embed/embeddings.parquet -> groupby(label).map_groups(score) -> select/scores.parquet
(id, label, criterion, score, kept), a per-class table in the manifest, and
select/examples.png: the highest-, middle- and lowest-scored images of a few classes.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import ray
import ray.data
from ray.data.context import ShuffleStrategy

from dedt_ray.artifacts import EMBEDDINGS
from dedt_ray.artifacts import SCORES as SCORES_PATH
from dedt_ray.config import Config
from dedt_ray.selection import class_seed, keep_mask_class, n_keep_for, score_class
from dedt_ray.stages import StageContext
from dedt_ray.store import RunStore

SCORES = SCORES_PATH[1]
EXAMPLES = "examples.png"
HASH_SHUFFLE_BYTES = 2**30  # select.shuffle=auto: hash shuffle from 1 GiB of embeddings


def _score_group(
    group: pa.Table, criterion: str, keep_ratio: float, seed: int, k: int, index: str
) -> pa.Table:
    group = group.sort_by("id")  # a deterministic row order within the class
    label = int(group.column("label")[0].as_py())
    emb = group.column("embedding").combine_chunks()
    x = emb.flatten().to_numpy(zero_copy_only=False).reshape(len(group), emb.type.list_size)
    keep = n_keep_for(len(group), keep_ratio)
    scores, notes = score_class(
        x, criterion, n_keep=keep, seed=class_seed(seed, label), k=k, index=index
    )
    kept = keep_mask_class(scores, criterion, keep)
    note = [""] * len(group)
    if notes:
        note[0] = "; ".join(notes)
    return pa.table(
        {
            "id": group.column("id"),
            "label": group.column("label"),
            "criterion": pa.array([criterion] * len(group)),
            "score": pa.array(np.asarray(scores, dtype=np.float64)),
            "kept": pa.array(np.asarray(kept, dtype=bool)),
            "note": pa.array(note),
        }
    )


def class_table(table: pa.Table) -> list[dict[str, Any]]:
    """Per class: n, kept, and score quantiles."""
    labels = table.column("label").to_numpy()
    scores = table.column("score").to_numpy()
    kept = table.column("kept").to_numpy(zero_copy_only=False)
    rows = []
    for label in np.unique(labels):
        m = labels == label
        q = np.quantile(scores[m], [0.0, 0.25, 0.5, 0.75, 1.0])
        rows.append(
            {
                "label": int(label),
                "n": int(m.sum()),
                "kept": int(kept[m].sum()),
                "score_quantiles": [round(float(v), 6) for v in q],
            }
        )
    return rows


def shuffle_strategy(choice: str, embedding_bytes: int) -> ShuffleStrategy:
    """The groupby shuffle for `select.shuffle`.

    The pull-based sort shuffle starts no actors (light on small inputs and clusters) but holds
    its input, map and reduce outputs at once: ~3.5x the embeddings at ImageNet size. The hash
    shuffle streams blocks into aggregator actors: ~2x, at a few seconds of actor start.
    """
    if choice == "auto":
        choice = "hash" if embedding_bytes >= HASH_SHUFFLE_BYTES else "sort"
    if choice == "hash":
        return ShuffleStrategy.HASH_SHUFFLE
    return ShuffleStrategy.SORT_SHUFFLE_PULL_BASED


def embedding_bytes(store: RunStore) -> int:
    """float32 bytes of the embedding matrix, from the parquet metadata (no data read)."""
    files = pads.dataset(store.uri(store.path(*EMBEDDINGS)), format="parquet")
    dim = files.schema.field("embedding").type.list_size
    return files.count_rows() * max(1, dim) * 4


def run(cfg: Config, store: RunStore, ctx: StageContext) -> dict[str, Any]:
    sel = cfg.select
    size = embedding_bytes(store)
    strategy = shuffle_strategy(sel.shuffle, size)
    context = ray.data.DataContext.get_current()
    context.shuffle_strategy = strategy
    # Aggregators write their partitions out a few at a time (by default all at once, which
    # holds a second copy of the embeddings): at ImageNet size on 2 CPUs, 2.0x instead of 2.6x.
    cpus = int(ray.cluster_resources().get("CPU", 1))
    context.max_hash_shuffle_finalization_batch_size = max(1, cpus // 2)
    ds = ray.data.read_parquet(store.uri(store.path(*EMBEDDINGS)))
    scored = (
        ds.groupby("label")
        .map_groups(
            _score_group,
            fn_kwargs={
                "criterion": sel.criterion,
                "keep_ratio": sel.keep_ratio,
                "seed": sel.seed,
                "k": sel.k,
                "index": sel.knn_index,
            },
            batch_format="pyarrow",
        )
        .materialize()
    )
    out = store.path(*SCORES_PATH)
    scored.drop_columns(["note"]).write_parquet(store.uri(out), mode="overwrite")

    refs = scored.select_columns(["id", "label", "score", "kept", "note"]).to_arrow_refs()
    # the hash shuffle leaves empty partitions: blocks without rows (and without a schema)
    table = pa.concat_tables([t for t in ray.get(refs) if t.num_rows])
    per_class = class_table(table)
    notes = {
        int(lbl): note
        for lbl, note in zip(
            table.column("label").to_pylist(), table.column("note").to_pylist(), strict=True
        )
        if note
    }
    store.write_bytes(examples_png(cfg, table), "select", EXAMPLES)
    rows, kept = len(table), int(sum(c["kept"] for c in per_class))
    summary = (
        f"kept {kept}/{rows} ({sel.criterion}, keep_ratio {sel.keep_ratio}) "
        f"over {len(per_class)} classes"
    )
    if notes:
        summary += f"; regularised {len(notes)} degenerate classes"
    return {
        "rows": rows,
        "kept": kept,
        "skipped": 0,
        "criterion": sel.criterion,
        "shuffle": strategy.value,
        "per_class": per_class,
        "degenerate": {str(k): v for k, v in notes.items()},
        "summary": summary,
    }


def examples_png(cfg: Config, table: pa.Table, classes: int = 6, per_band: int = 4) -> bytes:
    """Highest / middle / lowest scored images of a few classes, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dedt_ray.data import fetch_images

    labels = table.column("label").to_numpy()
    scores = table.column("score").to_numpy()
    ids = np.asarray(table.column("id").to_pylist(), dtype=object)
    kept = table.column("kept").to_numpy(zero_copy_only=False)
    chosen = np.unique(labels)[:classes]
    picks: list[tuple[int, str, list[str], list[bool]]] = []
    for label in chosen:
        idx = np.flatnonzero(labels == label)
        order = idx[np.argsort(-scores[idx], kind="stable")]
        mid = max(0, len(order) // 2 - per_band // 2)
        for band, sl in (
            ("highest", order[:per_band]),
            ("middle", order[mid : mid + per_band]),
            ("lowest", order[-per_band:]),
        ):
            picks.append((int(label), band, list(ids[sl]), list(kept[sl])))
    images = fetch_images(cfg.data, {i for _, _, row, _ in picks for i in row})
    fig, axes = plt.subplots(
        len(chosen), 3 * per_band, figsize=(3 * per_band * 0.9, len(chosen) * 1.0), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    for n, (label, _band, row_ids, row_kept) in enumerate(picks):
        r, c0 = n // 3, (n % 3) * per_band
        for j, (rid, was_kept) in enumerate(zip(row_ids, row_kept, strict=True)):
            ax = axes[r, c0 + j]
            img = images.get(rid)
            if img is not None:
                ax.imshow(img.squeeze(), cmap="gray" if img.shape[-1] == 1 else None)
            ax.set_title(
                "kept" if was_kept else "dropped", fontsize=6, color="green" if was_kept else "red"
            )
            if j == 0 and c0 == 0:
                ax.text(
                    -0.15,
                    0.5,
                    f"class {label}",
                    transform=ax.transAxes,
                    fontsize=7,
                    ha="right",
                    va="center",
                )
    fig.suptitle(
        f"select: {cfg.select.criterion} scores; {per_band} columns each of the highest, "
        "middle and lowest scored",
        fontsize=9,
    )
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()
