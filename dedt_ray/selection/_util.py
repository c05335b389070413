"""Small array helpers shared by the criteria: float input, row chunks, moments, duplicates."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

CHUNK_BYTES = 2**26  # a float64 row chunk holds at most 64 MiB


def as_float(X: np.ndarray) -> np.ndarray:
    """`X` as a 2-D float32/float64 array (other dtypes become float64); no copy if possible."""
    X = np.asarray(X)
    if X.dtype not in (np.float32, np.float64):
        X = X.astype(np.float64)
    if X.ndim != 2 or len(X) == 0:
        raise ValueError(f"embeddings must be a non-empty [n, d] array, got shape {X.shape}")
    return X


def check_finite(X: np.ndarray) -> None:
    """Raise ValueError on NaN/inf, checking row chunks so no full-size mask is built."""
    for sl in row_chunks(*X.shape):
        if not np.isfinite(X[sl]).all():
            raise ValueError("embeddings contain NaN or inf")


def row_chunks(n: int, d: int) -> Iterator[slice]:
    """Row slices whose float64 copy of a [*, d] array stays under CHUNK_BYTES."""
    step = max(1, CHUNK_BYTES // (8 * max(d, 1)))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def column_median(X: np.ndarray) -> np.ndarray:
    """Coordinate-wise median (float64), over column blocks so the working copy stays bounded."""
    n, d = X.shape
    step = max(1, CHUNK_BYTES // (8 * n))
    blocks = [np.median(X[:, j : j + step], axis=0) for j in range(0, d, step)]
    return np.concatenate(blocks).astype(np.float64)


def mean_scatter(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and scatter matrix sum_i (x_i - mu)(x_i - mu)^T in float64, streamed over rows."""
    n, d = X.shape
    mu = X.mean(axis=0, dtype=np.float64)
    scatter = np.zeros((d, d))
    for sl in row_chunks(n, d):
        centred = X[sl] - mu
        scatter += centred.T @ centred
    return mu, scatter


def count_duplicate_rows(X: np.ndarray) -> int:
    """Rows that repeat an earlier row bit for bit (exact 64-bit row hashes, streamed)."""
    n, d = X.shape
    if n < 2:
        return 0
    X = np.ascontiguousarray(X)
    words = X.view(np.uint64) if (d * X.itemsize) % 8 == 0 else X.view(np.uint32)
    mult = np.random.default_rng(0).integers(1, 2**62, size=words.shape[1], dtype=np.uint64)
    mult |= np.uint64(1)
    hashes = np.empty(n, dtype=np.uint64)
    for sl in row_chunks(n, d):
        hashes[sl] = (words[sl] * mult).sum(axis=1)  # uint64 arithmetic wraps modulo 2**64
    return n - len(np.unique(hashes))
