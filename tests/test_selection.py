"""dedt_ray.selection against brute-force references on small inputs."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.decomposition import PCA
from sklearn.metrics import pairwise_distances
from sklearn.mixture import GaussianMixture

from dedt_ray.selection import (
    CRITERIA,
    _util,
    class_groups,
    class_seed,
    keep_mask_class,
    n_keep_for,
    neighbors,
    score,
    score_class,
    score_with_notes,
    select,
)
from dedt_ray.selection.criteria import moderate_ranks


def clustered(sizes: list[int], d: int, seed: int = 0, rank: int | None = None):
    """Float64 embeddings with one anisotropic blob per class, labels 0..len(sizes)-1."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for c, n in enumerate(sizes):
        mix = rng.standard_normal((rank or d, d))
        noise = 0.05 * rng.standard_normal((n, d)) if rank else 0.0
        xs.append(rng.standard_normal((n, rank or d)) @ mix + 4 * rng.standard_normal(d) + noise)
        ys.append(np.full(n, c))
    return np.concatenate(xs), np.concatenate(ys)


def top_keep(scores: np.ndarray, n_keep: int) -> set[int]:
    return set(np.argsort(-scores, kind="stable")[:n_keep].tolist())


def check_against(X, y, criterion, reference, keep_ratio=0.3, **params):
    """Per class: scores close to `reference(Xc)` and `select` keeps its top-n_keep."""
    kept = set(select(X, y, criterion, keep_ratio, **params).tolist())
    ours = score(X, y, criterion, **params)
    for _, idx in class_groups(y, len(X)):
        ref = reference(X[idx])
        np.testing.assert_allclose(ours[idx], ref, rtol=1e-6, atol=1e-8)
        want = {int(idx[i]) for i in top_keep(ref, n_keep_for(len(idx), keep_ratio))}
        assert want == kept & set(idx.tolist())


def knn_reference(Xc: np.ndarray, k: int = 5) -> np.ndarray:
    if len(Xc) == 1:
        return np.zeros(1)
    dist = pairwise_distances(Xc)
    np.fill_diagonal(dist, np.inf)
    return -np.sort(dist, axis=1)[:, min(k, len(Xc) - 1) - 1]


def naive_kcenter(X: np.ndarray) -> list[int]:
    mu = X.mean(axis=0)
    order = [int(np.argmin(np.linalg.norm(X - mu, axis=1)))]
    min_dist = np.linalg.norm(X - X[order[0]], axis=1)
    while len(order) < len(X):
        best, best_d = -1, -1.0
        for i in range(len(X)):
            if i not in order and min_dist[i] > best_d:
                best, best_d = i, min_dist[i]
        order.append(best)
        min_dist = np.minimum(min_dist, np.linalg.norm(X - X[best], axis=1))
    return order


def naive_herding(X: np.ndarray, target: np.ndarray | None = None) -> list[int]:
    mu = X.mean(axis=0) if target is None else target
    order: list[int] = []
    total = np.zeros(X.shape[1])
    while len(order) < len(X):
        best, best_gap = -1, np.inf
        for i in range(len(X)):
            if i in order:
                continue
            gap = np.linalg.norm((total + X[i]) / (len(order) + 1) - mu)
            if gap < best_gap:
                best, best_gap = i, gap
        order.append(best)
        total += X[best]
    return order


def test_gaussian_matches_sklearn():
    X, y = clustered([60, 90, 45], d=6)

    def reference(Xc):
        gm = GaussianMixture(n_components=1, reg_covar=1e-5, covariance_type="full")
        return gm.fit(Xc).score_samples(Xc)

    check_against(X, y, "gaussian", reference)


