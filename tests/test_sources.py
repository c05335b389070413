"""Every data source on a local Ray cluster, with generated inputs including corrupt files."""

import io
import pickle
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dedt_ray.config import DataConfig
from dedt_ray.data import open_source
from dedt_ray.data.images import BadImage


def _png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _rows(source):
    rows = source.dataset.take_all()
    return {r["id"]: r for r in rows}


@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "folder"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            arr = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
            (root / cls / f"{i}.png").write_bytes(_png(Image.fromarray(arr)))
    (root / "cat" / "gray.jpg").write_bytes(
        _png(Image.fromarray(np.full((9, 9), 7, np.uint8)), "JPEG")
    )
    rgba = Image.fromarray(np.zeros((10, 10, 4), np.uint8))  # fully transparent -> white
    (root / "dog" / "alpha.webp").write_bytes(_png(rgba, "WEBP"))
    (root / "dog" / "palette.png").write_bytes(_png(Image.new("P", (12, 12), 3)))
    (root / "dog" / "empty.png").write_bytes(b"")
    (root / "dog" / "truncated.png").write_bytes(_png(Image.new("RGB", (40, 40), "red"))[:60])
    (root / "cat" / "notes.png").write_bytes(b"this is not an image")
    (root / "cat" / "readme.txt").write_text("ignored: not an image extension")
    return root


def test_digits_source(ray_cluster):
    source = open_source(DataConfig(source="digits", image_size=12))
    rows = source.dataset.take_all()
    assert len(rows) == 1797 and len({r["id"] for r in rows}) == 1797
    assert source.classes == [str(i) for i in range(10)]
    image = rows[0]["image"]
    assert image.shape == (12, 12, 1) and image.dtype == np.uint8 and image.max() > 100
    assert sorted({r["label"] for r in rows}) == list(range(10))
    rgb = open_source(DataConfig(source="digits", image_size=8, mode="RGB", limit=5))
    assert rgb.dataset.take(1)[0]["image"].shape == (8, 8, 3)


def test_image_folder_skips_and_counts_bad_files(ray_cluster, image_folder):
    source = open_source(DataConfig(source="image_folder", path=str(image_folder), image_size=8))
    rows = _rows(source)
    assert source.classes == ["cat", "dog"]
    assert len(rows) == 9
    assert rows["cat/0.png"]["label"] == 0 and rows["dog/palette.png"]["label"] == 1
    assert all(r["image"].shape == (8, 8, 1) for r in rows.values())
    assert rows["dog/alpha.webp"]["image"].min() == 255  # transparency composited on white
    skipped = dict(source.skipped())
    assert set(skipped) == {"dog/empty.png", "dog/truncated.png", "cat/notes.png"}
    assert "zero bytes" in skipped["dog/empty.png"]


def test_image_folder_strict_names_the_first_bad_file(ray_cluster, image_folder):
    """Three bad files (cat/notes.png, dog/empty.png, dog/truncated.png): strict mode names
    the first in path order, however the reads are split into tasks."""
    cfg = DataConfig(source="image_folder", path=str(image_folder), image_size=8, strict=True)
    first = f"bad image file {image_folder / 'cat' / 'notes.png'}: "
    with pytest.raises(BadImage, match=re.escape(first) + r".*the first of 3 bad inputs"):
        open_source(cfg)  # before anything reads the dataset


def _cifar_batches(folder, rng) -> None:
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"batch_label": name.encode(),
            b"labels": [int(x) for x in rng.integers(0, 10, 4)],
            b"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8),
            b"filenames": [b"x.png"] * 4,
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))


def test_flat_folder_is_unlabelled(ray_cluster, tmp_path):
    for i in range(4):
        (tmp_path / f"{i}.png").write_bytes(_png(Image.new("RGB", (5, 5), (i, i, i))))
    source = open_source(DataConfig(source="image_folder", path=str(tmp_path), mode="RGB"))
    rows = _rows(source)
    assert set(rows) == {f"{i}.png" for i in range(4)}
    assert {r["label"] for r in rows.values()} == {-1} and source.classes is None
    assert rows["0.png"]["image"].shape == (16, 16, 3)


def test_cifar10_batches(ray_cluster, tmp_path):
    rng = np.random.default_rng(1)
    _cifar_batches(tmp_path, rng)
    names = [f"class{i}".encode() for i in range(10)]
    (tmp_path / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}))
    cfg = DataConfig(source="cifar10", path=str(tmp_path), image_size=32, mode="RGB")
    source = open_source(cfg)
    rows = _rows(source)
    assert len(rows) == 20 and source.classes[3] == "class3"
    first = pickle.loads((tmp_path / "data_batch_1").read_bytes())
    expected = first[b"data"][0].reshape(3, 32, 32).transpose(1, 2, 0)
    np.testing.assert_array_equal(rows["data_batch_1/00000"]["image"], expected)
    assert rows["data_batch_1/00000"]["label"] == first[b"labels"][0]
    test = open_source(DataConfig(source="cifar10", path=str(tmp_path), split="test"))
    assert test.dataset.count() == 4


