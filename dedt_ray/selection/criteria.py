"""Per-class scoring criteria and the per-class API a distributed stage runs on each group.

`score_class(X, criterion, n_keep, seed, **params) -> (scores, notes)` scores one class and
`keep_mask_class(scores, criterion, n_keep)` turns the scores into the kept members.

Every criterion is ``fn(X, n_keep, seed, notes, **params) -> scores``: `X` is one class's
embeddings [n, d] (float32 or float64), scores are float64 [n] with higher kept first, and
`notes` collects a line for every regularisation applied to a degenerate class.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import linalg

from dedt_ray.registry import CRITERIA as REGISTERED
from dedt_ray.selection._util import (
    as_float,
    check_finite,
    column_median,
    count_duplicate_rows,
    mean_scatter,
    row_chunks,
)

LOG_2PI = float(np.log(2.0 * np.pi))


def _cholesky(cov: np.ndarray, reg: float, notes: list[str]) -> np.ndarray:
    """Lower Cholesky factor of cov + reg * I; raises reg tenfold (and notes it) until it works."""
    for attempt in range(16):
        jitter = reg * 10.0**attempt
        try:
            chol = linalg.cholesky(cov + jitter * np.eye(len(cov)), lower=True, check_finite=False)
        except linalg.LinAlgError:
            continue
        if attempt:
            notes.append(f"gaussian: Cholesky needed diagonal jitter {jitter:.3g} (> {reg:.3g})")
        return chol
    raise linalg.LinAlgError("covariance is not positive definite even with large jitter")


def gaussian_scores(
    X: np.ndarray, n_keep: int | None, seed: int, notes: list[str], reg_covar: float = 1e-5
) -> np.ndarray:
    """Log-likelihood under the class's ML full-covariance Gaussian (reg_covar on the diagonal).

    s(z) = -1/2 [(z - mu)^T S^-1 (z - mu) + ln|S| + d ln 2pi], as sklearn's
    GaussianMixture(n_components=1, reg_covar=1e-5).score_samples.
    """
    n, d = X.shape
    mu, scatter = mean_scatter(X)
    cov = scatter / n
    zero_var = int((cov.diagonal() == 0).sum())
    if n <= d:
        notes.append(f"gaussian: n={n} <= d={d}, covariance rank-deficient; reg_covar holds it")
    if zero_var:
        notes.append(f"gaussian: {zero_var} zero-variance dimensions; reg_covar holds them")
    chol = _cholesky(cov, reg_covar, notes)
    const = 2.0 * np.log(chol.diagonal()).sum() + d * LOG_2PI
    out = np.empty(n)
    for sl in row_chunks(n, d):
        z = linalg.solve_triangular(chol, (X[sl] - mu).T, lower=True, check_finite=False)
        out[sl] = -0.5 * (np.einsum("ij,ij->j", z, z) + const)
    return out


def _ppca_spectrum(
    X: np.ndarray, mu: np.ndarray, scatter: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending, ddof=1 variances, min(n, d) of them) and eigenvectors [d, *]."""
    n, d = X.shape
    if n == 1:
        return np.zeros(1), np.eye(d, 1)
    if n >= d:
        w, vecs = np.linalg.eigh(scatter)
        return np.maximum(w[::-1], 0.0) / (n - 1), vecs[:, ::-1]
    centred = X - mu  # n < d: the n x n Gram matrix is the cheaper eigenproblem
    w, v = np.linalg.eigh(centred @ centred.T)
    w, v = np.maximum(w[::-1], 0.0), v[:, ::-1]
    vecs = centred.T @ v / np.sqrt(np.where(w > 0, w, 1.0))
    return w / (n - 1), vecs


def ppca_scores(
    X: np.ndarray,
    n_keep: int | None,
    seed: int,
    notes: list[str],
    variance: float = 0.95,
    n_components: int | None = None,
    noise_floor: float = 1e-6,
) -> np.ndarray:
    """Probabilistic PCA (Tipping & Bishop) log-likelihood, as sklearn PCA.score_samples.

    q = number of leading components whose cumulative explained-variance ratio is below
    `variance` (at least 1), unless `n_components` is given. Noise variance = mean of the
    remaining min(n, d) - q eigenvalues; it is floored at noise_floor * (mean variance) when
    it would be (near) zero, and that is noted.
    """
    n, d = X.shape
    mu, scatter = mean_scatter(X)
    ev, vecs = _ppca_spectrum(X, mu, scatter)
    total = ev.sum()
    if n_components is not None:
        q = n_components
    elif total > 0:
        q = int((np.cumsum(ev / total) < variance).sum())
    else:
        q = 1
    q = int(min(max(q, 1), len(ev)))
    noise = float(ev[q:].mean()) if q < len(ev) else 0.0
    floor = max(noise_floor * total / d, 1e-12)
    if noise < floor:
        notes.append(f"ppca: noise variance {noise:.3g} floored at {floor:.3g}")
        noise = floor
    lam = np.maximum(ev[:q], noise)  # model covariance: U diag(lam) U^T + noise (I - U U^T)
    basis = vecs[:, :q]
    const = np.log(lam).sum() + (d - q) * np.log(noise) + d * LOG_2PI
    out = np.empty(n)
    for sl in row_chunks(n, d):
        centred = X[sl] - mu
        proj = centred @ basis
        in_span = np.einsum("ij,ij->i", proj, proj)
        resid = np.maximum(np.einsum("ij,ij->i", centred, centred) - in_span, 0.0)
        out[sl] = -0.5 * ((proj**2 / lam).sum(axis=1) + resid / noise + const)
    return out


