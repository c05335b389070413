"""Spherical k-means of embeddings (faiss): the clusters that stand in for classes.

Rows are L2-normalised first, so clusters follow cosine similarity, as SemDeDup and NeMo
Curator cluster. `fit_clusters` fits on a sample; `assign_clusters` gives every row its
nearest centroid (largest cosine similarity) in blocks of any size.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import numpy as np

MAX_CLUSTERS = 4096  # the default k is sqrt(rows) up to here (see default_clusters)
FIT_ROWS_PER_CLUSTER = 40  # the fit sample: 40 rows per centroid (faiss wants >= 39)
FIT_ITERATIONS = 20


def normalize_rows(X: np.ndarray) -> np.ndarray:
    """float32 copy of X with unit-length rows; all-zero rows stay zero (they have no
    direction: cosine similarity 0 to everything)."""
    out = np.array(X, dtype=np.float32, copy=True)
    norms = np.sqrt(np.einsum("ij,ij->i", out, out))  # float32: 6x faster than float64
    out /= np.where(norms > 0, norms, 1.0)[:, None]
    return out


def default_clusters(n: int) -> int:
    """k = round(sqrt(n)), at most MAX_CLUSTERS and at most n.

    Per row, assignment costs k dot products and dedup about n / k (its cluster's size), so
    sqrt(n) balances the two. The cap bounds the fit, which runs in one task on
    FIT_ROWS_PER_CLUSTER * k rows at O(rows * k * d) per iteration: 40 k^2 d, ~3.4e11
    multiply-adds per iteration at k = 4096, d = 512; beyond it clusters grow as n / 4096.
    """
    if n < 1:
        raise ValueError(f"cannot cluster {n} rows")
    return max(1, min(n, MAX_CLUSTERS, round(math.sqrt(n))))


def check_clusters(k: int, n: int) -> None:
    """Raise ValueError naming both numbers when k clusters cannot be fitted to n rows."""
    if not 1 <= k <= n:
        raise ValueError(f"select.clusters={k} needs at least {k} rows; the embeddings have {n}")


def fit_sample_size(k: int, n: int) -> int:
    """Rows the fit samples: FIT_ROWS_PER_CLUSTER per centroid, at most n."""
    return min(n, FIT_ROWS_PER_CLUSTER * k)


def in_fit_sample(ids: Sequence[str], seed: int, fraction: float) -> np.ndarray:
    """Boolean mask: whether each id is in the seeded fit sample (CRC32 of the id, salted
    with the seed, below `fraction`), so the sample depends on neither row order nor blocks."""
    if fraction >= 1.0:
        return np.ones(len(ids), dtype=bool)
    salt = zlib.crc32(f"{seed}:".encode())
    limit = fraction * 2**32
    return np.fromiter((zlib.crc32(str(i).encode(), salt) < limit for i in ids), bool, len(ids))


def fit_clusters(X: np.ndarray, k: int, seed: int = 0, niter: int = FIT_ITERATIONS) -> np.ndarray:
    """Unit-length centroids float32 [k, d] of faiss spherical k-means on the rows of X."""
    import faiss

    check_clusters(k, len(X))
    Xn = normalize_rows(X)
    kmeans = faiss.Kmeans(
        Xn.shape[1],
        k,
        niter=niter,
        spherical=True,
        seed=seed,
        max_points_per_centroid=max(1, -(-len(Xn) // k)),  # use every row given
        verbose=False,
    )
    kmeans.train(Xn)
    return np.ascontiguousarray(kmeans.centroids, dtype=np.float32)


def assign_clusters(X: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cluster int64 [n], cosine similarity to it float32 [n]): for each L2-normalised row
    the centroid of largest inner product (exact search)."""
    import faiss

    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    sims, ids = index.search(normalize_rows(X), 1)
    return ids[:, 0].astype(np.int64), sims[:, 0].astype(np.float32)
