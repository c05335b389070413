"""Frechet distance between Gaussian fits of feature sets, and streaming feature statistics.

Pure numpy/scipy; whether the features are Inception pool3 (FID proper) or another named
feature space is the caller's business.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import numpy as np
import scipy.linalg


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _as_float64(x: Any) -> np.ndarray:
    return _to_numpy(x).astype(np.float64, copy=False)


def _check_psd(eigenvalues: np.ndarray, name: str, tol: float = 1e-6) -> None:
    scale = max(1.0, float(np.abs(eigenvalues).max(initial=0.0)))
    if eigenvalues.min(initial=0.0) < -tol * scale:
        raise ValueError(
            f"{name} is not positive semi-definite (smallest eigenvalue {eigenvalues.min():.3g})"
        )


def _psd_sqrt(sigma: np.ndarray, name: str) -> np.ndarray:
    """Symmetric square root of a PSD matrix; rounding-level negative eigenvalues become 0."""
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    _check_psd(w, name)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _trace_sqrt_product_svd(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr sqrt(S1 S2) as the nuclear norm of sqrt(S1) sqrt(S2).

    With A = sqrt(S1) sqrt(S2), A^T A = sqrt(S2) S1 sqrt(S2) has the eigenvalues of S1 S2, so
    Tr sqrt(S1 S2) is the sum of A's singular values. These come with absolute error ~eps||A||,
    whereas square roots of computed eigenvalues amplify rounding noise near 0 (~1e-8 each)
    on singular covariances.
    """
    a = _psd_sqrt(sigma1, "sigma1") @ _psd_sqrt(sigma2, "sigma2")
    return float(np.linalg.svd(a, compute_uv=False).sum())