def moderate_scores(X: np.ndarray, n_keep: int | None, seed: int, notes: list[str]) -> np.ndarray:
    """Moderate-DS: rank members by distance to the class median; the middle ranks score highest.

    With r the ascending rank of the distance (stable) and v = 2r - (n - 1), the score is
    -|v| - 0.5 [v > 0]: the middle rank scores 0 and, at equal |v|, the nearer side is
    preferred. The score is a bijection of r, so `moderate_ranks` recovers r exactly and
    `keep_mask_class` keeps the exact band of ranks [lo, lo + n_keep) with
    lo = round((n - n_keep) / 2). The top-n_keep by score is the same band except, when
    n - n_keep is odd, which end gets the extra member.
    """
    n, d = X.shape
    median = column_median(X)
    dist = np.empty(n)
    for sl in row_chunks(n, d):
        diff = X[sl] - median
        dist[sl] = np.sqrt(np.einsum("ij,ij->i", diff, diff))
    rank = np.empty(n, dtype=np.int64)
    rank[np.argsort(dist, kind="stable")] = np.arange(n)
    v = 2 * rank - (n - 1)
    return -np.abs(v) - 0.5 * (v > 0)


def moderate_ranks(scores: np.ndarray) -> np.ndarray:
    """Invert `moderate_scores`: the ascending distance rank of every member."""
    t = -np.asarray(scores, dtype=np.float64)
    mag = np.floor(t)
    v = np.where(t > mag, mag, -mag)
    return ((v + len(t) - 1) // 2).astype(np.int64)


def random_scores(X: np.ndarray, n_keep: int | None, seed: int, notes: list[str]) -> np.ndarray:
    """Uniform random scores from np.random.default_rng(seed), drawn afresh for each class."""
    return np.random.default_rng(seed).random(len(X))


# the criteria `dedt_ray.registry.CRITERIA` names, each a function of the class's embeddings
SCORERS: dict[str, Callable[..., np.ndarray]] = {
    name: entry.load() for name, entry in REGISTERED.items()
}

CRITERIA: tuple[str, ...] = tuple(SCORERS)
_FIXED = {"X", "n_keep", "seed", "notes"}
_ACCEPTS = {c: set(inspect.signature(f).parameters) - _FIXED for c, f in SCORERS.items()}
_KNOWN = set().union(*_ACCEPTS.values())


def n_keep_for(n: int, keep_ratio: float) -> int:
    """Members kept from a class of `n`: max(1, round(keep_ratio * n)) (Python round)."""
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    return min(n, max(1, round(keep_ratio * n)))


def _criterion_params(criterion: str, params: dict[str, Any]) -> dict[str, Any]:
    """The params `criterion` takes; params of other criteria are ignored, unknown ones raise."""
    if criterion not in SCORERS:
        raise ValueError(f"unknown criterion {criterion!r}; choose from {CRITERIA}")
    unknown = set(params) - _KNOWN
    if unknown:
        raise TypeError(f"unknown selection parameters {sorted(unknown)}")
    return {k: v for k, v in params.items() if k in _ACCEPTS[criterion]}


def score_class(
    X: np.ndarray, criterion: str, n_keep: int | None = None, seed: int = 0, **params: Any
) -> tuple[np.ndarray, list[str]]:
    """Scores (float64 [n], higher kept first) of one class, and notes on regularisation.

    `seed` drives `random` and the kcenter/herding partitions; `select` passes
    `class_seed(seed, label)`. `n_keep` only lets kcenter/herding stop after the members that
    will be kept (the rest share the lowest score); it never changes `keep_mask_class`'s pick.
    Params: gaussian reg_covar; ppca variance, n_components, noise_floor; knn k, backend,
    exact_max, index, nlist, nprobe; kcenter/herding max_exact. Params of another criterion
    are ignored; unknown names raise TypeError.
    """
    kwargs = _criterion_params(criterion, params)
    X = as_float(X)
    check_finite(X)
    notes: list[str] = []
    if len(X) == 1:
        notes.append("class of 1 member")
    duplicates = count_duplicate_rows(X)
    if duplicates:
        notes.append(f"{duplicates} duplicate rows")
    scores = np.asarray(SCORERS[criterion](X, n_keep, seed, notes, **kwargs), dtype=np.float64)
    if not np.isfinite(scores).all():  # overflow of extreme values; not expected otherwise
        raise ValueError(f"{criterion}: non-finite scores")
    return scores, notes


def keep_mask_class(scores: np.ndarray, criterion: str, n_keep: int) -> np.ndarray:
    """Boolean mask of the kept members of one class.

    `moderate`: the band of distance ranks [lo, lo + n_keep), lo = round((n - n_keep) / 2).
    Others: the n_keep highest scores, ties to the lower index.
    """
    scores = np.asarray(scores)
    n = len(scores)
    n_keep = min(n, n_keep)
    mask = np.zeros(n, dtype=bool)
    if criterion == "moderate":
        lo = round((n - n_keep) / 2)
        rank = moderate_ranks(scores)
        mask[(rank >= lo) & (rank < lo + n_keep)] = True
    else:
        mask[np.argsort(-scores, kind="stable")[:n_keep]] = True
    return mask
