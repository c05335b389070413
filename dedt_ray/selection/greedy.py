"""Greedy coreset orders (k-center, herding); score = minus the order in which a member is picked.

Both run on the dense Gram matrix of the class centred at its mean, so each greedy step is
O(n). A class larger than `max_exact` is split into ceil(n / max_exact) random near-equal
partitions (seeded); the greedy runs in each partition, still seeded from / aimed at the
whole class's mean, and the partition orders are interleaved round-robin (pick t of partition
p gets global order t * P + p). That bounds memory to O(max_exact^2) and time to
O(n * max_exact * d); it is an approximation of the whole-class greedy.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np


def kcenter_order(Xc: np.ndarray, limit: int) -> np.ndarray:
    """Farthest-point order of the rows of centred `Xc`, starting at the row nearest 0."""
    gram = Xc @ Xc.T
    sq = gram.diagonal().copy()
    first = int(np.argmin(sq))
    order = [first]
    min_d2 = sq + sq[first] - 2.0 * gram[first]  # squared distance to the chosen set
    min_d2[first] = -np.inf
    for _ in range(limit - 1):
        j = int(np.argmax(min_d2))
        order.append(j)
        np.minimum(min_d2, sq + sq[j] - 2.0 * gram[j], out=min_d2)
        min_d2[j] = -np.inf
    return np.asarray(order, dtype=np.int64)


def herding_order(Xc: np.ndarray, limit: int) -> np.ndarray:
    """Herding order of centred `Xc`: each pick keeps the chosen set's mean closest to 0.

    With chosen sum S, adding x_i gives ||S + x_i||^2 = ||S||^2 + 2 S.x_i + ||x_i||^2, so the
    pick is argmin over unchosen i of ||x_i||^2 + 2 sum_{j chosen} <x_i, x_j>.
    """
    gram = Xc @ Xc.T
    cost = gram.diagonal().copy()
    order = []
    for _ in range(limit):
        j = int(np.argmin(cost))
        order.append(j)
        cost += 2.0 * gram[j]
        cost[j] = np.inf
    return np.asarray(order, dtype=np.int64)


def greedy_scores(
    X: np.ndarray,
    n_keep: int | None,
    seed: int,
    notes: list[str],
    order_fn: Callable[[np.ndarray, int], np.ndarray],
    max_exact: int,
) -> np.ndarray:
    """Minus the (interleaved) pick order; members never picked (beyond `n_keep`) score -n."""
    n = len(X)
    mu = X.mean(axis=0, dtype=np.float64)
    n_parts = math.ceil(n / max_exact)
    if n_parts == 1:
        parts = [np.arange(n)]
    else:
        parts = np.array_split(np.random.default_rng(seed).permutation(n), n_parts)
        notes.append(
            f"partitioned greedy approximation: {n_parts} random partitions of "
            f"<= {len(parts[0])} members (class of {n} > max_exact={max_exact})"
        )
    per_part = math.ceil(min(n, n_keep or n) / n_parts)
    scores = np.full(n, -float(n))
    for p, idx in enumerate(parts):
        Xc = (X if n_parts == 1 else X[idx]) - mu
        order = order_fn(Xc, min(per_part, len(idx)))
        scores[idx[order]] = -(np.arange(len(order)) * n_parts + p).astype(np.float64)
    return scores


def kcenter_scores(
    X: np.ndarray, n_keep: int | None, seed: int, notes: list[str], max_exact: int = 8192
) -> np.ndarray:
    """k-center greedy from the member nearest the class mean; score = -pick order."""
    return greedy_scores(X, n_keep, seed, notes, kcenter_order, max_exact)


def herding_scores(
    X: np.ndarray, n_keep: int | None, seed: int, notes: list[str], max_exact: int = 8192
) -> np.ndarray:
    """Herding towards the class mean; score = -pick order."""
    return greedy_scores(X, n_keep, seed, notes, herding_order, max_exact)
