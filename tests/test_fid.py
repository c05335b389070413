"""Frechet distance, streaming feature stats, per-class FID, KID and k-NN manifold metrics."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.linalg
import torch

from dedt_ray.evaluate import (
    FeatureStats,
    density_coverage,
    frechet_distance,
    kernel_distance,
    mmd2_unbiased,
    per_class_frechet,
    precision_recall,
)


def _scipy_frechet(mu1, s1, mu2, s2) -> float:
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _random_pd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


@pytest.mark.parametrize("method", ["svd", "sqrtm"])
@pytest.mark.parametrize("d", [1, 5, 64])
def test_frechet_matches_scipy(method: str, d: int) -> None:
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _random_pd(rng, d), _random_pd(rng, d)
    expected = _scipy_frechet(mu1, s1, mu2, s2)
    got = frechet_distance(mu1, s1, mu2, s2, method=method)
    assert isinstance(got, float)
    assert got == pytest.approx(expected, rel=1e-6)
    # symmetric in its two arguments
    assert frechet_distance(mu2, s2, mu1, s1, method=method) == pytest.approx(got, rel=1e-6)


def test_frechet_one_dimensional_closed_form() -> None:
    # (m1 - m2)^2 + (s1 - s2)^2 for variances s1^2, s2^2
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)


def test_frechet_identical_stats_is_zero() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((500, 32)) * 5
    mu, sigma = x.mean(0), np.cov(x, rowvar=False)
    for method in ("svd", "sqrtm"):
        assert abs(frechet_distance(mu, sigma, mu, sigma, method=method)) < 1e-6


def test_frechet_near_singular_is_finite() -> None:
    rng = np.random.default_rng(2)
    d = 64
    x, y = rng.standard_normal((20, d)), rng.standard_normal((30, d)) + 0.5  # rank < d
    args = (x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    svd = frechet_distance(*args, method="svd")
    sqrtm = frechet_distance(*args, method="sqrtm")
    assert math.isfinite(svd) and math.isfinite(sqrtm) and svd > 0
    assert svd == pytest.approx(sqrtm, rel=1e-4)
    # rank-deficient S against itself, and against c^2 S: exactly (1 - c)^2 Tr S
    mu, s = args[0], args[1]
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-9
    assert frechet_distance(mu, s, mu, 4 * s) == pytest.approx(np.trace(s), rel=1e-9)


def test_frechet_errors() -> None:
    with pytest.raises(ValueError, match="covariances"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))
    with pytest.raises(ValueError, match="means"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(3))
    with pytest.raises(ValueError, match="positive semi-definite"):
        frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="method"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2), method="bogus")


def test_feature_stats_streaming_and_merge() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1000, 16)) * 3 + 100.0  # large offset stresses the update
    stats = FeatureStats()
    for chunk in np.array_split(x, [1, 7, 300, 301, 650]):
        stats.update(chunk)
    stats.update(np.empty((0, 16)))
    assert stats.count == 1000 and stats.dim == 16
    np.testing.assert_allclose(stats.mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-11)

    # partial stats from two "workers", one fed a torch tensor, then merged
    a = FeatureStats().update(x[:400])
    b = FeatureStats().update(torch.from_numpy(x[400:]).float())
    merged = FeatureStats().merge(a).merge(b)
    assert merged.count == 1000
    np.testing.assert_allclose(merged.mean, x.mean(0), rtol=1e-6)
    np.testing.assert_allclose(merged.cov, np.cov(x, rowvar=False), rtol=1e-4)


def test_feature_stats_dict_round_trip() -> None:
    rng = np.random.default_rng(4)
    stats = FeatureStats().update(rng.standard_normal((50, 4)))
    via_json = FeatureStats.from_dict(json.loads(json.dumps(stats.to_dict(as_lists=True))))
    via_arrays = FeatureStats.from_dict(stats.to_dict())
    for other in (via_json, via_arrays):
        assert other.count == 50
        np.testing.assert_array_equal(other.mean, stats.mean)
        np.testing.assert_array_equal(other.cov, stats.cov)
    assert FeatureStats.from_dict(FeatureStats().to_dict()).count == 0


def test_feature_stats_errors() -> None:
    stats = FeatureStats()
    with pytest.raises(ValueError, match="empty"):
        _ = stats.mean
    stats.update(np.ones((1, 3)))
    with pytest.raises(ValueError, match="at least 2"):
        _ = stats.cov
    with pytest.raises(ValueError, match="dimension"):
        stats.update(np.ones((2, 4)))
    with pytest.raises(ValueError, match="2-D"):
        stats.update(np.ones(3))


def test_per_class_frechet() -> None:
    rng = np.random.default_rng(5)
    real = rng.standard_normal((300, 4))
    real_y = np.repeat([0, 1, 2], 100)
    fake = real.copy()
    fake[100:200] += 2.0  # class 1 shifted by 2 in every dimension
    fake_y = real_y.copy()
    fake_y[-99:] = 3  # class 2 keeps one sample, class 3 is fake-only
    out = per_class_frechet(real, real_y, fake, fake_y)
    assert set(out) == {0, 1, 2, 3}
    assert abs(out[0]) < 1e-6
    assert out[1] == pytest.approx(4 * 2.0**2, rel=1e-6)
    assert math.isnan(out[2]) and math.isnan(out[3])


def test_precision_recall_identical_and_disjoint(one_thread: None) -> None:
    gen = torch.Generator().manual_seed(0)
    real = torch.randn(400, 8, generator=gen)
    p, r = precision_recall(real, real.clone(), k=3, block_size=64)
    assert p == 1.0 and r == 1.0
    p, r = precision_recall(real, torch.randn(400, 8, generator=gen) + 50, k=3)
    assert p == 0.0 and r == 0.0
    # fakes that collapse onto a small region: high precision, low recall
    p, r = precision_recall(real.numpy(), real[:20].numpy() * 0.1, k=3)
    assert p > 0.9 and r < 0.3


def test_density_coverage_identical_and_disjoint(one_thread: None) -> None:
    rng = np.random.default_rng(6)
    real = rng.standard_normal((500, 8))
    d, c = density_coverage(real, real.copy(), k=5, block_size=100)
    assert c == 1.0 and 0.8 < d < 1.2
    same_dist = rng.standard_normal((500, 8))
    d, c = density_coverage(real, same_dist, k=5)
    assert 0.7 < d < 1.3 and c > 0.9
    d, c = density_coverage(real, same_dist + 50, k=5)
    assert d == 0.0 and c == 0.0


def test_manifold_block_size_does_not_change_results(one_thread: None) -> None:
    rng = np.random.default_rng(7)
    real, fake = rng.standard_normal((300, 6)), rng.standard_normal((250, 6)) * 1.3
    assert precision_recall(real, fake, block_size=64) == precision_recall(
        real, fake, block_size=1000
    )
    assert density_coverage(real, fake, block_size=64) == density_coverage(
        real, fake, block_size=1000
    )


def test_manifold_errors() -> None:
    x = np.zeros((3, 2))
    with pytest.raises(ValueError, match="more than k"):
        precision_recall(x, np.ones((10, 2)), k=3)
    with pytest.raises(ValueError, match="dimensions"):
        density_coverage(np.ones((10, 2)), np.ones((10, 3)))
    with pytest.raises(ValueError, match="k must be"):
        density_coverage(np.ones((10, 2)), np.ones((10, 2)), k=0)


# -- KID -----------------------------------------------------------------------------------
def _naive_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Binkowski et al.'s unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, written out."""
    m, d = len(x), x.shape[1]

    def k(a: np.ndarray, b: np.ndarray) -> float:
        return (sum(float(a[t]) * float(b[t]) for t in range(d)) / d + 1.0) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return xx / (m * (m - 1)) + yy / (m * (m - 1)) - 2 * xy / (m * m)


