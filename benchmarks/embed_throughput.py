"""Embedding throughput: the Ray Data stage versus a plain single-process DataLoader loop.

Both paths use the same encoder (a small ViT built from a config, random weights), the same
images and batch size; measured in one run, so the printed ratio is what matters.
Then peak memory of the streaming stage at two dataset sizes (generated images, cheap
encoder): it must not grow with the dataset.

    python benchmarks/embed_throughput.py                  # defaults: a few minutes on 2 CPUs
    python benchmarks/embed_throughput.py --images 4096 --sizes 20000 100000
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import ray
import ray.data
import torch
from peak_memory import PeakMemory
from transformers import ViTConfig, ViTModel

from dedt_ray.config import EmbedConfig
from dedt_ray.embed import embed_dataset
from dedt_ray.encoders import build_encoder


def tiny_vit(path: str, image_size: int) -> None:
    cfg = ViTConfig(
        image_size=image_size,
        patch_size=8,
        num_channels=3,
        hidden_size=192,
        num_hidden_layers=6,
        num_attention_heads=3,
        intermediate_size=768,
    )
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(path)


def images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def plain_loop(data: np.ndarray, model: str, batch: int, size: int) -> float:
    """Images/s of a single-process DataLoader + the same encoder."""
    enc = build_encoder("vit", model, 64, 3, size)
    loader = torch.utils.data.DataLoader(data, batch_size=batch, num_workers=0)
    start = time.perf_counter()
    for x in loader:
        enc(enc.resize(x.numpy()))
    return len(data) / (time.perf_counter() - start)


def ray_stage(data: np.ndarray, model: str, batch: int, size: int) -> tuple[float, float]:
    """(end-to-end images/s, steady-state images/s) of the embed stage's Ray Data pipeline.

    End to end includes starting the encoder actor (a Python process that imports torch and
    builds the model): a fixed cost that a real dataset amortises. Steady state counts the
    images after the first output batch over the time after it.
    """
    emb = EmbedConfig(encoder="vit", model=model, batch_size=batch, actors=1)
    items = [{"id": str(i), "label": 0, "image": img} for i, img in enumerate(data)]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(data) // batch))
    start = time.perf_counter()
    first, rows = None, 0
    for out in embed_dataset(ds, emb, 3, size).iter_batches(batch_size=None):
        if first is None:
            first, first_rows = time.perf_counter(), len(out["id"])
        rows += len(out["id"])
    end = time.perf_counter()
    assert rows == len(data), f"embedded {rows} of {len(data)} images"
    return len(data) / (end - start), (rows - first_rows) / (end - first)


def _generate(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    ids = batch["id"]
    rng = np.random.default_rng(int(ids[0]))
    return {
        "id": ids.astype(str),
        "label": ids % 10,
        "image": rng.integers(0, 256, (len(ids), size, size, 3), dtype=np.uint8),
    }


def peak_memory(n: int, size: int) -> tuple[float, float]:
    """(seconds, peak memory of all Ray processes above the start, GiB) embedding n images."""
    ds = ray.data.range(n, override_num_blocks=max(4, n // 1000))
    ds = ds.map_batches(_generate, fn_kwargs={"size": size}, batch_size=1000)
    emb = EmbedConfig(encoder="random_projection", dim=128, batch_size=500)
    start = time.perf_counter()
    with PeakMemory() as mem, tempfile.TemporaryDirectory() as out:
        embed_dataset(ds, emb, 3, size).write_parquet(out)
    seconds = time.perf_counter() - start
    return seconds, (mem.peak - mem.base) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--sizes", type=int, nargs=2, default=[20_000, 100_000])
    parser.add_argument("--memory-image-size", type=int, default=64)
    args = parser.parse_args()

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    data = images(args.images, args.image_size)
    with tempfile.TemporaryDirectory() as model:
        tiny_vit(model, args.image_size)
        plain = plain_loop(data, model, args.batch, args.image_size)
        staged, steady = ray_stage(data, model, args.batch, args.image_size)
    print(
        f"encoder: ViT (6 layers, width 192) at {args.image_size} px, batch {args.batch}, "
        f"{args.images} images, {int(ray.cluster_resources()['CPU'])} CPUs"
    )
    print(f"plain DataLoader loop           : {plain:8.1f} images/s")
    print(f"Ray Data embed, end to end      : {staged:8.1f} images/s  (incl. actor start)")
    print(f"Ray Data embed, steady state    : {steady:8.1f} images/s")
    print(f"ratio end to end (Ray / plain)  : {staged / plain:8.2f}")
    print(f"ratio steady state (Ray / plain): {steady / plain:8.2f}   (goal >= 0.9)")

    print("\nstreaming memory (random_projection, generated images):")
    results = [peak_memory(n, args.memory_image_size) for n in args.sizes]
    raw = [n * args.memory_image_size**2 * 3 / 2**30 for n in args.sizes]
    for n, (sec, gib), r in zip(args.sizes, results, raw, strict=True):
        print(f"  {n:>7} images ({r:.2f} GiB of pixels): peak +{gib:.2f} GiB, {n / sec:.0f} img/s")
    print(
        f"  peak ratio {args.sizes[1]}/{args.sizes[0]}: {results[1][1] / results[0][1]:.2f} "
        f"(dataset ratio {args.sizes[1] / args.sizes[0]:.1f}; ~1 means streaming)"
    )


if __name__ == "__main__":
    main()
