"""The artifacts stages exchange: where each lives in the run directory, its schema, its reader.

Stages meet only here: a stage writes its artifacts under `<run>/<stage>/` and reads the
artifacts of the upstream stages the pipeline gives it (`StageContext.inputs`), through the
names and readers below. No torch here (the CLI imports this before any cluster work).

    embed/embeddings.parquet      id, label, embedding (fixed_size_list<float32>)
    embed/classes.json            {"classes": [name, ...]}
    select/scores.parquet         id, label, criterion, score, kept [, weight]
    reweight/class_weights.json   {"weights": {"<label>": float}, ...}
    latents/latents.parquet       id, label, latent (fixed_size_list<float32>, C*h*w)
    latents/info.json             shape [C, h, w], scaling_factor, classes
    <stage>/model/                an export: diffusers layout (unet/, scheduler/ [, vae/]),
                                  model_index.json and dedt_model.json (label space, compute)
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from dedt_ray.store import RunStore

EMBEDDINGS = ("embed", "embeddings.parquet")
CLASSES = ("embed", "classes.json")
SCORES = ("select", "scores.parquet")
CLASS_WEIGHTS = ("reweight", "class_weights.json")
LATENTS = ("latents", "latents.parquet")
LATENT_INFO = ("latents", "info.json")
EXPORT_INFO = "dedt_model.json"  # inside an export folder


def model_dir(stage: str) -> tuple[str, str]:
    """The export folder a training stage writes: `<run>/<stage>/model`."""
    return (stage, "model")


# -- tables --------------------------------------------------------------------------------
# Arrow extension types whose values are pickles: Ray Data's object column, and pyarrow's
# legacy PyExtensionType. Converting such a column to Python (to_pylist, to_numpy) unpickles
# it wherever ray.data is imported, so no table the project reads may hold one.
PICKLED_TYPES = ("ray.data.arrow_pickled_object", "arrow.py_extension_type")


def _nested(kind: pa.DataType) -> list[pa.Field]:
    if isinstance(kind, pa.StructType):
        return [kind.field(i) for i in range(kind.num_fields)]
    if isinstance(kind, pa.MapType):
        return [kind.key_field, kind.item_field]
    value = getattr(kind, "value_field", None)  # list, large_list, fixed_size_list
    return [value] if value is not None else []


def _holds_pickles(column: pa.Field) -> bool:
    """A pickled extension type, registered (the type) or not (the field's metadata)."""
    name = (column.metadata or {}).get(b"ARROW:extension:name", b"").decode(errors="replace")
    kind = column.type
    if isinstance(kind, pa.ExtensionType):
        name, kind = kind.extension_name, kind.storage_type
    return name in PICKLED_TYPES or any(_holds_pickles(f) for f in _nested(kind))


def refuse_pickled_columns(schema: pa.Schema, where: str) -> None:
    """Raise naming `where` and the columns whose values only unpickling would read."""
    pickled = [f.name for f in schema if _holds_pickles(f)]
    if pickled:
        raise ValueError(
            f"{where}: columns {pickled} hold pickled Python objects (Arrow extension "
            f"{'/'.join(PICKLED_TYPES)}); dedt-ray never unpickles a file, write plain types"
        )


def parquet_rows(data: bytes, where: str) -> list[dict[str, Any]]:
    """A small parquet file's rows as dicts (refusing pickled columns)."""
    table = pq.read_table(io.BytesIO(data))
    refuse_pickled_columns(table.schema, where)
    return table.to_pylist()


def vector_table(ids: Any, labels: Any, column: str, vectors: np.ndarray) -> pa.Table:
    """id, label and one fixed_size_list<float32> column (the embeddings and latents schema)."""
    flat = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(vectors), -1)
    values = pa.array(flat.reshape(-1), type=pa.float32())
    return pa.table(
        {
            "id": pa.array([str(i) for i in ids], type=pa.string()),
            "label": pa.array(np.asarray(labels, dtype=np.int64)),
            column: pa.FixedSizeListArray.from_arrays(values, flat.shape[1]),
        }
    )


def read_scores(store: RunStore) -> pa.Table:
    """The select stage's scores.parquet (every row), checked for the columns readers need."""
    table = pads.dataset(store.uri(store.path(*SCORES)), format="parquet").to_table()
    refuse_pickled_columns(table.schema, store.uri(store.path(*SCORES)))
    missing = {"id", "label", "kept"} - set(table.column_names)
    if missing:
        raise ValueError(f"{store.path(*SCORES)} lacks columns {sorted(missing)}")
    return table


def read_selection(store: RunStore, scores: pa.Table | None = None) -> pa.Table:
    """Rows kept by the select stage: id, label (+ weight when the scores carry one)."""
    table = read_scores(store) if scores is None else scores
    table = table.filter(pc.equal(table.column("kept"), True))
    columns = ["id", "label"] + (["weight"] if "weight" in table.column_names else [])
    return table.select(columns)


