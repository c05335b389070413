"""Spherical k-means and semantic dedup (pure numpy/faiss) against brute force."""

from __future__ import annotations

import numpy as np
import pytest

from dedt_ray.config import ConfigError, load_config
from dedt_ray.selection import clusters, dedup
from dedt_ray.selection.clusters import (
    assign_clusters,
    check_clusters,
    default_clusters,
    fit_clusters,
    in_fit_sample,
    normalize_rows,
)
from dedt_ray.selection.dedup import dedup_cluster, semantic_dedup


def brute_dedup(X: np.ndarray, threshold: float, priority: np.ndarray) -> np.ndarray:
    """The rule written out: visit rows by descending priority; a row within the threshold
    of a kept row points at the most similar kept row, else it is kept."""
    unit = X / np.linalg.norm(X, axis=1, keepdims=True)
    unit = unit.astype(np.float32).astype(np.float64)
    sim = unit @ unit.T
    kept: list[int] = []
    rep = np.full(len(X), -1)
    for j in sorted(range(len(X)), key=lambda i: (-priority[i], i)):
        near = [i for i in kept if sim[i, j] >= threshold - 1e-6]
        if near:
            rep[j] = max(near, key=lambda i: sim[i, j])
        else:
            kept.append(j)
    return rep


def with_copies(n_base: int, n_copies: int, d: int, noise: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n_base, d))
    src = rng.integers(0, n_base, n_copies)
    return np.concatenate([base, base[src] + noise * rng.standard_normal((n_copies, d))]), src


@pytest.mark.parametrize("row_block,kept_block", [(7, 5), (64, 16_384), (1024, 16_384)])
def test_dedup_cluster_matches_the_rule_written_out(monkeypatch, row_block, kept_block):
    monkeypatch.setattr(dedup, "ROW_BLOCK", row_block)
    monkeypatch.setattr(dedup, "KEPT_BLOCK", kept_block)
    rng = np.random.default_rng(row_block)
    X, _ = with_copies(40, 300, 8, noise=0.15, seed=row_block)  # chains of near copies
    priority = rng.random(len(X))
    rep, sim = dedup_cluster(X, 0.97, priority)
    want = brute_dedup(X, 0.97, priority)
    np.testing.assert_array_equal(rep, want)
    unit = normalize_rows(X).astype(np.float64)
    dup = rep >= 0
    np.testing.assert_allclose(sim[dup], (unit[dup] * unit[rep[dup]]).sum(axis=1), atol=1e-5)
    assert (sim[~dup] == 0).all() and 0 < dup.sum() < len(X)


def test_dedup_invariants_kept_rows_are_apart_and_cover_the_removed():
    X, _ = with_copies(200, 400, 16, noise=0.2, seed=3)
    rep, sim = dedup_cluster(X, 0.9)
    unit = normalize_rows(X)
    kept = np.flatnonzero(rep < 0)
    gram = unit[kept] @ unit[kept].T
    np.fill_diagonal(gram, 0)
    assert gram.max() < 0.9 - 1e-6  # no two kept rows are duplicates
    dup = np.flatnonzero(rep >= 0)
    assert (rep[dup][:, None] == kept[None, :]).any(axis=1).all()  # representatives are kept
    assert (sim[dup] >= 0.9 - 1e-6).all()


def test_dedup_priority_picks_the_representative():
    X = np.array([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0]])
    rep, _ = dedup_cluster(X, 0.99, priority=np.array([0.0, 1.0, 0.5]))
    assert rep.tolist() == [1, -1, -1]  # row 1 has the higher priority: row 0 points at it
    rep, _ = dedup_cluster(X, 0.99)  # row order: row 0 first
    assert rep.tolist() == [-1, 0, -1]


def test_identical_rows_keep_one_and_threshold_one_is_exact():
    X = np.tile(np.arange(1.0, 7.0), (50, 1))
    rep, sim = dedup_cluster(X, 1.0)
    assert (rep == np.r_[-1, np.zeros(49, int)]).all() and np.allclose(sim[1:], 1.0)
    Y = np.stack([X[0], X[0] * 3.0, X[0] + [0.3, 0, 0, 0, 0, 0]])  # same direction; cos 0.9995
    assert dedup_cluster(Y, 1.0)[0].tolist() == [-1, 0, -1]
    assert dedup_cluster(Y, 0.999)[0].tolist() == [-1, 0, 0]


def test_cluster_of_one_and_zero_rows():
    assert dedup_cluster(np.ones((1, 4)), 0.5)[0].tolist() == [-1]
    X = np.array([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0]])  # zero rows have no direction
    assert dedup_cluster(X, 0.5)[0].tolist() == [-1, -1, -1]
    assert np.allclose(normalize_rows(X), X)