def test_ppca_matches_sklearn():
    X, y = clustered([80, 120, 15], d=12, rank=3)
    X = np.concatenate([X, np.random.default_rng(1).standard_normal((9, 12))])
    y = np.concatenate([y, np.full(9, 3)])  # class 3: n=9 < d=12

    def reference(Xc):
        ratio = PCA().fit(Xc).explained_variance_ratio_
        q = max(1, int((np.cumsum(ratio) < 0.95).sum()))
        return PCA(n_components=q, svd_solver="full").fit(Xc).score_samples(Xc)

    check_against(X, y, "ppca", reference)
    Xc = X[y == 1]
    fixed = PCA(n_components=5, svd_solver="full").fit(Xc).score_samples(Xc)
    np.testing.assert_allclose(score_class(Xc, "ppca", n_components=5)[0], fixed, rtol=1e-6)


def test_knn_matches_pairwise_distances():
    X, y = clustered([70, 40, 5, 3, 1], d=8)  # classes of <= k members and a class of 1
    check_against(X, y, "knn", knn_reference)
    check_against(X, y, "knn", lambda Xc: knn_reference(Xc, k=2), k=2)


def test_knn_blocked_and_float32(monkeypatch):
    X, _ = clustered([150], d=10)
    full = score_class(X, "knn")[0]
    monkeypatch.setattr(neighbors, "BLOCK_BYTES", 8 * 150 * 7)  # 7 rows per block
    np.testing.assert_allclose(score_class(X, "knn")[0], full, rtol=1e-12)
    X32 = X.astype(np.float32)
    np.testing.assert_allclose(score_class(X32, "knn")[0], knn_reference(X32), rtol=1e-6)


def test_faiss_matches_exact():
    X, y = clustered([300, 200], d=16)
    exact = score(X, y, "knn", backend="exact")
    flat = score(X, y, "knn", backend="faiss")
    auto = score(X, y, "knn", exact_max=100)  # both classes are larger: faiss
    ivf_all_cells = score(X, y, "knn", backend="faiss", index="ivf", nlist=4, nprobe=4)
    for other in (flat, auto, ivf_all_cells):
        np.testing.assert_allclose(other, exact, rtol=1e-4)
    kept = select(X, y, "knn", 0.5, backend="exact")
    assert np.array_equal(select(X, y, "knn", 0.5, backend="faiss"), kept)
    _, notes = score_class(X[:300], "knn", backend="faiss", index="ivf", nlist=8, nprobe=2)
    assert any("IVF" in note for note in notes)


def test_ivf_is_an_upper_bound_with_exact_fallback():
    """IVF sees a subset of the candidates: its k-th distance is never below the exact one;
    rows whose probed cell is too small are searched exactly."""
    X, _ = clustered([400], d=8)
    exact = score_class(X, "knn", backend="exact")[0]
    approx, notes = score_class(X, "knn", backend="faiss", index="ivf", nlist=80, nprobe=1)
    assert np.all(approx <= exact + 1e-5)
    searched = int(notes[-1].split("; ")[1].split()[0])
    assert 0 < searched < 400 and not np.allclose(approx, exact)


def test_faiss_with_duplicates():
    X, _ = clustered([60], d=6)
    X = np.concatenate([X, X[:10], X[:10]])  # rows 0..9 appear three times
    exact, notes = score_class(X, "knn", k=2, backend="exact")
    np.testing.assert_allclose(score_class(X, "knn", k=2, backend="faiss")[0], exact, atol=1e-5)
    assert (exact == 0).sum() == 30 and any("duplicate" in note for note in notes)