def _trace_sqrt_product_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    """Tr sqrtm(S1 S2) as in pytorch-fid: eps*I offset if singular, tiny imaginary parts dropped."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on singular products; checked below
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > 1e-3:
            raise ValueError(f"sqrtm(sigma1 sigma2) has a large imaginary component {imag:.3g}")
        covmean = covmean.real
    return float(np.trace(covmean))


def frechet_distance(
    mu1: Any,
    sigma1: Any,
    mu2: Any,
    sigma2: Any,
    *,
    method: Literal["svd", "sqrtm"] = "svd",
    eps: float = 1e-6,
) -> float:
    """`||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2))` in float64.

    `method="svd"` (default) takes Tr sqrt(S1 S2) as the nuclear norm of sqrt(S1) sqrt(S2):
    equal to scipy's `sqrtm` on well-conditioned inputs, far more accurate on singular ones
    (rank < D, e.g. fewer samples than dimensions), and faster at 2048-d.
    `method="sqrtm"` reproduces pytorch-fid (`eps` is its offset for singular products).
    Raises ValueError on shape mismatches and clearly non-PSD covariances.
    """
    mu1, mu2 = np.atleast_1d(_as_float64(mu1)), np.atleast_1d(_as_float64(mu2))
    sigma1, sigma2 = np.atleast_2d(_as_float64(sigma1)), np.atleast_2d(_as_float64(sigma2))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,):
        raise ValueError(f"means must be 1-D of equal length, got {mu1.shape} and {mu2.shape}")
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"covariances must be ({d}, {d}), got {sigma1.shape} and {sigma2.shape}")
    if method == "svd":
        tr_covmean = _trace_sqrt_product_svd(sigma1, sigma2)
    elif method == "sqrtm":
        tr_covmean = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps)
    else:
        raise ValueError(f"method must be 'svd' or 'sqrtm', got {method!r}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


class FeatureStats:
    """Streaming float64 mean and covariance of feature rows (Chan et al.'s parallel update).

    Keeps the count, the mean [D] and the centred sum of outer products `m2` [D, D], so
    batches can be folded in one at a time and partial stats from several workers merged.
    """

    def __init__(self) -> None:
        self.count = 0
        self._mean: np.ndarray | None = None
        self._m2: np.ndarray | None = None

    @property
    def dim(self) -> int | None:
        """Feature dimension, None before the first non-empty update."""
        return None if self._mean is None else self._mean.shape[0]

    @property
    def mean(self) -> np.ndarray:
        if self._mean is None:
            raise ValueError("FeatureStats is empty")
        return self._mean.copy()

    @property
    def cov(self) -> np.ndarray:
        """Unbiased covariance (divides by count - 1), like `np.cov(x, rowvar=False)`."""
        if self._m2 is None or self.count < 2:
            raise ValueError(f"covariance needs at least 2 samples, have {self.count}")
        return self._m2 / (self.count - 1)

    def update(self, feats: Any) -> FeatureStats:
        """Fold in a batch of rows [N, D] (numpy or torch); returns self."""
        x = _as_float64(feats)
        if x.ndim != 2:
            raise ValueError(f"features must be 2-D [N, D], got shape {x.shape}")
        if x.shape[0] == 0:
            return self
        mean = x.mean(axis=0)
        centred = x - mean
        return self._combine(x.shape[0], mean, centred.T @ centred)

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Fold in another accumulator's statistics; returns self."""
        if other.count == 0:
            return self
        return self._combine(other.count, other._mean, other._m2)

    def _combine(self, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray) -> FeatureStats:
        if self._mean is None:
            self.count, self._mean, self._m2 = n_b, mean_b.copy(), m2_b.copy()
            return self
        if mean_b.shape != self._mean.shape:
            raise ValueError(f"feature dimension {mean_b.shape[0]} != {self._mean.shape[0]}")
        n_a = self.count
        n = n_a + n_b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (n_b / n)
        self._m2 = self._m2 + m2_b + np.outer(delta, delta) * (n_a * n_b / n)
        self.count = n
        return self

    def to_dict(self, as_lists: bool = False) -> dict[str, Any]:
        """`{"count", "mean", "m2"}` as numpy arrays (npz) or nested lists (JSON)."""
        if self._mean is None:
            return {"count": 0, "mean": None, "m2": None}
        mean, m2 = self._mean.copy(), self._m2.copy()
        if as_lists:
            mean, m2 = mean.tolist(), m2.tolist()
        return {"count": int(self.count), "mean": mean, "m2": m2}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureStats:
        """Inverse of `to_dict` (either form)."""
        stats = cls()
        count = int(data["count"])
        if count == 0:
            return stats
        mean, m2 = _as_float64(data["mean"]).copy(), _as_float64(data["m2"]).copy()
        if mean.ndim != 1 or m2.shape != (mean.shape[0], mean.shape[0]):
            raise ValueError(f"inconsistent shapes: mean {mean.shape}, m2 {m2.shape}")
        stats.count, stats._mean, stats._m2 = count, mean, m2
        return stats


def per_class_frechet(
    real_feats: Any, real_labels: Any, fake_feats: Any, fake_labels: Any, **kwargs: Any
) -> dict[int, float]:
    """Frechet distance per class over the union of labels on both sides.

    A class with fewer than 2 samples on either side has no covariance and is reported as
    NaN (not dropped), so every class appears in the result. `kwargs` go to
    `frechet_distance`.
    """
    real, fake = _as_float64(real_feats), _as_float64(fake_feats)
    real_y = _to_numpy(real_labels).astype(np.int64)
    fake_y = _to_numpy(fake_labels).astype(np.int64)
    for name, x, y in (("real", real, real_y), ("fake", fake, fake_y)):
        if x.ndim != 2 or y.shape != (x.shape[0],):
            raise ValueError(f"{name} features {x.shape} and labels {y.shape} do not match")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: {real.shape[1]} vs {fake.shape[1]}")
    result: dict[int, float] = {}
    for c in np.union1d(real_y, fake_y).tolist():
        a, b = real[real_y == c], fake[fake_y == c]
        if len(a) < 2 or len(b) < 2:
            result[int(c)] = float("nan")
            continue
        result[int(c)] = frechet_distance(
            a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False), **kwargs
        )
    return result
