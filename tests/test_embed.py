"""The embedding stage on a local Ray cluster: each id once, manifests, skip and force."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
from PIL import Image

from dedt_ray.cli import main
from dedt_ray.config import load_config
from dedt_ray.embed import read_embeddings
from dedt_ray.pipeline import run_stage
from dedt_ray.store import RunStore


def _folder(tmp_path, n_per_class=5, bad=2):
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for cls in ("a", "b", "c"):
        (root / cls).mkdir(parents=True)
        for i in range(n_per_class):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(buf, "PNG")
            (root / cls / f"{i}.png").write_bytes(buf.getvalue())
    for i in range(bad):
        (root / "a" / f"bad{i}.png").write_bytes(b"\x89PNG broken")
    return root


def test_embed_stage_each_id_once_and_skip_on_rerun(ray_cluster, tmp_path):
    root = _folder(tmp_path)
    cfg = load_config(
        None,
        [
            "data.source=image_folder",
            f"data.path={root}",
            "data.image_size=8",
            "embed.encoder=random_projection",
            "embed.dim=16",
            "embed.batch_size=4",
            "embed.rows_per_file=6",
        ],
    )
    store = RunStore(str(tmp_path / "run"))
    manifest = run_stage("embed", cfg, store)
    assert manifest["rows"] == 15 and manifest["skipped"] == 2 and manifest["dim"] == 16
    # random projection of 8x8 grey pixels to 16-d: one [1, 64] x [64, 16] matmul per image
    assert manifest["encoder_flops_per_image"] == 2 * 64 * 16
    assert manifest["flops"] == 15 * 2 * 64 * 16
    assert {e["id"] for e in manifest["skipped_examples"]} == {"a/bad0.png", "a/bad1.png"}

    ids, labels, emb = read_embeddings(store)
    assert sorted(ids) == sorted(f"{c}/{i}.png" for c in "abc" for i in range(5))
    assert emb.shape == (15, 16) and emb.dtype == np.float32 and np.isfinite(emb).all()
    assert dict(zip(ids, labels, strict=True))["c/3.png"] == 2
    schema = pads.dataset(store.path("embed", "embeddings.parquet")).schema
    assert schema.field("embedding").type == pa.list_(pa.float32(), 16)
    files = store.list("embed", "embeddings.parquet")
    assert len(files) >= 3  # row-count-bounded files (<= 6 rows each)

    stamp = store.read_bytes("embed", "_manifest.json")
    again = run_stage("embed", cfg, store)
    assert again["skipped_stage"] and store.read_bytes("embed", "_manifest.json") == stamp
    assert store.list("embed", "embeddings.parquet") == files

    forced = run_stage("embed", cfg, store, force=True)
    assert forced["output_id"] != again["output_id"]
    assert len(read_embeddings(store)[0]) == 15  # overwritten, not appended

    changed = cfg.model_copy(update={"embed": cfg.embed.model_copy(update={"dim": 8})})
    assert run_stage("embed", changed, store).get("skipped_stage") is None
    assert read_embeddings(store)[2].shape == (15, 8)


def test_cli_embed_on_digits(ray_cluster, tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = [
        "embed",
        "--config",
        "configs/default.yaml",
        "--run-dir",
        str(run_dir),
        "embed.encoder=pixels",
        "embed.dim=64",
        "data.image_size=8",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "1797 images embedded" in out
    manifest = RunStore(str(run_dir)).manifest("embed")
    assert manifest["rows"] == 1797 and manifest["skipped"] == 0
    assert (run_dir / "config.yaml").exists()
    assert main(argv) == 0
    assert "up to date, skipped" in capsys.readouterr().out
