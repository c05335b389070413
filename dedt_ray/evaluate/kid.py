"""Kernel distance (KID, Binkowski et al. 2018) between feature sets (pure numpy).

The unbiased estimate of the squared MMD with the cubic polynomial kernel
`k(x, y) = (x . y / d + 1)^3`, averaged over random subsets of both sets, as torch-fidelity
and clean-fid report it: `subsets` draws (torch-fidelity: 100) of `subset_size` rows per side
(1,000), each drawn without replacement, independently per subset; the subset size shrinks
to the smaller set when either has fewer rows. Mean and (population) standard deviation of
the per-subset estimates. Unlike the Frechet distance, the estimate is unbiased at any N.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """`(x y^T / d + 1)^3` for rows x [N, d], y [M, d] -> [N, M] (float64)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 of two equal-size samples: the within-set means leave the diagonal out.

    `sum_{i!=j} k(x_i, x_j) / (m (m-1)) + sum_{i!=j} k(y_i, y_j) / (m (m-1))
    - 2 sum_{i,j} k(x_i, y_j) / m^2`, as torch-fidelity's `mmd2`.
    """
    m = x.shape[0]
    k_xx, k_yy = polynomial_kernel(x, x), polynomial_kernel(y, y)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * polynomial_kernel(x, y).sum() / (m * m))


def kernel_distance(
    real: Any, fake: Any, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float, int]:
    """(mean, std, rows per subset) of the unbiased MMD^2 over `subsets` random subsets."""
    x, y = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"features must be 2-D with equal widths, got {x.shape} and {y.shape}")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    m = min(subset_size, len(x), len(y))
    if m < 2:
        raise ValueError(f"KID needs at least 2 rows per side, got {len(x)} and {len(y)}")
    rng = np.random.default_rng(seed)
    values = np.empty(subsets)
    for i in range(subsets):
        a = x[rng.choice(len(x), m, replace=False)]
        b = y[rng.choice(len(y), m, replace=False)]
        values[i] = mmd2_unbiased(a, b)
    return float(values.mean()), float(values.std()), m
