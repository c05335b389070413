"""Stage `select`: group-wise coreset scores with Ray Data, one group per task.

embed/embeddings.parquet -> [fit spherical k-means on a sample (one task)] -> map over
blocks (check, assign clusters, set `group`) -> [groupby(cluster): semantic dedup] ->
groupby(group).map_groups(score) -> select/scores.parquet (id, label, group, criterion,
score, kept, duplicate), select/duplicates.parquet (id, duplicate_of, similarity), a
per-group table and the grouping in the manifest, and select/examples.png (+ duplicates.png).
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray
import ray.data
from ray.data.context import ShuffleStrategy

from dedt_ray.artifacts import EMBEDDINGS
from dedt_ray.artifacts import SCORES as SCORES_PATH
from dedt_ray.config import Config, ConfigError, SelectConfig
from dedt_ray.selection import class_seed, keep_mask_class, n_keep_for, score_class
from dedt_ray.selection.clusters import (
    assign_clusters,
    check_clusters,
    default_clusters,
    fit_clusters,
    fit_sample_size,
    in_fit_sample,
)
from dedt_ray.selection.dedup import dedup_cluster
from dedt_ray.selection.pictures import duplicates_png, examples_png
from dedt_ray.stages import StageContext
from dedt_ray.store import RunStore

SCORES = SCORES_PATH[1]
DUPLICATES = "duplicates.parquet"
EXAMPLES = "examples.png"
DUPLICATES_PNG = "duplicates.png"
SCORE_COLUMNS = ["id", "label", "group", "criterion", "score", "kept", "duplicate"]
HASH_SHUFFLE_BYTES = 2**30  # select.shuffle=auto: hash shuffle from 1 GiB of embeddings


@dataclass(frozen=True)
class Grouping:
    """What selection runs within, and the k-means k when clusters are needed."""

    mode: str  # labels | clusters | none
    clusters: int | None  # k when k-means runs (groups=clusters or dedup on), else None


def plan_grouping(sel: SelectConfig, rows: int, labelled: bool) -> Grouping:
    """`select.groups` (None: labels when labelled, else clusters) and the checked k."""
    mode = sel.groups or ("labels" if labelled else "clusters")
    if mode != "clusters" and not sel.dedup:
        return Grouping(mode, None)
    k = sel.clusters if sel.clusters is not None else default_clusters(rows)
    try:
        check_clusters(k, rows)
    except ValueError as exc:
        raise ConfigError(f"{exc} (embed/embeddings.parquet)") from None
    return Grouping(mode, k)


def _matrix(table: pa.Table) -> np.ndarray:
    """The embedding column as [n, d] float32, without a copy when it is one chunk
    (combine_chunks copies even then: 0.3 s per 100k x 512 block)."""
    column = table.column("embedding")
    emb = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    return emb.flatten().to_numpy(zero_copy_only=False).reshape(len(table), emb.type.list_size)


def _check_finite(table: pa.Table, x: np.ndarray) -> None:
    """Raise ValueError naming the ids whose embedding holds NaN or inf."""
    bad = ~np.isfinite(x.sum(axis=1, dtype=np.float64))  # a finite float32 row sums finitely
    if bad.any():
        ids = sorted(table.column("id").filter(pa.array(bad)).to_pylist())
        more = f" and {len(ids) - 10} more" if len(ids) > 10 else ""
        raise ValueError(
            f"embed/embeddings.parquet: the embeddings of {len(ids)} rows contain NaN or inf "
            f"(ids {ids[:10]}{more}); re-embed or drop them"
        )


def _task_threads() -> int:
    return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))


def _sample_block(batch: pa.Table, seed: int, fraction: float) -> pa.Table:
    _check_finite(batch, _matrix(batch))
    mask = in_fit_sample(batch.column("id").to_pylist(), seed, fraction)
    return batch.select(["id", "embedding"]).filter(pa.array(mask))


@dataclass(frozen=True)
class Clustering:
    """The fitted k-means: unit centroids [k, d], the offset subtracted from every embedding
    before any cosine (the fit sample's mean with select.center, else None), sample size."""

    centroids: np.ndarray
    offset: np.ndarray | None
    fit_rows: int


def centred(x: np.ndarray, offset: np.ndarray | None) -> np.ndarray:
    return x if offset is None else x - offset


@ray.remote
def _fit_task(k: int, seed: int, center: bool, *blocks: pa.Table) -> Clustering:
    import faiss

    faiss.omp_set_num_threads(_task_threads())
    tables = [b for b in blocks if b.num_rows]
    if not tables:
        raise ValueError("the k-means fit sample is empty")
    table = pa.concat_tables(tables).sort_by("id")  # the fit does not depend on block order
    x = _matrix(table)
    offset = x.mean(axis=0, dtype=np.float64).astype(np.float32) if center else None
    return Clustering(fit_clusters(centred(x, offset), k, seed), offset, table.num_rows)


def fit_centroids(
    ds: ray.data.Dataset, k: int, seed: int, rows: int, center: bool = False
) -> Clustering:
    """k-means fitted in one task on a seeded sample of about 40 k rows (centred by the
    sample's mean with `center`). The sampling pass also checks every embedding for NaN."""
    fraction = fit_sample_size(k, rows) / rows
    sample = ds.map_batches(
        _sample_block, fn_kwargs={"seed": seed, "fraction": fraction}, batch_format="pyarrow"
    )
    refs = sample.to_arrow_refs()
    node_cpus = max(int(n["Resources"].get("CPU", 1)) for n in ray.nodes() if n["Alive"])
    fitted = ray.get(_fit_task.options(num_cpus=node_cpus).remote(k, seed, center, *refs))
    _wait_for_free_cpus()
    return fitted


def _wait_for_free_cpus(timeout: float = 5.0) -> None:
    """Ray reports a finished task's CPUs free with a lag; a Dataset started before that
    logs a false "no available CPUs, the job will hang" warning (after the fit, the write)."""
    deadline = time.monotonic() + timeout
    while not ray.available_resources().get("CPU") and time.monotonic() < deadline:
        time.sleep(0.05)


def _tag_block(batch: pa.Table, mode: str, clustering: Clustering | None) -> pa.Table:
    """Check a block, assign its clusters (when fitted) and set its `group` column."""
    import faiss

    x = _matrix(batch)
    _check_finite(batch, x)
    group = batch.column("label") if mode == "labels" else pa.array(np.zeros(len(x), np.int64))
    if clustering is not None:
        faiss.omp_set_num_threads(_task_threads())
        cluster, sim = assign_clusters(centred(x, clustering.offset), clustering.centroids)
        batch = batch.append_column("cluster", pa.array(cluster))
        batch = batch.append_column("centroid_sim", pa.array(sim))
        if mode == "clusters":
            group = batch.column("cluster")
    return batch.append_column("group", group)


def _dedup_rows(
    group: pa.Table, x: np.ndarray, score: dict[str, Any], dedup: dict[str, Any], seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """`dedup_cluster` on one cluster, keeping the member nearest its centroid or the
    best-scoring one (the criterion on the whole cluster, duplicates included)."""
    if dedup["keep"] == "centroid":
        priority = group.column("centroid_sim").to_numpy()
    else:
        params = {"k": score["k"], "index": score["index"]}
        priority = score_class(x, score["criterion"], None, seed, **params)[0]
    return dedup_cluster(centred(x, dedup["offset"]), dedup["threshold"], priority)


def _with_duplicates(group: pa.Table, rep: np.ndarray, sim: np.ndarray) -> pa.Table:
    dup = rep >= 0
    of = pc.take(group.column("id"), pa.array(rep, mask=~dup))
    group = group.append_column("duplicate_of", of)
    return group.append_column("similarity", pa.array(sim, mask=~dup))


def _dedup_group(group: pa.Table, score: dict[str, Any], dedup: dict[str, Any]) -> pa.Table:
    """One k-means cluster (groups are labels or none): mark its near-duplicates."""
    group = group.sort_by("id")
    seed = class_seed(score["seed"], int(group.column("cluster")[0].as_py()))
    rep, sim = _dedup_rows(group, _matrix(group), score, dedup, seed)
    return _with_duplicates(group, rep, sim)


def _curate_group(group: pa.Table, score: dict[str, Any], dedup: dict[str, Any] | None) -> pa.Table:
    """One group: dedup it (when it is a cluster and dedup is on), score what is left."""
    group = group.sort_by("id")  # a deterministic row order within the group
    x = _matrix(group)
    seed = class_seed(score["seed"], int(group.column("group")[0].as_py()))
    if dedup is not None:
        group = _with_duplicates(group, *_dedup_rows(group, x, score, dedup, seed))
    elif "duplicate_of" not in group.column_names:
        group = _with_duplicates(group, np.full(len(x), -1), np.zeros(len(x), np.float32))
    dup = group.column("duplicate_of").is_valid().to_numpy(zero_copy_only=False)
    scores, kept, notes = _score_live(x, np.flatnonzero(~dup), score, seed)
    note = [""] * len(x)
    note[0] = "; ".join(notes)
    out = group.select(["id", "label", "group", "duplicate_of", "similarity"])
    for name, values in (
        ("criterion", pa.array([score["criterion"]] * len(x))),
        ("score", pa.array(scores, mask=dup)),
        ("kept", pa.array(kept)),
        ("duplicate", pa.array(dup)),
        ("note", pa.array(note)),
    ):
        out = out.append_column(name, values)
    return out


def _score_live(
    x: np.ndarray, live: np.ndarray, score: dict[str, Any], seed: int
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Scores and kept mask over all rows of a group, computed on its `live` rows only (a
    label group can be all duplicates of rows in other groups: then nothing is scored)."""
    scores = np.zeros(len(x))
    kept = np.zeros(len(x), dtype=bool)
    if not len(live):
        return scores, kept, ["every member is a duplicate of a row in another group"]
    n_keep = n_keep_for(len(live), score["keep_ratio"])
    params = {"k": score["k"], "index": score["index"]}
    live_scores, notes = score_class(x[live], score["criterion"], n_keep, seed, **params)
    scores[live] = live_scores
    kept[live] = keep_mask_class(live_scores, score["criterion"], n_keep)
    return scores, kept, notes


def curate(
    ds: ray.data.Dataset,
    grouping: Grouping,
    sel: SelectConfig,
    offset: np.ndarray | None = None,
) -> ray.data.Dataset:
    """Dedup within clusters (when on; cosines of embeddings minus `offset`), then score
    within groups: one task per group. When the groups are the clusters both happen in one
    task, after one shuffle."""
    score = {
        "criterion": sel.criterion,
        "keep_ratio": sel.keep_ratio,
        "seed": sel.seed,
        "k": sel.k,
        "index": sel.knn_index,
    }
    dedup = {"threshold": sel.dedup, "keep": sel.dedup_keep, "offset": offset}
    dedup = dedup if sel.dedup else None
    if dedup is not None and grouping.mode != "clusters":
        ds = ds.groupby("cluster").map_groups(
            _dedup_group, fn_kwargs={"score": score, "dedup": dedup}, batch_format="pyarrow"
        )
        dedup = None
    return ds.groupby("group").map_groups(
        _curate_group, fn_kwargs={"score": score, "dedup": dedup}, batch_format="pyarrow"
    )


def group_table(table: pa.Table) -> list[dict[str, Any]]:
    """Per group: n, kept, duplicates removed, and quantiles of the scored members' scores."""
    group = table.column("group").to_numpy()
    order = np.argsort(group, kind="stable")
    values, starts = np.unique(group[order], return_index=True)
    scores = table.column("score").to_numpy(zero_copy_only=False)[order]  # NaN: duplicate
    kept = table.column("kept").to_numpy(zero_copy_only=False)[order]
    rows = []
    for g, idx in zip(values.tolist(), np.split(np.arange(len(order)), starts[1:]), strict=True):
        live = scores[idx][~np.isnan(scores[idx])]
        q = np.quantile(live, [0.0, 0.25, 0.5, 0.75, 1.0]) if len(live) else []
        rows.append(
            {
                "group": int(g),
                "n": len(idx),
                "kept": int(kept[idx].sum()),
                "duplicates": len(idx) - len(live),
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


def embedding_info(store: RunStore) -> tuple[int, int, bool]:
    """(rows, dim, labelled: any label != -1) from the parquet metadata and label column."""
    files = pads.dataset(store.uri(store.path(*EMBEDDINGS)), format="parquet")
    labels = files.to_table(columns=["label"]).column("label")
    labelled = bool(pc.any(pc.not_equal(labels, -1)).as_py())
    return files.count_rows(), files.schema.field("embedding").type.list_size, labelled


def embedding_bytes(store: RunStore) -> int:
    """float32 bytes of the embedding matrix, from the parquet metadata (no data read)."""
    rows, dim, _ = embedding_info(store)
    return rows * max(1, dim) * 4


def _configure_shuffle(choice: str, size: int) -> ShuffleStrategy:
    strategy = shuffle_strategy(choice, size)
    context = ray.data.DataContext.get_current()
    context.shuffle_strategy = strategy
    # Aggregators write their partitions out a few at a time (by default all at once, which
    # holds a second copy of the embeddings): at ImageNet size on 2 CPUs, 2.0x instead of 2.6x.
    cpus = int(ray.cluster_resources().get("CPU", 1))
    context.max_hash_shuffle_finalization_batch_size = max(1, cpus // 2)
    return strategy


def run(cfg: Config, store: RunStore, ctx: StageContext) -> dict[str, Any]:
    sel = cfg.select
    rows, dim, labelled = embedding_info(store)
    grouping = plan_grouping(sel, rows, labelled)  # bad k fails before any Ray work
    strategy = _configure_shuffle(sel.shuffle, rows * max(1, dim) * 4)
    ds = ray.data.read_parquet(store.uri(store.path(*EMBEDDINGS)))
    clustering = None
    if grouping.clusters:
        clustering = fit_centroids(ds, grouping.clusters, sel.seed, rows, sel.center)
    tagged = ds.map_batches(
        _tag_block,
        fn_kwargs={"mode": grouping.mode, "clustering": clustering},
        batch_format="pyarrow",
    )
    offset = clustering.offset if clustering else None
    scored = curate(tagged, grouping, sel, offset).materialize()
    out = store.path("select", SCORES)
    scored.select_columns(SCORE_COLUMNS).write_parquet(store.uri(out), mode="overwrite")
    _wait_for_free_cpus()
    columns = ["id", "label", "group", "score", "kept", "duplicate", "duplicate_of", "similarity"]
    refs = scored.select_columns([*columns, "note"]).to_arrow_refs()
    # the hash shuffle leaves empty partitions: blocks without rows (and without a schema)
    table = pa.concat_tables([t for t in ray.get(refs) if t.num_rows])
    duplicates = table.filter(table.column("duplicate")).select(
        ["id", "duplicate_of", "similarity"]
    )
    if sel.dedup:
        buf = io.BytesIO()
        pq.write_table(duplicates, buf)
        store.write_bytes(buf.getvalue(), "select", DUPLICATES)
        if duplicates.num_rows:
            store.write_bytes(duplicates_png(cfg, duplicates), "select", DUPLICATES_PNG)
    store.write_bytes(examples_png(cfg, table, grouping.mode), "select", EXAMPLES)
    manifest = summarise(table, grouping, sel, clustering.fit_rows if clustering else 0)
    encoder = (store.manifest("embed") or {}).get("encoder")  # the embedding space
    return {**manifest, "encoder": encoder, "shuffle": strategy.value}


def _dedup_summary(table: pa.Table, sel: SelectConfig, clusters: int | None) -> dict[str, Any]:
    of = table.column("duplicate_of").drop_null()
    set_sizes = pc.value_counts(of).field("counts").to_numpy() + 1 if len(of) else np.zeros(0)
    sims = table.column("similarity").drop_null().to_numpy()
    return {
        "threshold": sel.dedup,
        "keep": sel.dedup_keep,
        "clusters": clusters,
        "removed": len(of),
        "sets": len(set_sizes),  # kept rows that stand for at least one removed row
        "largest_set": int(set_sizes.max()) if len(set_sizes) else 0,
        "min_similarity": round(float(sims.min()), 6) if len(sims) else None,
    }


def summarise(
    table: pa.Table, grouping: Grouping, sel: SelectConfig, fit_rows: int
) -> dict[str, Any]:
    """The manifest: counts, the grouping, dedup counts, per-group table, degenerate notes."""
    per_group = group_table(table)
    sizes = np.array([g["n"] for g in per_group])
    notes = {
        str(g): note
        for g, note in zip(
            table.column("group").to_pylist(), table.column("note").to_pylist(), strict=True
        )
        if note
    }
    kept = int(sum(g["kept"] for g in per_group))
    name = {"labels": "classes", "clusters": "clusters", "none": "group"}[grouping.mode]
    summary = (
        f"kept {kept}/{len(table)} ({sel.criterion}, keep_ratio {sel.keep_ratio}) "
        f"over {len(per_group)} {name}"
    )
    dedup = _dedup_summary(table, sel, grouping.clusters) if sel.dedup else None
    if dedup:
        summary += f"; removed {dedup['removed']} near-duplicates (cosine >= {sel.dedup})"
    if notes:
        summary += f"; regularised {len(notes)} degenerate {name}"
    out: dict[str, Any] = {
        "rows": len(table),
        "kept": kept,
        "skipped": 0,
        "criterion": sel.criterion,
        "keep_ratio": sel.keep_ratio,
        "grouping": {
            "mode": grouping.mode,
            "groups": len(per_group),
            "group_sizes": {
                "min": int(sizes.min()),
                "median": float(np.median(sizes)),
                "mean": round(float(sizes.mean()), 3),
                "max": int(sizes.max()),
            },
            "clusters": grouping.clusters,
            "fit_rows": fit_rows,
            "centred": bool(sel.center and grouping.clusters),
        },
        "dedup": dedup,
        "per_group": per_group,
        "degenerate": notes,
        "summary": summary,
    }
    if grouping.mode == "labels":  # the per-class table of earlier runs, for its readers
        out["per_class"] = [{"label": g["group"], **g} for g in per_group]
    return out