@pytest.mark.parametrize("strict", [True, False])
def test_cifar_names_the_first_bad_batch(ray_cluster, tmp_path, strict):
    """A bad batch file fails the source (its arrays cannot be skipped row by row), strict
    or not, naming the first bad one in reading order (data_batch_1..5, test_batch)."""
    _cifar_batches(tmp_path, np.random.default_rng(1))
    good = (tmp_path / "data_batch_2").read_bytes()
    (tmp_path / "data_batch_2").write_bytes(good[: len(good) // 2])  # truncated
    (tmp_path / "data_batch_4").write_bytes(b"not a pickle")
    cfg = DataConfig(source="cifar10", path=str(tmp_path), strict=strict)
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'data_batch_2'} is not a")):
        open_source(cfg)


def test_cifar_loader_refuses_code_in_pickles(ray_cluster, tmp_path):
    class Evil:
        def __reduce__(self):
            return (eval, ("'owned'",))  # not print: Ray may swap builtins.print

    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(ValueError, match="refusing to load builtins.eval"):
        open_source(DataConfig(source="cifar10", path=str(tmp_path)))


def test_parquet_bytes_and_arrays(ray_cluster, tmp_path):
    imgs = [Image.new("L", (10, 10), v) for v in (10, 20, 30)]
    encoded = [_png(i) for i in imgs] + [b"garbage"]
    table = pa.table({"img": encoded, "y": [0, 1, 2, 1]})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=2)
    cfg = DataConfig(
        source="parquet",
        path=str(tmp_path / "a.parquet"),
        image_column="img",
        label_column="y",
        image_size=8,
    )
    source = open_source(cfg)
    rows = _rows(source)
    assert set(rows) == {"a.parquet:0", "a.parquet:1", "a.parquet:2"}
    assert rows["a.parquet:2"]["label"] == 2 and rows["a.parquet:1"]["image"][0, 0, 0] == 20
    assert [i for i, _ in source.skipped()] == ["a.parquet:3"]

    arrays = np.random.default_rng(2).integers(0, 255, (3, 6, 6, 3), dtype=np.uint8)
    folder = tmp_path / "arr"
    folder.mkdir()
    pq.write_table(
        pa.table({"image": [a.tolist() for a in arrays], "id": ["p", "q", "r"]}),
        folder / "part.parquet",
    )
    cfg = DataConfig(
        source="parquet", path=str(folder), label_column=None, image_size=6, mode="RGB"
    )
    rows = _rows(open_source(cfg))
    np.testing.assert_array_equal(rows["q"]["image"], arrays[1])
    assert rows["q"]["label"] == -1


def test_parquet_strict_names_the_first_bad_row(ray_cluster, tmp_path):
    """Bad rows 9 and 10 of a.parquet (row groups of 4) and row 0 of b.parquet: strict mode
    names a.parquet:9, the first in file and row order (not a.parquet:10, first as text)."""
    good = _png(Image.new("L", (6, 6), 50))
    rows = [b"garbage" if i in (9, 10) else good for i in range(12)]
    pq.write_table(pa.table({"image": rows}), tmp_path / "a.parquet", row_group_size=4)
    pq.write_table(pa.table({"image": [b"", good]}), tmp_path / "b.parquet")
    cfg = DataConfig(source="parquet", path=str(tmp_path), label_column=None, image_size=6)
    assert [i for i, _ in open_source(cfg).skipped()] == []  # nothing read yet
    lenient = open_source(cfg)
    assert len(lenient.dataset.take_all()) == 11
    assert [i for i, _ in lenient.skipped()] == ["a.parquet:9", "a.parquet:10", "b.parquet:0"]
    strict = cfg.model_copy(update={"strict": True})
    with pytest.raises(BadImage, match=r"bad image a\.parquet:9: .*the first of 3 bad inputs"):
        open_source(strict)


def test_parquet_missing_column_is_named(ray_cluster, tmp_path):
    pq.write_table(pa.table({"x": [b""]}), tmp_path / "a.parquet")
    with pytest.raises(ValueError, match="data.image_column"):
        open_source(DataConfig(source="parquet", path=str(tmp_path)))


def test_decode_rejects_non_images():
    from dedt_ray.data.images import decode

    with pytest.raises(BadImage):
        decode(b"not an image", 8, "L")
