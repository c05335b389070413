"""Semantic deduplication (SemDeDup-style): near-duplicates by cosine similarity in a cluster.

The rule, greedy in priority order (by default nearest the cluster centroid first): a row
is a duplicate when its cosine similarity to a row already *kept* is at least the
threshold, and then points at the most similar such row; otherwise it is kept. So no two
kept rows are duplicates of each other, and every removed row has a kept representative
at or above the threshold (SemDeDup removes a row similar to any earlier row, kept or not,
so a chain a~b~c can lose both b and c although c is not near a).
"""

from __future__ import annotations

import numpy as np

from dedt_ray.selection._util import as_float, check_finite
from dedt_ray.selection.clusters import assign_clusters, fit_clusters, normalize_rows

SIM_SLACK = 1e-6  # float32 dot products of identical unit rows land within this of 1
ROW_BLOCK = 1024  # rows resolved together
KEPT_BLOCK = 16_384  # kept rows per similarity block: ROW_BLOCK x KEPT_BLOCK float32 = 64 MiB


def check_threshold(threshold: float) -> None:
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"dedup threshold must be in (0, 1], got {threshold!r}")


def priority_order(priority: np.ndarray | None, n: int) -> np.ndarray:
    """Row order, highest priority first, ties to the lower row (None: row order)."""
    if priority is None:
        return np.arange(n)
    priority = np.asarray(priority, dtype=np.float64)
    if priority.shape != (n,):
        raise ValueError(f"priority must have shape ({n},), got {priority.shape}")
    return np.argsort(-priority, kind="stable")


def _best_kept(block: np.ndarray, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row of `block`: (position in `kept` of its most similar row, similarity)."""
    best = np.zeros(len(block), dtype=np.int64)
    sim = np.full(len(block), -np.inf, dtype=np.float32)
    for start in range(0, len(kept), KEPT_BLOCK):
        s = block @ kept[start : start + KEPT_BLOCK].T
        arg = s.argmax(axis=1)
        val = s[np.arange(len(block)), arg]
        better = val > sim
        best[better], sim[better] = arg[better] + start, val[better]
    return best, sim


def _resolve_block(block: np.ndarray, limit: float) -> tuple[np.ndarray, np.ndarray]:
    """Greedy rule inside one block of candidates (none near an earlier kept row):
    (position within the block of the representative, -1 if kept; its similarity)."""
    rep = np.full(len(block), -1, dtype=np.int64)
    sim = np.zeros(len(block), dtype=np.float32)
    s = block @ block.T
    near = np.triu(s >= limit, 1)  # near[i, j]: earlier row i is a duplicate candidate of j
    for j in np.flatnonzero(near.any(axis=0)):  # only rows with an earlier near neighbour
        earlier = np.flatnonzero(near[:j, j] & (rep[:j] < 0))
        if len(earlier):
            i = earlier[np.argmax(s[earlier, j])]
            rep[j], sim[j] = i, s[i, j]
    return rep, sim


def _prefer_block_kept(
    block: np.ndarray,
    dup: np.ndarray,
    new: np.ndarray,
    pos: np.ndarray,
    rep: np.ndarray,
    sim: np.ndarray,
) -> None:
    """Duplicates of an earlier block's row point at a row kept earlier in their own block
    instead when that one is more similar (updates rep and sim in place)."""
    if not len(dup) or not len(new):
        return
    s = block[dup] @ block[new].T
    s[new[None, :] > dup[:, None]] = -np.inf  # only rows visited before the duplicate
    arg = s.argmax(axis=1)
    val = s[np.arange(len(dup)), arg]
    better = val > sim[pos[dup]]
    rep[pos[dup[better]]], sim[pos[dup[better]]] = pos[new[arg[better]]], val[better]


def dedup_cluster(
    X: np.ndarray, threshold: float, priority: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Near-duplicates within one cluster.

    X: [n, d] rows (normalised here). Returns (duplicate_of int64 [n]: the row index of the
    kept representative, -1 for kept rows; similarity float32 [n]: cosine to it, 0 if kept).
    Rows are visited by descending `priority` (None: row order). Memory O(n d) plus 64 MiB.
    """
    check_threshold(threshold)
    check_finite(as_float(X))
    n = len(X)
    order = priority_order(priority, n)
    Xo = normalize_rows(X)[order]
    limit = np.float32(threshold - SIM_SLACK)
    rep = np.full(n, -1, dtype=np.int64)  # in visiting positions
    sim = np.zeros(n, dtype=np.float32)
    kept = np.empty_like(Xo)  # the kept rows so far, in visiting order
    kept_pos = np.empty(n, dtype=np.int64)
    n_kept = 0
    for start in range(0, n, ROW_BLOCK):
        block = Xo[start : start + ROW_BLOCK]
        pos = np.arange(start, start + len(block))
        if n_kept:
            best, best_sim = _best_kept(block, kept[:n_kept])
            dup = best_sim >= limit
            rep[pos[dup]], sim[pos[dup]] = kept_pos[best[dup]], best_sim[dup]
        else:
            dup = np.zeros(len(block), dtype=bool)
        cand = np.flatnonzero(~dup)
        inner, inner_sim = _resolve_block(block[cand], limit)
        inside = inner >= 0
        rep[pos[cand[inside]]] = pos[cand[inner[inside]]]
        sim[pos[cand[inside]]] = inner_sim[inside]
        new = cand[~inside]
        _prefer_block_kept(block, np.flatnonzero(dup), new, pos, rep, sim)
        kept[n_kept : n_kept + len(new)] = block[new]
        kept_pos[n_kept : n_kept + len(new)] = pos[new]
        n_kept += len(new)
    duplicate_of = np.full(n, -1, dtype=np.int64)
    duplicate_of[order] = np.where(rep >= 0, order[np.maximum(rep, 0)], -1)
    similarity = np.empty(n, dtype=np.float32)
    similarity[order] = sim
    return duplicate_of, similarity


def semantic_dedup(
    X: np.ndarray,
    threshold: float,
    clusters: int,
    seed: int = 0,
    keep: str = "centroid",
    scores: np.ndarray | None = None,
    center: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dedup a whole matrix: spherical k-means (fitted on every row), then `dedup_cluster`
    in each cluster with priority = cosine to the centroid (`keep="centroid"`) or `scores`
    (`keep="score"`, higher kept first); `center` subtracts the mean row first. Returns
    (duplicate_of, similarity, cluster)."""
    if keep not in ("centroid", "score"):
        raise ValueError(f"keep must be 'centroid' or 'score', got {keep!r}")
    if keep == "score" and scores is None:
        raise ValueError("keep='score' needs scores")
    if center:
        X = X - X.mean(axis=0, dtype=np.float64).astype(np.float32)
    cluster, centroid_sim = assign_clusters(X, fit_clusters(X, clusters, seed))
    priority = centroid_sim if keep == "centroid" else np.asarray(scores, dtype=np.float64)
    duplicate_of = np.full(len(X), -1, dtype=np.int64)
    similarity = np.zeros(len(X), dtype=np.float32)
    for c in np.unique(cluster):
        idx = np.flatnonzero(cluster == c)
        rep, sim = dedup_cluster(X[idx], threshold, priority[idx])
        duplicate_of[idx] = np.where(rep >= 0, idx[np.maximum(rep, 0)], -1)
        similarity[idx] = sim
    return duplicate_of, similarity, cluster
