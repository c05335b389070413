"""Label-free curation in the Ray select stage: cluster groups, semantic dedup, bad input."""

from __future__ import annotations

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dedt_ray import selection
from dedt_ray.config import ConfigError, load_config
from dedt_ray.embed import EMBEDDINGS, embedding_table
from dedt_ray.pipeline import run_stage
from dedt_ray.report import read_run, selection_section
from dedt_ray.selection.clusters import default_clusters
from dedt_ray.store import RunStore


def directions(n: int, d: int = 8, blobs: int = 4, seed: int = 0) -> np.ndarray:
    """Rows around a few random directions, at random lengths."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((blobs, d))
    rows = centres[rng.integers(0, blobs, n)] + 0.4 * rng.standard_normal((n, d))
    return rows * rng.uniform(0.5, 2.0, (n, 1))


def write_embed(store: RunStore, X: np.ndarray, labels=None, order_seed: int = 1) -> list[str]:
    """An embed stage written by hand (rows shuffled: the stage must not depend on order)."""
    ids = [f"digits/{i:05d}" for i in range(len(X))]
    labels = np.full(len(X), -1) if labels is None else np.asarray(labels)
    order = np.random.default_rng(order_seed).permutation(len(X))
    table = embedding_table(np.array(ids)[order], labels[order], np.asarray(X)[order])
    store.write_bytes(b"", "embed", EMBEDDINGS, ".keep")
    pq.write_table(table, store.path("embed", EMBEDDINGS, "part-0.parquet"))
    store.write_manifest("embed", {"output_id": "fake", "rows": len(X)})
    return ids


def with_copies(X: np.ndarray, n_copies: int, seed: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """X plus near copies (cosine > 0.999) of `n_copies` distinct rows: (rows, sources)."""
    rng = np.random.default_rng(seed)
    src = rng.choice(len(X), n_copies, replace=False)
    copies = X[src] + 1e-3 * rng.standard_normal((n_copies, X.shape[1]))
    return np.concatenate([X, copies]), src


def read_scores(store: RunStore):
    return pads.dataset(store.path("select", "scores.parquet")).to_table().to_pandas()


def run(store: RunStore, *overrides: str) -> dict:
    cfg = load_config(None, ["select.keep_ratio=0.3", *overrides])
    return run_stage("select", cfg, store, force=True)


def check_selection_per_group(scores, X: np.ndarray, ids: list[str], criterion="gaussian"):
    """The kept rows are exactly the pure library's per-group selection of the rows left
    after dedup, each group scored in id order as a class labelled by its group id."""
    live = scores[~scores["duplicate"]].sort_values("id")
    rows = np.array([ids.index(i) for i in live["id"]])
    kept = selection.select(X[rows], live["group"].to_numpy(), criterion, 0.3, seed=0)
    assert set(live["id"].to_numpy()[kept]) == set(scores.loc[scores["kept"], "id"])


def test_unlabelled_data_is_grouped_by_clusters(ray_cluster, tmp_path):
    store = RunStore(str(tmp_path / "run"))
    X = directions(150)
    ids = write_embed(store, X)
    manifest = run(store)
    k = default_clusters(150)
    grouping = manifest["grouping"]
    assert grouping["mode"] == "clusters" and grouping["clusters"] == k
    assert grouping["fit_rows"] == 150 and 1 < grouping["groups"] <= k
    assert sum(g["n"] for g in manifest["per_group"]) == 150 == manifest["rows"]
    scores = read_scores(store)
    assert (scores["label"] == -1).all() and scores["group"].between(0, k - 1).all()
    assert scores["group"].nunique() == grouping["groups"] and "per_class" not in manifest
    check_selection_per_group(scores, X, ids)
    assert not store.exists("select", "duplicates.parquet")
    run(store)  # a rerun fits the same clusters
    again = read_scores(store)
    assert (again.sort_values("id")["group"].to_numpy() == scores.sort_values("id")["group"]).all()


def test_dedup_removes_injected_copies_before_scoring(ray_cluster, tmp_path):
    store = RunStore(str(tmp_path / "run"))
    X, src = with_copies(directions(120, d=16), 20)
    ids = write_embed(store, X)
    manifest = run(store, "select.dedup=0.999", "select.clusters=5")
    dup = pq.read_table(store.path("select", "duplicates.parquet")).to_pandas()
    assert list(dup.columns) == ["id", "duplicate_of", "similarity"]
    pairs = {frozenset((ids[s], ids[120 + j])) for j, s in enumerate(src)}
    assert {frozenset(p) for p in zip(dup["id"], dup["duplicate_of"], strict=True)} == pairs
    assert (dup["similarity"] >= 0.999).all()
    scores = read_scores(store).set_index("id")
    removed = scores.loc[dup["id"]]
    assert removed["duplicate"].all() and not removed["kept"].any()
    assert removed["score"].isna().all()
    assert not scores.loc[dup["duplicate_of"], "duplicate"].any()  # representatives stay
    groups = scores["group"]
    assert (groups.loc[dup["id"]].to_numpy() == groups.loc[dup["duplicate_of"]].to_numpy()).all()
    assert manifest["dedup"]["removed"] == 20 == manifest["dedup"]["sets"]
    assert sum(g["duplicates"] for g in manifest["per_group"]) == 20
    assert "removed 20 near-duplicates" in manifest["summary"]
    check_selection_per_group(scores.reset_index(), X, ids)
    png = Image.open(store.path("select", "duplicates.png"))
    assert png.size[0] > 200 and png.size[1] > 100
    html = selection_section(read_run(store))  # the report shows the count and the pairs
    assert 'alt="near-duplicate pairs removed"' in html and "removed 20 near" in html


def test_dedup_with_label_groups_and_the_best_scoring_kept(ray_cluster, tmp_path):
    store = RunStore(str(tmp_path / "run"))
    X, src = with_copies(directions(90), 15)
    labels = np.r_[np.arange(90) % 3, (np.arange(15) + 1) % 3]  # copies in other classes
    ids = write_embed(store, X, labels)
    manifest = run(store, "select.dedup=0.99", "select.dedup_keep=score", "select.clusters=4")
    assert manifest["grouping"]["mode"] == "labels" and manifest["dedup"]["keep"] == "score"
    scores = read_scores(store)
    assert (scores["group"] == scores["label"]).all()
    assert scores["duplicate"].sum() == 15 == manifest["dedup"]["removed"]
    assert [c["label"] for c in manifest["per_class"]] == [0, 1, 2]
    check_selection_per_group(scores, X, ids)


def test_center_removes_a_common_offset(ray_cluster, tmp_path):
    store = RunStore(str(tmp_path / "run"))
    X, src = with_copies(directions(100, d=16), 10)
    write_embed(store, X + 20.0)  # a common offset: every pair cosine-near
    plain = run(store, "select.dedup=0.999", "select.clusters=4")
    centred = run(store, "select.dedup=0.999", "select.clusters=4", "select.center=true")
    assert plain["dedup"]["removed"] > 50  # mostly unrelated rows
    assert centred["dedup"]["removed"] == 10 and centred["grouping"]["centred"]


def test_groups_none_is_one_group(ray_cluster, tmp_path):
    store = RunStore(str(tmp_path / "run"))
    X = directions(60)
    ids = write_embed(store, X, np.arange(60) % 2)
    manifest = run(store, "select.groups=none", "select.criterion=knn")
    scores = read_scores(store)
    assert (scores["group"] == 0).all() and manifest["grouping"]["groups"] == 1
    assert manifest["grouping"]["clusters"] is None and manifest["kept"] == 18
    check_selection_per_group(scores, X, ids, "knn")


def test_all_rows_identical(ray_cluster, tmp_path):
    store = RunStore(str(tmp_path / "run"))
    write_embed(store, np.tile(np.arange(1.0, 9.0), (40, 1)))
    manifest = run(store, "select.dedup=true")
    scores = read_scores(store)
    assert scores["duplicate"].sum() == 39 and scores["kept"].sum() == 1
    assert manifest["grouping"]["groups"] == 1  # every row in one cluster, the rest empty
    plain = run(store)  # no dedup: one group of identical rows, regularised, not NaN
    assert plain["kept"] == 12 and plain["degenerate"]
    assert read_scores(store)["score"].notna().all()


def test_clusters_of_one(ray_cluster, tmp_path):
    store = RunStore(str(tmp_path / "run"))
    write_embed(store, np.eye(6))  # six orthogonal rows, six clusters: one row each
    manifest = run(store, "select.clusters=6", "select.dedup=true")
    assert manifest["grouping"]["group_sizes"]["max"] == 1
    assert manifest["kept"] == 6 and manifest["dedup"]["removed"] == 0


def test_fewer_rows_than_clusters_fails_before_ray_work(ray_cluster, tmp_path):
    store = RunStore(str(tmp_path / "run"))
    write_embed(store, directions(12))
    with pytest.raises(ConfigError, match="select.clusters=50 needs at least 50 rows.*have 12"):
        run(store, "select.clusters=50")
    assert store.manifest("select") is None


@pytest.mark.parametrize("overrides", [(), ("select.groups=labels",)])
def test_nan_embeddings_name_the_ids(ray_cluster, tmp_path, overrides):
    store = RunStore(str(tmp_path / "run"))
    X = directions(30)
    X[[4, 17]] = np.nan
    write_embed(store, X, None if not overrides else np.zeros(30, int))
    with pytest.raises(Exception, match=r"NaN or inf.*digits/00004.*digits/00017"):
        run(store, *overrides)