@pytest.mark.parametrize("keep_ratio", [0.1, 0.25, 0.5, 0.55, 0.9, 1.0])
def test_moderate_band(keep_ratio):
    X, y = clustered([41, 50, 7], d=5)
    kept = set(select(X, y, "moderate", keep_ratio).tolist())
    for _, idx in class_groups(y, len(X)):
        Xc = X[idx]
        dist = np.linalg.norm(Xc - np.median(Xc, axis=0), axis=1)
        order = np.argsort(dist, kind="stable")
        n, n_keep = len(idx), n_keep_for(len(idx), keep_ratio)
        lo = round((n - n_keep) / 2)
        assert {int(i) for i in idx[order[lo : lo + n_keep]]} == kept & set(idx.tolist())
        scores = score_class(Xc, "moderate")[0]
        assert np.array_equal(moderate_ranks(scores)[order], np.arange(n))
        assert scores[order[(n - 1) // 2]] == scores.max()  # the middle rank scores highest


@pytest.mark.parametrize(
    "criterion,naive", [("kcenter", naive_kcenter), ("herding", naive_herding)]
)
def test_greedy_matches_naive_loop(criterion, naive):
    X, y = clustered([40, 25], d=4)
    kept = set(select(X, y, criterion, 0.3).tolist())
    for _, idx in class_groups(y, len(X)):
        order = naive(X[idx])
        scores = score_class(X[idx], criterion)[0]
        assert np.array_equal(np.argsort(-scores), order)
        assert np.array_equal(scores[order], -np.arange(len(idx)))
        n_keep = n_keep_for(len(idx), 0.3)
        assert {int(i) for i in idx[order[:n_keep]]} == kept & set(idx.tolist())


@pytest.mark.parametrize("criterion", ["kcenter", "herding"])
def test_greedy_partitioned_approximation(criterion):
    X, _ = clustered([50], d=3)
    seed, n_parts = 7, 3
    scores, notes = score_class(X, criterion, seed=seed, max_exact=20)
    assert any("partition" in note for note in notes)
    assert sorted(scores.tolist()) == sorted((-np.arange(50.0)).tolist())
    parts = np.array_split(np.random.default_rng(seed).permutation(50), n_parts)
    mu = X.mean(axis=0)
    for p, idx in enumerate(parts):
        if criterion == "herding":
            order = naive_herding(X[idx], target=mu)
        else:  # starts at the partition member nearest the class mean
            order = np.argsort(-scores[idx])
            assert order[0] == np.argmin(np.linalg.norm(X[idx] - mu, axis=1))
        assert np.array_equal(scores[idx[order]], -(np.arange(len(idx)) * n_parts + p))
    truncated, _ = score_class(X, criterion, n_keep=11, seed=seed, max_exact=20)
    assert top_keep(truncated, 11) == top_keep(scores, 11)


def test_select_class_balance_sorted_int64():
    X, y = clustered([1, 2, 3, 7, 30, 101], d=4)
    for criterion in CRITERIA:
        for keep_ratio in (0.01, 0.33, 0.5, 1.0):
            kept = select(X, y, criterion, keep_ratio)
            assert kept.dtype == np.int64 and np.all(np.diff(kept) > 0)
            counts = np.bincount(y[kept], minlength=6)
            expected = [max(1, round(keep_ratio * n)) for n in (1, 2, 3, 7, 30, 101)]
            assert counts.tolist() == expected, (criterion, keep_ratio)


def test_select_equals_per_class_stage_path():
    """What a stage computes group by group is exactly what `select` returns."""
    X, y = clustered([33, 20, 47], d=5)
    y = y + 10
    for criterion in CRITERIA:
        kept = []
        for label, idx in class_groups(y, len(X)):
            n_keep = max(1, round(0.4 * len(idx)))
            scores, _ = score_class(X[idx], criterion, n_keep, seed=3 + label)
            kept.extend(idx[keep_mask_class(scores, criterion, n_keep)].tolist())
        assert sorted(kept) == select(X, y, criterion, 0.4, seed=3).tolist(), criterion


def test_score_ranks_agree_with_select():
    X, y = clustered([30, 45], d=5)
    for criterion in ("gaussian", "ppca", "knn", "kcenter", "herding", "random"):
        scores = score(X, y, criterion)
        kept = set(select(X, y, criterion, 0.4).tolist())
        for _, idx in class_groups(y, len(X)):
            top = {int(idx[i]) for i in top_keep(scores[idx], n_keep_for(len(idx), 0.4))}
            assert top == kept & set(idx.tolist()), criterion


def test_random_seeds():
    X, y = clustered([40, 40], d=3)
    a, b = select(X, y, "random", 0.5, seed=1), select(X, y, "random", 0.5, seed=1)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, select(X, y, "random", 0.5, seed=2))
    scores = score(X, y, "random", seed=1)
    assert not np.array_equal(scores[:40], scores[40:])  # classes draw different streams
    np.testing.assert_array_equal(scores[40:], np.random.default_rng(class_seed(1, 1)).random(40))


def test_labels_none_is_one_class():
    X, _ = clustered([25, 25], d=4)
    for criterion in CRITERIA:
        assert np.array_equal(
            select(X, None, criterion, 0.3), select(X, np.zeros(50, int), criterion, 0.3)
        )
        np.testing.assert_array_equal(score(X, None, criterion), score_class(X, criterion)[0])
    assert len(select(X, None, "knn", 0.3)) == 15


def test_string_labels():
    X, y = clustered([12, 9], d=3)
    names = np.where(y == 0, "cat", "dog")
    assert np.array_equal(select(X, names, "gaussian", 0.5), select(X, y, "gaussian", 0.5))


@pytest.mark.parametrize("criterion", CRITERIA)
def test_degenerate_classes_finite_with_notes(criterion):
    rng = np.random.default_rng(0)
    d = 16
    single = rng.standard_normal((1, d))
    duplicates = np.repeat(rng.standard_normal((2, d)), 4, axis=0)
    few = rng.standard_normal((5, d))  # n < d
    constant = np.full((6, d), 3.0)  # zero variance, all duplicates
    big = 1e6 * rng.standard_normal((4, d))  # huge scale, n < d
    for X, note in [(single, "class of 1"), (duplicates, "duplicate"), (constant, "duplicate")]:
        scores, notes = score_class(X, criterion)
        assert np.isfinite(scores).all() and any(note in n for n in notes), (criterion, notes)
    for X in (few, big):
        assert np.isfinite(score_class(X, criterion)[0]).all()
    if criterion == "gaussian":
        assert any("rank-deficient" in n for n in score_class(few, criterion)[1])
    X = np.concatenate([single, duplicates, few, constant])
    y = np.repeat([0, 1, 2, 3], [1, 8, 5, 6])
    scores, notes = score_with_notes(X, y, criterion)
    assert np.isfinite(scores).all() and {0, 1, 3} <= set(notes)
    assert np.bincount(y[select(X, y, criterion, 0.5)]).tolist() == [1, 4, 2, 3]


def test_chunked_moments_and_median(monkeypatch):
    X, _ = clustered([90], d=7, rank=3)
    X32 = X.astype(np.float32)
    whole = {c: score_class(X, c)[0] for c in ("gaussian", "ppca", "moderate")}
    monkeypatch.setattr(_util, "CHUNK_BYTES", 8 * 7 * 4)  # 4 rows / 4 columns at a time
    for criterion, ref in whole.items():
        np.testing.assert_allclose(score_class(X, criterion)[0], ref, rtol=1e-9)
        np.testing.assert_allclose(score_class(X32, criterion)[0], ref, rtol=1e-3, atol=1e-3)


def test_float32_input_not_copied_and_params_checked():
    X = np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)
    assert _util.as_float(X) is X
    assert select(X, None, "gaussian", 0.5, k=3).size == 10  # another criterion's param: ignored
    with pytest.raises(TypeError):
        select(X, None, "gaussian", 0.5, kk=3)
    with pytest.raises(ValueError):
        select(X, None, "nope", 0.5)
    with pytest.raises(ValueError):
        select(X, None, "knn", 0.0)
    with pytest.raises(ValueError):
        score(np.full((3, 2), np.nan), None, "gaussian")


def test_duplicate_count_is_exact():
    X = np.random.default_rng(0).standard_normal((50, 3)).astype(np.float32)
    assert _util.count_duplicate_rows(X) == 0
    assert _util.count_duplicate_rows(np.concatenate([X, X[:7], X[:2]])) == 9
    Y = X.copy()
    Y[1, 2] = np.nextafter(Y[0, 2], np.inf, dtype=np.float32)
    Y[1, :2] = Y[0, :2]  # differs from row 0 by one ulp
    assert _util.count_duplicate_rows(Y) == 0
