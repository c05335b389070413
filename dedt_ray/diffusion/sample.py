"""`dedt-ray sample`: images from an exported model -> grid.png + samples.npz.

Labels cycle through the requested classes (grid column = class). Batch b of the labels
is generated with seed (seed, b), so the samples are the same whether they come from this
process or from Ray GPU actors (used when the cluster has two or more GPUs).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from typing import Any

import numpy as np

log = logging.getLogger("dedt_ray")


def add_sample_parser(sub: Any) -> None:
    """Register the `sample` subcommand on the CLI's subparsers."""
    p = sub.add_parser("sample", help="generate images from a trained model")
    p.add_argument("--model", help="exported model folder (default: <run-dir>/train/model)")
    p.add_argument("--run-dir", help="run directory whose train/model to use")
    p.add_argument("--config", help="config file (only to find the default run directory)")
    p.add_argument("--num", type=int, default=100, help="number of images (default 100)")
    p.add_argument("--classes", help="comma-separated class indices or names (default: all)")
    p.add_argument("--scheduler", choices=["ddpm", "ddim"], default="ddpm")
    p.add_argument("--steps", type=int, default=100, help="sampling steps (default 100)")
    p.add_argument("--guidance-scale", type=float, default=1.0, help="CFG scale (1: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--out", help="output folder (default: <model>/../samples)")


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

    with tempfile.TemporaryDirectory() as tmp:
        unet, noise_scheduler, vae, _ = load_export(_local_copy(model, tmp), device)
    out = {}
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
        )
    return out


def _local_copy(path: str, tmp: str) -> str:
    """`path` itself when local, else a copy of the folder under `tmp`."""
    if "://" not in path:
        return path
    import pyarrow.fs as pafs

    pafs.copy_files(path, tmp)
    return tmp


def _read_info(model: str) -> dict[str, Any] | None:
    """dedt_model.json of an exported model ({} if absent), None if `model` has neither unet/
    nor routing.json (a TDC routed export)."""
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(model if "://" in model else os.path.abspath(model))
    routed = fs.get_file_info(f"{path}/routing.json").type == pafs.FileType.File  # TDC
    if fs.get_file_info(f"{path}/unet").type != pafs.FileType.Directory and not routed:
        return None
    if fs.get_file_info(f"{path}/dedt_model.json").type != pafs.FileType.File:
        return {}
    with fs.open_input_file(f"{path}/dedt_model.json") as f:
        return json.loads(f.read())


def main(args: argparse.Namespace) -> int:
    from dedt_ray.cli import default_run_dir
    from dedt_ray.diffusion.sampling import image_grid
    from dedt_ray.store import RunStore

    if args.num < 1 or args.steps < 1 or args.batch_size < 1:
        print("error: --num, --steps and --batch-size must be >= 1")
        return 2
    run_dir = args.run_dir or default_run_dir(args.config)
    model = args.model or RunStore(run_dir).path("train", "model")
    info = _read_info(model)
    if info is None:
        print(f"error: {model} is not an exported model (no unet/); train first")
        return 2
    try:
        labels = sample_labels(args.num, args.classes, info)
    except ValueError as exc:
        print(f"error: {exc}")
        return 2
    images = _run(model, labels, args)
    out = args.out or os.path.join(os.path.dirname(model.rstrip("/")), "samples")
    if "://" in out:
        print("error: --out must be a local folder")
        return 2
    os.makedirs(out, exist_ok=True)
    ncols = len(set(labels)) if labels is not None and len(set(labels)) > 1 else None
    scale = max(1, 64 // images.shape[1])
    image_grid(images, ncols=ncols, scale=scale).save(os.path.join(out, "grid.png"))
    np.savez_compressed(
        os.path.join(out, "samples.npz"),
        images=images,
        labels=np.asarray(labels if labels is not None else [-1] * len(images), np.int64),
    )
    print(f"{len(images)} samples -> {out}/grid.png, {out}/samples.npz")
    return 0


def _run(model: str, labels: list[int] | None, args: argparse.Namespace) -> np.ndarray:
    """In this process, or over Ray GPU actors when the cluster has two or more GPUs."""
    import torch

    num_batches = -(-args.num // args.batch_size)
    kwargs = {
        "labels": labels,
        "num": args.num,
        "batch_size": args.batch_size,
        "scheduler": args.scheduler,
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "seed": args.seed,
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
