"""Sampling an exported model for `dedt-ray sample` (the command is in `dedt_ray.cli`).

Labels cycle through the requested classes (grid column = class). Batch b of the labels
is generated with seed (seed, b), so the samples are the same whether they come from this
process or from Ray GPU actors (used when the cluster has two or more GPUs).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Any

import numpy as np

log = logging.getLogger("dedt_ray")


def sample_labels(num: int, classes: str | None, info: dict[str, Any]) -> list[int] | None:
    """The label of each image: cycling through the requested classes (None: unconditional)."""
    num_classes = int(info.get("num_classes") or 0)
    if num_classes == 0:
        if classes:
            raise ValueError("--classes given but the model is unconditional")
        return None
    names = [str(c) for c in info.get("classes") or range(num_classes)]
    wanted = list(range(num_classes))
    if classes:
        wanted = []
        for item in (c.strip() for c in classes.split(",") if c.strip()):
            if item in names:
                wanted.append(names.index(item))
            elif item.lstrip("-").isdigit() and 0 <= int(item) < num_classes:
                wanted.append(int(item))
            else:
                raise ValueError(f"--classes: {item!r} is not a class (have {names})")
    return [wanted[i % len(wanted)] for i in range(num)]


def generate_batches(
    model: str,
    labels: list[int] | None,
    num: int,
    batch_ids: list[int],
    batch_size: int,
    scheduler: str,
    steps: int,
    guidance_scale: float,
    seed: int,
    device: str = "cpu",
) -> dict[int, np.ndarray]:
    """Generate the given batches of the label list: {batch id: uint8 images}."""
    import torch

    from dedt_ray.diffusion.export import load_export
    from dedt_ray.diffusion.models import sampling_scheduler
    from dedt_ray.diffusion.sampling import generate
    from dedt_ray.progress import Progress

    with tempfile.TemporaryDirectory() as tmp:
        unet, noise_scheduler, vae, _ = load_export(_local_copy(model, tmp), device)
    out = {}
    with Progress(len(batch_ids) * steps, "sample", unit="step") as progress:
        for b in batch_ids:
            lo, hi = b * batch_size, min(num, (b + 1) * batch_size)
            generator = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + b)
            out[b] = generate(
                unet,
                sampling_scheduler(noise_scheduler, scheduler),
                labels[lo:hi] if labels is not None else None,
                steps,
                guidance_scale,
                generator,
                vae=vae,
                num_samples=hi - lo,
                on_step=lambda: progress.update_to(progress.n + 1),
            )
    return out


def _local_copy(path: str, tmp: str) -> str:
    """`path` itself when local, else a copy of the folder under `tmp`."""
    if "://" not in path:
        return path
    import pyarrow.fs as pafs

    pafs.copy_files(path, tmp)
    return tmp


def read_info(model: str) -> dict[str, Any] | None:
    """dedt_model.json of an exported model ({} if absent), None if `model` has no unet/."""
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(model if "://" in model else os.path.abspath(model))
    if fs.get_file_info(f"{path}/unet").type != pafs.FileType.Directory:
        return None
    if fs.get_file_info(f"{path}/dedt_model.json").type != pafs.FileType.File:
        return {}
    with fs.open_input_file(f"{path}/dedt_model.json") as f:
        return json.loads(f.read())


def write_samples(images: np.ndarray, labels: list[int] | None, out: str) -> None:
    """`out`/grid.png (a column per class) and `out`/samples.npz (images, labels)."""
    from dedt_ray.diffusion.sampling import image_grid

    os.makedirs(out, exist_ok=True)
    ncols = len(set(labels)) if labels is not None and len(set(labels)) > 1 else None
    scale = max(1, 64 // images.shape[1])
    image_grid(images, ncols=ncols, scale=scale).save(os.path.join(out, "grid.png"))
    np.savez_compressed(
        os.path.join(out, "samples.npz"),
        images=images,
        labels=np.asarray(labels if labels is not None else [-1] * len(images), np.int64),
    )


def sample_images(
    model: str,
    labels: list[int] | None,
    num: int,
    batch_size: int,
    scheduler: str,
    steps: int,
    guidance_scale: float,
    seed: int,
) -> np.ndarray:
    """In this process, or over Ray GPU actors when the cluster has two or more GPUs."""
    import torch

    num_batches = -(-num // batch_size)
    kwargs = {
        "labels": labels,
        "num": num,
        "batch_size": batch_size,
        "scheduler": scheduler,
        "steps": steps,
        "guidance_scale": guidance_scale,
        "seed": seed,
    }
    gpus = 0
    if os.environ.get("RAY_ADDRESS") or torch.cuda.device_count() > 1:
        from dedt_ray.runtime import cluster_gpus, init_ray

        init_ray()
        gpus = int(cluster_gpus())
    if gpus >= 2 and num_batches > 1:
        import ray

        task = ray.remote(num_gpus=1)(generate_batches)
        shards = [list(range(num_batches))[i::gpus] for i in range(min(gpus, num_batches))]
        parts: dict[int, np.ndarray] = {}
        for part in ray.get(
            [task.remote(model, batch_ids=s, device="cuda", **kwargs) for s in shards]
        ):
            parts.update(part)
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        parts = generate_batches(model, batch_ids=list(range(num_batches)), device=device, **kwargs)
    return np.concatenate([parts[b] for b in range(num_batches)])