def test_kid_matches_a_direct_computation() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((9, 4)), rng.standard_normal((9, 4)) + 0.5
    assert mmd2_unbiased(x, y) == pytest.approx(_naive_mmd2(x, y), rel=1e-12)

    # subsets: each draws subset_size rows of each side without replacement (real, then fake)
    real, fake = rng.standard_normal((30, 4)), rng.standard_normal((25, 4)) * 1.5
    mean, std, m = kernel_distance(real, fake, subsets=5, subset_size=8, seed=3)
    draws = np.random.default_rng(3)
    values = []
    for _ in range(5):
        a = real[draws.choice(30, 8, replace=False)]
        values.append(_naive_mmd2(a, fake[draws.choice(25, 8, replace=False)]))
    assert m == 8
    assert mean == pytest.approx(np.mean(values), rel=1e-10)
    assert std == pytest.approx(np.std(values), rel=1e-10)


def test_kid_subset_size_shrinks_and_estimate_is_unbiased() -> None:
    rng = np.random.default_rng(1)
    real, fake = rng.standard_normal((12, 3)), rng.standard_normal((7, 3))
    mean, std, m = kernel_distance(real, fake, subsets=4, subset_size=1000)
    assert m == 7 and std > 0  # 7 of the 12 real rows differ between subsets
    _, std_all, _ = kernel_distance(real[:7], fake, subsets=4, subset_size=1000)
    assert std_all == pytest.approx(0.0, abs=1e-15)  # every subset is both whole sets

    # same distribution: the estimates scatter around 0 (negative ones included), unlike FD
    same = [kernel_distance(rng.standard_normal((50, 3)), rng.standard_normal((50, 3)),
                            subsets=1, subset_size=50)[0] for _ in range(200)]  # fmt: skip
    assert min(same) < 0 < max(same)
    assert abs(np.mean(same)) < 3 * np.std(same) / np.sqrt(len(same))
    shifted, _, _ = kernel_distance(rng.standard_normal((50, 3)), rng.standard_normal((50, 3)) + 1)
    assert shifted > 10 * np.std(same)


def test_kid_errors() -> None:
    with pytest.raises(ValueError, match="at least 2 rows"):
        kernel_distance(np.ones((1, 3)), np.ones((5, 3)))
    with pytest.raises(ValueError, match="equal widths"):
        kernel_distance(np.ones((4, 3)), np.ones((4, 2)))
    with pytest.raises(ValueError, match="subsets"):
        kernel_distance(np.ones((4, 3)), np.ones((4, 3)), subsets=0)
