"""Image sources -> one Ray Dataset schema: `id` (str), `label` (int64, -1 unlabelled),
`image` (uint8 HxWxC at the configured size and mode).

Bad files are skipped and recorded in a `SkipLog` actor. With `data.strict` a file source is
read once first and fails naming the first bad input in input order (sorted paths; rows in
file order), the same one however Ray splits the reads.
"""

from __future__ import annotations

import io
import pickle
import posixpath
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import ray
import ray.data

from dedt_ray.artifacts import refuse_pickled_columns
from dedt_ray.config import DataConfig
from dedt_ray.data.images import IMAGE_EXTENSIONS, BadImage, conform_array, decode

ITEMS_PER_BLOCK = 256


@ray.remote(num_cpus=0)
class SkipLog:
    """Collects (order, id, reason) of skipped inputs from every decode task."""

    def __init__(self) -> None:
        self.items: list[tuple[Any, str, str]] = []

    def add(self, items: list[tuple[Any, str, str]]) -> None:
        self.items.extend(items)

    def get(self) -> list[tuple[str, str]]:
        """(id, reason) in input order (`order`: the relative path, or (file, group, row))."""
        return [(rid, reason) for _, rid, reason in sorted(self.items)]


@dataclass
class Source:
    """A dataset plus what is known about it before it is read."""

    dataset: ray.data.Dataset
    classes: list[str] | None
    skip_log: Any = None
    info: dict[str, Any] = field(default_factory=dict)

    def skipped(self) -> list[tuple[str, str]]:
        """(id, reason) of every input skipped so far (call after the dataset ran)."""
        return ray.get(self.skip_log.get.remote()) if self.skip_log is not None else []


def open_source(cfg: DataConfig) -> Source:
    """Build the lazy Ray Dataset for `cfg.source`. Fails early on a missing path; with
    `data.strict`, on the first bad input of a file source."""
    source = _open(cfg)
    if cfg.strict and source.skip_log is not None:
        _check_strict(cfg)
    return source


def _open(cfg: DataConfig) -> Source:
    readers = {
        "digits": _digits,
        "image_folder": _image_folder,
        "cifar10": _cifar10,
        "parquet": _parquet,
    }
    source = readers[cfg.source](cfg)
    if cfg.limit is not None:
        source.dataset = source.dataset.limit(cfg.limit)
    return source


def _row_count(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"n": np.array([len(batch["id"])])}


def _check_strict(cfg: DataConfig) -> None:
    """Read every input once, skipping and logging bad ones; raise naming the first."""
    probe = _open(cfg.model_copy(update={"strict": False}))
    probe.dataset.map_batches(_row_count, batch_format="numpy").sum("n")
    bad = probe.skipped()
    if bad:
        rid, reason = bad[0]
        folder = cfg.path if "://" in cfg.path else posixpath.abspath(cfg.path)
        what = f"file {posixpath.join(folder, rid)}" if cfg.source == "image_folder" else rid
        raise BadImage(
            f"bad image {what}: {reason} (data.strict is true; the first of {len(bad)} bad "
            f"inputs in input order)"
        )


def _filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), posixpath.abspath(path)


def _require(fs: pafs.FileSystem, path: str, key: str, kind: pafs.FileType) -> None:
    info = fs.get_file_info(path)
    if info.type != kind:
        what = "folder" if kind == pafs.FileType.Directory else "file"
        raise FileNotFoundError(f"{key}: {path} is not an existing {what}")


# -- in-memory sources --------------------------------------------------------------------
def _conform_batch(batch: dict[str, np.ndarray], size: int, mode: str) -> dict[str, np.ndarray]:
    images = [conform_array(img, size, mode) for img in batch["image"]]
    return {"id": batch["id"], "label": batch["label"], "image": np.stack(images)}