def read_groups(scores: pa.Table) -> pa.Table | None:
    """id, group of every row when the selection grouped unlabelled rows (clusters), else None:
    the groups then stand in for classes in Group DRO and class-weighted sampling."""
    if "group" not in scores.column_names or pc.any(pc.greater_equal(scores["label"], 0)).as_py():
        return None
    return scores.select(["id", "group"])


def read_class_weights(obj: dict[str, Any], num_classes: int) -> np.ndarray:
    """`{"weights": {"<label int>": float, ...}, ...}` -> probabilities [num_classes].

    Every label 0..num_classes-1 must be present exactly once; weights finite and >= 0 with
    a positive sum. Other top-level keys are ignored.
    """
    weights = obj.get("weights") if isinstance(obj, dict) else None
    if not isinstance(weights, dict):
        raise ValueError('class weights: expected {"weights": {"<label>": float, ...}}')
    out = np.full(num_classes, np.nan)
    for key, value in weights.items():
        try:
            label = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"class weights: label {key!r} is not an integer") from None
        if str(label) != str(key).strip() or not 0 <= label < num_classes:
            raise ValueError(f"class weights: label {key!r} not in 0..{num_classes - 1}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"class weights: weight of {key} is not a number: {value!r}")
        out[label] = float(value)
    missing = np.flatnonzero(np.isnan(out))
    if len(missing):
        raise ValueError(f"class weights: no weight for labels {missing.tolist()}")
    if not np.isfinite(out).all() or (out < 0).any() or out.sum() <= 0:
        raise ValueError(f"class weights must be finite, >= 0, not all 0: {out.tolist()}")
    return out / out.sum()


def class_weights_for(
    obj: dict[str, Any] | None, labels: np.ndarray, classes: list[str] | None
) -> np.ndarray | None:
    """The reweight stage's class weights as probabilities over the data's classes, or None."""
    if obj is None:
        return None
    if labels.min() < 0:
        raise ValueError("class weights (reweight stage) need labelled data")
    return read_class_weights(obj, len(classes) if classes else int(labels.max()) + 1)


def class_names(store: RunStore, classes: list[str] | None, k: int) -> list[str]:
    """Names from the dataset, else embed/classes.json, else the label numbers."""
    if not classes and store.exists(*CLASSES):
        classes = store.read_json(*CLASSES).get("classes")
    if classes and len(classes) == k:
        return [str(c) for c in classes]
    return [str(i) for i in range(k)]


# -- what a training stage reads from upstream -----------------------------------------------
@dataclass
class TrainingInputs:
    """The upstream artifacts a training stage uses, and the outputs they came from."""

    used: dict[str, str] = field(default_factory=dict)  # upstream stage -> its output_id
    selection: pa.Table | None = None  # kept rows (select)
    class_weights: dict[str, Any] | None = None  # class_weights.json (reweight), parsed later
    latent_info: dict[str, Any] | None = None  # latents/info.json (latents)
    groups: pa.Table | None = None  # id, group: clusters of unlabelled rows (select)
    manifests: dict[str, dict[str, Any]] = field(default_factory=dict)  # upstream manifests


def read_inputs(store: RunStore, used: dict[str, str]) -> TrainingInputs:
    """Read the artifacts of the upstream stages in `used` (select, reweight, latents)."""
    manifests = {name: store.manifest(name) or {} for name in used}
    inputs = TrainingInputs(used=dict(used), manifests=manifests)
    if "select" in used:
        scores = read_scores(store)
        inputs.selection, inputs.groups = read_selection(store, scores), read_groups(scores)
    if "reweight" in used and store.exists(*CLASS_WEIGHTS):  # a skipped reweight writes none
        inputs.class_weights = store.read_json(*CLASS_WEIGHTS)
    if "latents" in used:
        inputs.latent_info = store.read_json(*LATENT_INFO)
    return inputs


# -- exports -------------------------------------------------------------------------------
def export_config(store: RunStore, model: tuple[str, ...]) -> dict[str, Any]:
    """The denoiser's config (`unet/config.json`) of an export; FileNotFoundError if none."""
    if not store.exists(*model, "unet", "config.json"):
        raise FileNotFoundError(
            f"no exported model at {store.uri(store.path(*model))} (no unet/config.json): "
            f"run the stage that writes it first"
        )
    return store.read_json(*model, "unet", "config.json")


def export_info(store: RunStore, model: tuple[str, ...]) -> dict[str, Any]:
    """An export's dedt_model.json ({} when absent)."""
    return store.read_json(*model, EXPORT_INFO) if store.exists(*model, EXPORT_INFO) else {}


def export_classes(
    store: RunStore, model: tuple[str, ...]
) -> tuple[list[int] | None, list[str] | None, dict[str, Any]]:
    """(class indices or None when unconditional, class names, dedt_model.json) of an export."""
    config, info = export_config(store, model), export_info(store, model)
    embeds = config.get("num_class_embeds")
    if embeds is None:
        return None, info.get("classes"), info
    num = int(info.get("num_classes") or embeds - 1)
    return list(range(num)), info.get("classes"), info
