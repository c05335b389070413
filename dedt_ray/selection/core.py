"""Class-wise `score` and `select` over a whole embedding matrix.

Both loop over the classes and call the per-class `score_class` / `keep_mask_class` with
`class_seed(seed, label)`, so a distributed stage that runs those on each class group with the
same seed produces exactly what `select` produces.
"""

from __future__ import annotations

import contextlib
import logging
import numbers
import zlib
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from dedt_ray.selection._util import as_float
from dedt_ray.selection.criteria import keep_mask_class, n_keep_for, score_class

log = logging.getLogger(__name__)

SMALL_WORK = 2**28  # a lone class with n * d * max(n, d) above this keeps threaded BLAS


def class_seed(seed: int, label: Any) -> int:
    """The seed of one class: seed + label for integer labels (None: seed; other labels:
    seed + CRC32 of str(label)). A stage must pass the same to `score_class`."""
    if label is None:
        return seed
    if isinstance(label, numbers.Integral):
        return seed + int(label)
    return seed + zlib.crc32(str(label).encode())


def class_groups(labels: Any, n: int) -> list[tuple[Any, np.ndarray]]:
    """(label, ascending int64 row indices) per class in sorted label order; None: one class."""
    if labels is None:
        return [(None, np.arange(n, dtype=np.int64))]
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {labels.shape}")
    order = np.argsort(labels, kind="stable").astype(np.int64)
    values, starts = np.unique(labels[order], return_index=True)
    return list(zip(values.tolist(), np.split(order, starts[1:]), strict=True))


def _rows(X: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return X if len(idx) == len(X) else X[idx]  # one class: no copy


def _blas_threads(
    groups: list[tuple[Any, np.ndarray]], d: int
) -> contextlib.AbstractContextManager:
    """Single-threaded BLAS unless there is one large class.

    Per-class matrices are small to medium, where BLAS thread synchronisation costs more than
    it gains (badly so on shared or virtual CPUs); parallelise across classes instead, as the
    Ray stage does.
    """
    n = len(groups[0][1])
    if len(groups) > 1 or n * d * max(n, d) <= SMALL_WORK:
        return threadpool_limits(1, user_api="blas")
    return contextlib.nullcontext()


def score_with_notes(
    embeddings: np.ndarray, labels: Any, criterion: str, seed: int = 0, **params: Any
) -> tuple[np.ndarray, dict[Any, list[str]]]:
    """`score` plus the notes of every class that needed regularisation (label -> notes)."""
    X = as_float(embeddings)
    scores = np.empty(len(X))
    all_notes: dict[Any, list[str]] = {}
    groups = class_groups(labels, len(X))
    with _blas_threads(groups, X.shape[1]):
        for label, idx in groups:
            seed_c = class_seed(seed, label)
            scores[idx], notes = score_class(_rows(X, idx), criterion, seed=seed_c, **params)
            if notes:
                all_notes[label] = notes
                log.info("class %r: %s", label, "; ".join(notes))
    return scores, all_notes


def score(
    embeddings: np.ndarray, labels: Any, criterion: str, seed: int = 0, **params: Any
) -> np.ndarray:
    """Per-row float64 score computed within its class (labels=None: one class); higher kept
    first. For kcenter/herding the whole class is ordered (no n_keep shortcut)."""
    return score_with_notes(embeddings, labels, criterion, seed=seed, **params)[0]


def select(
    embeddings: np.ndarray,
    labels: Any,
    criterion: str,
    keep_ratio: float,
    seed: int = 0,
    **params: Any,
) -> np.ndarray:
    """Sorted int64 indices of the kept rows: per class max(1, round(keep_ratio * n_c))."""
    X = as_float(embeddings)
    kept = []
    groups = class_groups(labels, len(X))
    with _blas_threads(groups, X.shape[1]):
        for label, idx in groups:
            n_keep = n_keep_for(len(idx), keep_ratio)
            seed_c = class_seed(seed, label)
            scores, notes = score_class(_rows(X, idx), criterion, n_keep, seed_c, **params)
            if notes:
                log.info("class %r: %s", label, "; ".join(notes))
            kept.append(idx[keep_mask_class(scores, criterion, n_keep)])
    return np.sort(np.concatenate(kept)).astype(np.int64)
