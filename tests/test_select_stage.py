"""The select stage on a local Ray cluster, on the session's real embed output: same kept
set as the pure library, artifacts."""

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dedt_ray import selection
from dedt_ray.config import load_config
from dedt_ray.embed import EMBEDDINGS, read_embeddings
from dedt_ray.pipeline import run_stage
from dedt_ray.selection.stage import SCORE_COLUMNS
from dedt_ray.store import RunStore

from runs import ROWS, UPSTREAM, copy_run


def _kept_per_class(labels: np.ndarray, ratio: float) -> list[int]:
    """methods.md: per class keep max(1, round(r * n_c))."""
    return [max(1, round(ratio * n)) for n in np.bincount(labels)]


@pytest.mark.parametrize(  # all criteria: test_selection; both groupby shuffles
    "criterion,shuffle",
    [("gaussian", "auto"), ("moderate", "sort"), ("gaussian", "hash")],
)
def test_stage_matches_pure_select(upstream, tmp_path, criterion, shuffle):
    store = copy_run(upstream, tmp_path / "run", "embed")
    overrides = [*UPSTREAM, f"select.criterion={criterion}", "select.keep_ratio=0.3"]
    cfg = load_config(None, [*overrides, f"select.shuffle={shuffle}"])
    manifest = run_stage("select", cfg, store)
    assert manifest["shuffle"] == (
        "hash_shuffle" if shuffle == "hash" else "sort_shuffle_pull_based"
    )
    assert manifest["inputs"] == {"embed": upstream.manifest("embed")["output_id"]}

    scores = pads.dataset(store.path("select", "scores.parquet")).to_table().to_pandas()
    assert list(scores.columns) == SCORE_COLUMNS
    assert len(scores) == ROWS and scores["id"].is_unique
    assert (scores["criterion"] == criterion).all()
    assert (scores["group"] == scores["label"]).all() and not scores["duplicate"].any()
    assert manifest["grouping"]["mode"] == "labels" and manifest["dedup"] is None

    ids, labels, emb = read_embeddings(store)
    order = np.argsort(ids)  # the stage scores each class in id order
    kept_idx = selection.select(emb[order], labels[order], criterion, 0.3, seed=0)
    expected = set(ids[order][kept_idx])
    assert set(scores.loc[scores["kept"], "id"]) == expected

    per_class = {c["label"]: c for c in manifest["per_class"]}
    want = _kept_per_class(labels, 0.3)
    assert [per_class[c]["kept"] for c in range(10)] == want
    assert manifest["kept"] == sum(want) and manifest["rows"] == ROWS
    png = Image.open(store.path("select", "examples.png"))
    assert png.size[0] > 200 and png.size[1] > 100


def test_a_class_of_one_is_kept_and_reported(upstream, tmp_path):
    """The real embeddings with class 2 cut to one member (same files' schema)."""
    store = copy_run(upstream, tmp_path / "run", "embed")
    folder = store.path("embed", EMBEDDINGS)
    table = pads.dataset(folder, format="parquet").to_table()
    twos = np.flatnonzero(table.column("label").to_numpy() == 2)
    mask = np.ones(table.num_rows, dtype=bool)
    mask[twos[1:]] = False
    for part in RunStore(folder).list():
        store.fs.delete_file(store.path("embed", EMBEDDINGS, part))
    pq.write_table(table.filter(pa.array(mask)), store.path("embed", EMBEDDINGS, "part-0.parquet"))
    cfg = load_config(None, [*UPSTREAM, "select.criterion=gaussian", "select.keep_ratio=0.3"])
    manifest = run_stage("select", cfg, store)
    per_class = {c["label"]: c for c in manifest["per_class"]}
    assert per_class[2]["n"] == 1 and per_class[2]["kept"] == 1
    assert manifest["rows"] == ROWS - len(twos) + 1
    single = {k for k, notes in manifest["degenerate"].items() if "class of 1 member" in notes}
    assert single == {"2"}  # the class of one is reported, and only it


def test_select_needs_embed_first(ray_cluster, tmp_path):
    with pytest.raises(RuntimeError, match="needs 'embed' first"):
        run_stage("select", load_config(None), RunStore(str(tmp_path / "run")))


def test_shuffle_choice_follows_embedding_size():
    from dedt_ray.selection.stage import HASH_SHUFFLE_BYTES, ShuffleStrategy, shuffle_strategy

    assert shuffle_strategy("auto", 1000) is ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    assert shuffle_strategy("auto", HASH_SHUFFLE_BYTES) is ShuffleStrategy.HASH_SHUFFLE
    assert shuffle_strategy("sort", 10 * HASH_SHUFFLE_BYTES).value == "sort_shuffle_pull_based"
    assert shuffle_strategy("hash", 1000) is ShuffleStrategy.HASH_SHUFFLE
