"""The select stage on a local Ray cluster: same kept set as the pure library, artifacts."""

import numpy as np
import pyarrow.dataset as pads
import pytest
from PIL import Image

from dedt_ray import selection
from dedt_ray.config import load_config
from dedt_ray.embed import EMBEDDINGS, embedding_table, read_embeddings
from dedt_ray.pipeline import run_stage
from dedt_ray.selection.stage import SCORE_COLUMNS
from dedt_ray.store import RunStore


def _fake_embed(store: RunStore, n_per_class=(30, 12, 1), dim=6, seed=0):
    """Write an embed stage by hand: a few classes, one of them a single member."""
    rng = np.random.default_rng(seed)
    ids, labels, rows = [], [], []
    for label, n in enumerate(n_per_class):
        for i in range(n):
            ids.append(f"digits/{label * 100 + i:05d}")
            labels.append(label)
            rows.append(rng.normal(label, 1.0, dim))
    order = rng.permutation(len(ids))  # the stage must not depend on row order
    table = embedding_table(np.array(ids)[order], np.array(labels)[order], np.array(rows)[order])
    store.write_bytes(b"", "embed", EMBEDDINGS, ".keep")
    import pyarrow.parquet as pq

    pq.write_table(table, store.path("embed", EMBEDDINGS, "part-0.parquet"))
    store.write_manifest("embed", {"output_id": "fake", "rows": len(ids)})


@pytest.mark.parametrize(  # all criteria: test_selection; both groupby shuffles
    "criterion,shuffle",
    [("gaussian", "auto"), ("moderate", "sort"), ("gaussian", "hash")],
)
def test_stage_matches_pure_select(ray_cluster, tmp_path, criterion, shuffle):
    store = RunStore(str(tmp_path / "run"))
    _fake_embed(store)
    overrides = [f"select.criterion={criterion}", "select.keep_ratio=0.3"]
    cfg = load_config(None, [*overrides, f"select.shuffle={shuffle}"])
    manifest = run_stage("select", cfg, store)
    assert manifest["shuffle"] == (
        "hash_shuffle" if shuffle == "hash" else "sort_shuffle_pull_based"
    )

    scores = pads.dataset(store.path("select", "scores.parquet")).to_table().to_pandas()
    assert list(scores.columns) == SCORE_COLUMNS
    assert len(scores) == 43 and scores["id"].is_unique
    assert (scores["criterion"] == criterion).all()
    assert (scores["group"] == scores["label"]).all() and not scores["duplicate"].any()
    assert manifest["grouping"]["mode"] == "labels" and manifest["dedup"] is None

    ids, labels, emb = read_embeddings(store)
    order = np.argsort(ids)  # the stage scores each class in id order
    kept_idx = selection.select(emb[order], labels[order], criterion, 0.3, seed=0)
    expected = set(ids[order][kept_idx])
    assert set(scores.loc[scores["kept"], "id"]) == expected

    per_class = {c["label"]: c for c in manifest["per_class"]}
    assert [per_class[c]["kept"] for c in (0, 1, 2)] == [9, 4, 1]
    assert manifest["kept"] == 14 and manifest["rows"] == 43
    assert "2" in manifest["degenerate"]  # the class of one is reported
    png = Image.open(store.path("select", "examples.png"))
    assert png.size[0] > 200 and png.size[1] > 100


def test_select_needs_embed_first(ray_cluster, tmp_path):
    with pytest.raises(RuntimeError, match="needs 'embed' first"):
        run_stage("select", load_config(None), RunStore(str(tmp_path / "run")))


def test_shuffle_choice_follows_embedding_size():
    from dedt_ray.selection.stage import HASH_SHUFFLE_BYTES, ShuffleStrategy, shuffle_strategy

    assert shuffle_strategy("auto", 1000) is ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    assert shuffle_strategy("auto", HASH_SHUFFLE_BYTES) is ShuffleStrategy.HASH_SHUFFLE
    assert shuffle_strategy("sort", 10 * HASH_SHUFFLE_BYTES).value == "sort_shuffle_pull_based"
    assert shuffle_strategy("hash", 1000) is ShuffleStrategy.HASH_SHUFFLE