def _from_arrays(ids, labels, images, cfg: DataConfig, classes) -> Source:
    n = len(ids)
    ds = ray.data.from_items(
        [
            {"id": i, "label": int(y), "image": img}
            for i, y, img in zip(ids, labels, images, strict=True)
        ],
        override_num_blocks=max(1, min(64, n // ITEMS_PER_BLOCK + 1)),
    )
    ds = ds.map_batches(
        _conform_batch, fn_kwargs={"size": cfg.image_size, "mode": cfg.mode}, batch_size=256
    )
    return Source(ds, classes, info={"inputs": n})


def _digits(cfg: DataConfig) -> Source:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, values 0..16)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # as in fetch_images
    ids = [f"digits/{i:05d}" for i in range(len(images))]
    return _from_arrays(ids, digits.target, images, cfg, [str(c) for c in range(10)])


class _RestrictedUnpickler(pickle.Unpickler):
    """Loads only plain containers and numpy arrays: the CIFAR-10 batches' content."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def load_cifar_batch(fs: pafs.FileSystem, path: str) -> dict[str, Any]:
    """Read one CIFAR 'python version' batch without executing arbitrary pickled code."""
    with fs.open_input_file(path) as f:
        data = f.read()
    try:
        raw = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:
        raise ValueError(f"{path} is not a CIFAR-10 python batch: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{path} is not a CIFAR-10 python batch (no dict inside)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def _cifar10(cfg: DataConfig) -> Source:
    """The official CIFAR-10 python batches folder (data_batch_1..5, test_batch)."""
    fs, root = _filesystem(cfg.path)
    _require(fs, root, "data.path", pafs.FileType.Directory)
    names = {
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "all": [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"],
    }[cfg.split]
    classes = None
    meta_path = posixpath.join(root, "batches.meta")
    if fs.get_file_info(meta_path).type == pafs.FileType.File:
        meta = load_cifar_batch(fs, meta_path)
        classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta["label_names"]]
    ids, labels, images = [], [], []
    for name in names:
        path = posixpath.join(root, name)
        _require(fs, path, "data.path", pafs.FileType.File)
        batch = load_cifar_batch(fs, path)
        data = np.asarray(batch["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise ValueError(f"{path}: 'data' has shape {data.shape}, expected [N, 3072]")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.extend(int(y) for y in batch["labels"])
        ids.extend(f"{name}/{i:05d}" for i in range(len(data)))
    return _from_arrays(ids, labels, np.concatenate(images), cfg, classes or None)


# -- file sources -------------------------------------------------------------------------
def _decode_files(
    batch: dict[str, np.ndarray],
    root: str,
    class_index: dict[str, int] | None,
    size: int,
    mode: str,
    strict: bool,
    skip_log: Any,
) -> dict[str, np.ndarray]:
    ids, labels, images, bad = [], [], [], []
    for path, data in zip(batch["path"], batch["bytes"], strict=True):
        rel = posixpath.relpath(path, root)
        try:
            image = decode(data, size, mode)
        except BadImage as exc:
            if strict:
                raise BadImage(f"bad image file {path}: {exc} (data.strict is true)") from None
            bad.append((rel, rel, str(exc)))
            continue
        ids.append(rel)
        labels.append(class_index[rel.split("/", 1)[0]] if class_index else -1)
        images.append(image)
    if bad:
        ray.get(skip_log.add.remote(bad))
    channels = 1 if mode == "L" else 3
    return {
        "id": np.array(ids, dtype=object),
        "label": np.array(labels, dtype=np.int64),
        "image": np.stack(images) if images else np.zeros((0, size, size, channels), np.uint8),
    }


def _image_folder(cfg: DataConfig) -> Source:
    """One sub-folder per class (ImageFolder), or a flat folder of images (unlabelled)."""
    fs, root = _filesystem(cfg.path)
    _require(fs, root, "data.path", pafs.FileType.Directory)
    entries = fs.get_file_info(pafs.FileSelector(root))
    class_dirs = sorted(
        posixpath.basename(e.path)
        for e in entries
        if e.type == pafs.FileType.Directory and not posixpath.basename(e.path).startswith(".")
    )
    class_index = {c: i for i, c in enumerate(class_dirs)} if class_dirs else None
    paths = [posixpath.join(root, c) for c in class_dirs] if class_dirs else root
    skip_log = SkipLog.remote()
    ds = ray.data.read_binary_files(
        paths,
        filesystem=fs,
        include_paths=True,
        file_extensions=[*IMAGE_EXTENSIONS, *(e.upper() for e in IMAGE_EXTENSIONS)],
    )
    ds = ds.map_batches(
        _decode_files,
        fn_kwargs={
            "root": root,
            "class_index": class_index,
            "size": cfg.image_size,
            "mode": cfg.mode,
            "strict": cfg.strict,
            "skip_log": skip_log,
        },
        batch_size=64,
    )
    return Source(ds, class_dirs or None, skip_log)


def _parquet_rows(
    batch: dict[str, np.ndarray],
    cfg: DataConfig,
    root: str,
    skip_log: Any,
) -> dict[str, np.ndarray]:
    """Read the row groups named in `batch` and decode their images."""
    fs, _ = _filesystem(cfg.path)
    ids, labels, images, bad = [], [], [], []
    for path, group in zip(batch["path"], batch["row_group"], strict=True):
        pf = pads.ParquetFileFormat().make_fragment(path, filesystem=fs)
        refuse_pickled_columns(pf.physical_schema, path)  # each file: schemas may differ
        cols = [
            c for c in (cfg.image_column, cfg.label_column, "id") if c in pf.physical_schema.names
        ]
        table = pf.subset(row_group_ids=[int(group)]).to_table(columns=cols)
        offset = int(sum(rg.num_rows for rg in pf.row_groups[: int(group)]))
        rel = posixpath.relpath(path, root) if path != root else posixpath.basename(path)
        col_ids = table.column("id").to_pylist() if "id" in cols else None
        col_labels = (
            table.column(cfg.label_column).to_pylist() if cfg.label_column in cols else None
        )
        for i, value in enumerate(table.column(cfg.image_column).to_pylist()):
            rid = str(col_ids[i]) if col_ids else f"{rel}:{offset + i}"
            try:
                if isinstance(value, bytes | bytearray):
                    image = decode(bytes(value), cfg.image_size, cfg.mode)
                elif value is None:
                    raise BadImage("null image")
                else:
                    image = conform_array(
                        np.asarray(value, dtype=np.uint8), cfg.image_size, cfg.mode
                    )
            except (BadImage, ValueError, TypeError) as exc:
                if cfg.strict:
                    raise BadImage(f"bad image {rid}: {exc} (data.strict is true)") from None
                bad.append(((path, int(group), i), rid, str(exc)))
                continue
            ids.append(rid)
            labels.append(int(col_labels[i]) if col_labels and col_labels[i] is not None else -1)
            images.append(image)
    if bad:
        ray.get(skip_log.add.remote(bad))
    channels = 1 if cfg.mode == "L" else 3
    size = cfg.image_size
    return {
        "id": np.array(ids, dtype=object),
        "label": np.array(labels, dtype=np.int64),
        "image": np.stack(images) if images else np.zeros((0, size, size, channels), np.uint8),
    }


def _parquet(cfg: DataConfig) -> Source:
    """Parquet file(s) with a column of encoded image bytes or uint8 arrays, optional labels."""
    fs, root = _filesystem(cfg.path)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"data.path: {root} does not exist")
    dataset = pads.dataset(root, filesystem=fs, format="parquet")
    refuse_pickled_columns(dataset.schema, f"data.path: {root}")
    names = dataset.schema.names
    if cfg.image_column not in names:
        raise ValueError(
            f"data.image_column: column {cfg.image_column!r} not in {root} (columns: {names})"
        )
    if cfg.label_column is not None and cfg.label_column not in names:
        raise ValueError(
            f"data.label_column: column {cfg.label_column!r} not in {root} (columns: {names}); "
            "set data.label_column=null for unlabelled data"
        )
    items, total = [], 0
    for frag in dataset.get_fragments():
        for rg in frag.row_groups:
            items.append({"path": frag.path, "row_group": rg.id})
            total += rg.num_rows
    if not items:
        raise ValueError(f"data.path: no parquet rows found under {root}")
    skip_log = SkipLog.remote()
    ds = ray.data.from_items(items, override_num_blocks=min(len(items), 200))
    base = root if info.type == pafs.FileType.Directory else posixpath.dirname(root)
    ds = ds.map_batches(
        _parquet_rows, fn_kwargs={"cfg": cfg, "root": base, "skip_log": skip_log}, batch_size=1
    )
    return Source(ds, None, skip_log, info={"inputs": total})


def fetch_images(cfg: DataConfig, ids: set[str]) -> dict[str, np.ndarray]:
    """A few images by id: read directly for digits and folders, else by filtering the stream."""
    if cfg.source == "digits":
        from sklearn.datasets import load_digits

        images = np.round(load_digits().images * (255.0 / 16.0)).astype(np.uint8)
        return {
            rid: conform_array(images[int(rid.split("/")[1])], cfg.image_size, cfg.mode)
            for rid in ids
            if rid.startswith("digits/")
        }
    if cfg.source == "image_folder":
        fs, root = _filesystem(cfg.path)
        out = {}
        for rid in ids:
            try:
                with fs.open_input_file(posixpath.join(root, rid)) as f:
                    out[rid] = decode(f.read(), cfg.image_size, cfg.mode)
            except (OSError, BadImage):
                continue
        return out
    wanted = set(ids)
    ds = open_source(cfg).dataset.filter(lambda row: row["id"] in wanted)
    return {row["id"]: row["image"] for row in ds.take_all()}