@pytest.mark.parametrize("threshold", [0.0, -0.5, 1.01, float("nan")])
def test_threshold_outside_zero_one_is_rejected(threshold):
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]"):
        dedup_cluster(np.ones((3, 2)), threshold)


def test_nan_rows_are_rejected():
    X = np.ones((4, 3))
    X[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        dedup_cluster(X, 0.9)


@pytest.mark.parametrize(
    "value, want",
    [("true", 0.95), ("false", False), ("0.9", 0.9), ("1", 1.0), ("null", False)],
)
def test_config_dedup_values(value, want):
    assert load_config(None, [f"select.dedup={value}"]).select.dedup == want


@pytest.mark.parametrize("value", ["0", "1.5", "-0.1", "often", "[0.9]"])
def test_config_dedup_threshold_outside_zero_one_fails(value):
    with pytest.raises(ConfigError, match=r"select.dedup.*\(0, 1\]"):
        load_config(None, [f"select.dedup={value}"])


def test_config_groups_and_clusters_are_checked():
    with pytest.raises(ConfigError, match="select.groups"):
        load_config(None, ["select.groups=classes"])
    with pytest.raises(ConfigError, match="select.clusters"):
        load_config(None, ["select.clusters=0"])


def test_default_clusters_is_sqrt_capped():
    assert default_clusters(1) == 1
    assert default_clusters(1797) == 42
    assert default_clusters(1_281_167) == 1132
    assert default_clusters(10**9) == clusters.MAX_CLUSTERS
    with pytest.raises(ValueError, match="select.clusters=50 needs at least 50 rows.*have 12"):
        check_clusters(50, 12)


def test_fit_sample_is_seeded_and_order_free():
    ids = [f"img/{i}" for i in range(20_000)]
    mask = in_fit_sample(ids, seed=1, fraction=0.1)
    assert 0.09 < mask.mean() < 0.11
    order = np.random.default_rng(0).permutation(len(ids))
    np.testing.assert_array_equal(in_fit_sample([ids[i] for i in order], 1, 0.1), mask[order])
    assert (in_fit_sample(ids, 2, 0.1) != mask).any()
    assert in_fit_sample(ids[:5], 0, 1.0).all()


def test_kmeans_is_spherical_and_assigns_by_cosine():
    rng = np.random.default_rng(0)
    dirs = normalize_rows(rng.standard_normal((5, 32)))
    truth = rng.integers(0, 5, 2000)
    unit = normalize_rows(dirs[truth] + 0.05 * rng.standard_normal((2000, 32)))
    X = rng.uniform(0.5, 20.0, (2000, 1)) * unit  # row lengths must not matter
    centroids = fit_clusters(X, 5, seed=0)
    assert centroids.shape == (5, 32)
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(fit_clusters(unit, 5, seed=0), centroids, atol=1e-5)
    cluster, sim = assign_clusters(X, centroids)
    brute = unit @ centroids.T
    np.testing.assert_array_equal(cluster, brute.argmax(axis=1))
    np.testing.assert_allclose(sim, brute.max(axis=1), atol=1e-5)
    assert sim.mean() > 0.8  # rows lie near their centroid (random centroids: ~0.2)


def test_fewer_rows_than_clusters_fails_naming_both():
    with pytest.raises(ValueError, match="select.clusters=8 needs at least 8 rows.*have 5"):
        fit_clusters(np.ones((5, 3)), 8)


def test_semantic_dedup_removes_injected_copies():
    X, src = with_copies(300, 60, 24, noise=0.01, seed=1)
    duplicate_of, sim, cluster = semantic_dedup(X, 0.98, clusters=10, seed=0)
    removed = np.flatnonzero(duplicate_of >= 0)
    origin = np.concatenate([np.arange(300), src])  # the base row each row was made from
    assert len(removed) == 60  # one removed per copy, nothing else
    assert (origin[removed] == origin[duplicate_of[removed]]).all()
    assert (cluster[removed] == cluster[duplicate_of[removed]]).all()
    assert (sim[removed] >= 0.98).all()
    scores = -np.arange(len(X), dtype=float)  # keep="score": the lower row index wins
    by_score, _, _ = semantic_dedup(X, 0.98, clusters=10, keep="score", scores=scores)
    assert (by_score[by_score >= 0] < np.flatnonzero(by_score >= 0)).all()


def test_semantic_dedup_center_ignores_a_common_offset():
    X, _ = with_copies(200, 20, 16, noise=0.01, seed=4)
    shifted = X + 30.0  # every pair cosine-near until the mean is subtracted
    assert (semantic_dedup(shifted, 0.99, clusters=4)[0] >= 0).sum() > 100
    dup, _, _ = semantic_dedup(shifted, 0.99, clusters=4, center=True)
    np.testing.assert_array_equal(dup >= 0, semantic_dedup(X - X.mean(0), 0.99, 4)[0] >= 0)
    assert (dup >= 0).sum() == 20
