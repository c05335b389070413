"""Stage `embed`: stream images through a frozen surrogate encoder with Ray Data.

source (read + decode, CPU tasks) -> resize to the encoder's input (CPU tasks) ->
encoder (actor pool, GPUs when the cluster has them) -> embed/embeddings.parquet
(id, label, embedding: fixed_size_list<float32>).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import ray.data

from dedt_ray.artifacts import CLASSES, refuse_pickled_columns, vector_table
from dedt_ray.artifacts import EMBEDDINGS as EMBEDDINGS_PATH
from dedt_ray.config import Config, EmbedConfig
from dedt_ray.data import open_source
from dedt_ray.data.images import IMAGE_EXTENSIONS
from dedt_ray.encoders import build_encoder, build_preprocessor
from dedt_ray.runtime import cluster_gpus, use_actor_threads
from dedt_ray.stages import StageContext
from dedt_ray.store import RunStore

EMBEDDINGS = EMBEDDINGS_PATH[1]


def embedding_table(ids, labels, embeddings: np.ndarray) -> pa.Table:
    """The embeddings schema: id, label, embedding as fixed_size_list<float32>."""
    return vector_table(ids, labels, "embedding", embeddings)


@functools.lru_cache(maxsize=4)
def _preprocessor(name: str, model: str | None, in_channels: int, image_size: int):
    return build_preprocessor(name, model, in_channels, image_size)


def _resize(batch: dict[str, np.ndarray], **model_args: Any) -> dict[str, np.ndarray]:
    """CPU task: resize to the encoder's input so the actor only normalises and encodes."""
    return {**batch, "image": _preprocessor(**model_args).resize(batch["image"])}


class _Encode:
    """One encoder replica on an actor; uses the GPU Ray assigned to it, if any."""

    def __init__(self, use_gpu: bool, threads: int | None, actors: int, **kwargs: Any):
        import torch

        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        if device == "cpu":  # Ray pins actors to 1 thread; the encoder is the hot loop
            use_actor_threads(threads, actors)
        self.encoder = build_encoder(device=device, **kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        return embedding_table(batch["id"], batch["label"], self.encoder(batch["image"]))


def encoder_flops(emb: EmbedConfig, in_channels: int, image_size: int, seed: int) -> ray.ObjectRef:
    """FLOPs per image of the encoder, recorded so a study counts the selection's compute: a
    Ray task (pretrained weights load where encoders run), started beside the embedding."""

    def count() -> int:
        encoder = build_encoder(emb.encoder, emb.model, emb.dim, in_channels, image_size,
                                seed=seed)  # fmt: skip
        return encoder.flops_per_image()

    return ray.remote(count).options(num_cpus=0).remote()


def read_embeddings(store: RunStore) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, labels, embeddings float32 [N, D]) from a completed embed stage."""
    table = pads.dataset(store.uri(store.path(*EMBEDDINGS_PATH)), format="parquet").to_table()
    refuse_pickled_columns(table.schema, store.uri(store.path(*EMBEDDINGS_PATH)))
    emb = table.column("embedding").combine_chunks()
    dim = emb.type.list_size
    matrix = emb.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
    return (
        np.asarray(table.column("id").to_pylist(), dtype=object),
        table.column("label").to_numpy(),
        matrix,
    )


def embed_dataset(
    ds: ray.data.Dataset, emb: EmbedConfig, in_channels: int, image_size: int, seed: int = 0
) -> ray.data.Dataset:
    """id/label/image rows -> id/label/embedding rows: CPU resize tasks, then encoder actors."""
    model_args = {
        "name": emb.encoder,
        "model": emb.model,
        "in_channels": in_channels,
        "image_size": image_size,
    }
    gpus = emb.gpus_per_actor if emb.gpus_per_actor is not None else min(1.0, cluster_gpus())
    ds = ds.map_batches(_resize, fn_kwargs=model_args, batch_size=emb.batch_size)
    return ds.map_batches(
        _Encode,
        fn_constructor_kwargs={
            "use_gpu": gpus > 0,
            "threads": emb.threads_per_actor,
            "actors": emb.actors,
            "dim": emb.dim,
            "seed": seed,
            **model_args,
        },
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=emb.actors),
        num_gpus=gpus,
        batch_size=emb.batch_size,
        batch_format="numpy",
    )


class NoImagesError(ValueError):
    """The source yielded no decodable image."""


def no_images_message(path: str, skipped: list[tuple[str, str]], shown: int = 5) -> str:
    """ "no decodable images in PATH (4 skipped: a.png: truncated, ...)" and what to do."""
    if not skipped:
        return (
            f"no decodable images in {path} (no image files or rows found); check data.path "
            f"and data.source (image_folder reads {', '.join(IMAGE_EXTENSIONS)})"
        )
    listed = ", ".join(f"{i}: {r}" for i, r in skipped[:shown])
    more = ", ..." if len(skipped) > shown else ""
    return (
        f"no decodable images in {path} ({len(skipped)} skipped: {listed}{more}); "
        "fix or replace those files"
    )


def run(cfg: Config, store: RunStore, ctx: StageContext) -> dict[str, Any]:
    data, emb = cfg.data, cfg.embed
    source = open_source(data)
    in_channels = 1 if data.mode == "L" else 3
    flops = encoder_flops(emb, in_channels, data.image_size, cfg.seed)
    ds = embed_dataset(source.dataset, emb, in_channels, data.image_size, cfg.seed)
    out = store.path(*EMBEDDINGS_PATH)
    ds.write_parquet(store.uri(out), max_rows_per_file=emb.rows_per_file, mode="overwrite")

    skipped = source.skipped()
    if not store.exists(*EMBEDDINGS_PATH) or not store.list(*EMBEDDINGS_PATH):
        raise NoImagesError(no_images_message(data.path or data.source, skipped))
    written = pads.dataset(store.uri(out), format="parquet")
    rows = written.count_rows()
    if rows == 0:
        raise NoImagesError(no_images_message(data.path or data.source, skipped))
    dim = written.schema.field("embedding").type.list_size
    store.write_json({"classes": source.classes}, *CLASSES)
    per_image = int(ray.get(flops))
    summary = f"{rows} images embedded with {emb.encoder} (dim {dim}), {len(skipped)} skipped"
    return {
        "rows": rows,
        "encoder_flops_per_image": per_image,
        "flops": per_image * rows,  # the selection's compute (the encoder's forward passes)
        "skipped": len(skipped),
        "skipped_examples": [{"id": i, "reason": r} for i, r in skipped[:20]],
        "dim": dim,
        "encoder": emb.encoder,  # the evaluate stage warns when FID uses these same weights
        "model": emb.model,
        "classes": source.classes,
        "summary": summary,
    }
