"""k-NN manifold metrics on feature sets: precision/recall and density/coverage.

Each sample's manifold ball has radius equal to its distance to its k-th nearest neighbour
in its own set (itself excluded). Distances are computed with `torch.cdist` in float64, in
row blocks of `block_size`, so memory stays at `block_size x N` distances.
"""

from __future__ import annotations

from collections.abc import Callable
from numbers import Integral
from typing import Any

import torch


def _as_tensor(x: Any, name: str, device: torch.device | None = None) -> torch.Tensor:
    t = torch.as_tensor(x).detach()
    t = t.to(device or t.device, torch.float64)
    if t.ndim != 2 or t.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D [N, D] array, got {tuple(t.shape)}")
    return t


def _inputs(real: Any, fake: Any, k: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(k, bool) or not isinstance(k, Integral) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    r = _as_tensor(real, "real")
    f = _as_tensor(fake, "fake", r.device)
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"feature dimensions differ: {r.shape[1]} vs {f.shape[1]}")
    if r.shape[0] <= k:
        raise ValueError(f"need more than k={k} real samples, got {r.shape[0]}")
    return r, f


def _blockwise(
    rows: torch.Tensor, cols: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], bs: int
) -> torch.Tensor:
    """Concatenate `fn(cdist(row_block, cols))` over row blocks."""
    return torch.cat([fn(torch.cdist(rows[i : i + bs], cols)) for i in range(0, len(rows), bs)])


def knn_radii(x: torch.Tensor, k: int, block_size: int = 512) -> torch.Tensor:
    """Distance of every row of `x` to its k-th nearest other row (self excluded)."""
    # the (k + 1)-th smallest distance counts the row itself, at distance 0
    return _blockwise(x, x, lambda d: d.kthvalue(int(k) + 1, dim=1).values, block_size)


def precision_recall(
    real: Any, fake: Any, k: int = 3, block_size: int = 512
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al., 2019).

    precision: fraction of fake samples inside some real ball; recall: fraction of real
    samples inside some fake ball (closed balls, `<=`, as in the paper).
    """
    r, f = _inputs(real, fake, k, block_size)
    if f.shape[0] <= k:
        raise ValueError(f"need more than k={k} fake samples, got {f.shape[0]}")
    r_radii, f_radii = knn_radii(r, k, block_size), knn_radii(f, k, block_size)
    precision = _blockwise(f, r, lambda d: (d <= r_radii).any(dim=1), block_size)
    recall = _blockwise(r, f, lambda d: (d <= f_radii).any(dim=1), block_size)
    return precision.double().mean().item(), recall.double().mean().item()


def density_coverage(
    real: Any, fake: Any, k: int = 5, block_size: int = 512
) -> tuple[float, float]:
    """Density and coverage (Naeem et al., 2020), with open balls (`<`) as in their code.

    density: mean number of real balls holding a fake sample, divided by k (about 1 when the
    sets match, unbounded above); coverage: fraction of real balls holding a fake sample.
    """
    r, f = _inputs(real, fake, k, block_size)
    r_radii = knn_radii(r, k, block_size)
    inside = _blockwise(f, r, lambda d: (d < r_radii).sum(dim=1), block_size)
    nearest_fake = _blockwise(r, f, lambda d: d.min(dim=1).values, block_size)
    density = inside.double().mean().item() / k
    coverage = (nearest_fake < r_radii).double().mean().item()
    return density, coverage
