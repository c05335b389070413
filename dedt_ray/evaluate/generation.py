"""Generating the evaluation samples in shares (pure torch; the stage runs shares on actors).

The label list (each class `samples_per_class` times, or N unlabelled samples) is cut into
shares of `share_size`; share i has its own seed from (seed, i), so the samples do not
depend on how many actors run the shares or in what order.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dedt_ray.evaluate.features import FeatureExtractor, FeatureSpace
from dedt_ray.runtime import use_actor_threads

UNCONDITIONAL_GRID_ROWS = 10


@dataclass(frozen=True)
class Share:
    """One unit of sampling work: `count` images (with `labels` when conditional)."""

    index: int
    count: int
    seed: int
    labels: tuple[int, ...] | None = None
    grid: tuple[int, ...] = ()  # positions in this share that go into samples.png


def share_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0] >> 1)


def plan_shares(
    classes: list[int] | None,
    per_class: int,
    total: int | None,
    share_size: int,
    seed: int,
    grid_columns: int,
) -> list[Share]:
    """Cut the sampling work into shares.

    Conditional (`classes` given): every class `per_class` times, class by class; the first
    `grid_columns` of each class go to the grid (one row per class). Unconditional
    (`classes` None): `total` samples, the first `grid_columns` x 10 to the grid.
    """
    if share_size < 1:
        raise ValueError(f"share_size must be >= 1, got {share_size}")
    if classes is not None:
        if not classes:
            raise ValueError("a class-conditional model needs at least one class")
        labels = np.repeat(np.asarray(classes, dtype=np.int64), per_class)
        in_grid = np.tile(np.arange(per_class), len(classes)) < grid_columns
    else:
        if total is None or total < 1:
            raise ValueError("unconditional sampling needs a positive number of samples")
        labels = None
        in_grid = np.arange(total) < grid_columns * UNCONDITIONAL_GRID_ROWS
    n = len(in_grid)
    shares = []
    for index, start in enumerate(range(0, n, share_size)):
        stop = min(n, start + share_size)
        shares.append(
            Share(
                index=index,
                count=stop - start,
                seed=share_seed(seed, index),
                labels=None if labels is None else tuple(labels[start:stop].tolist()),
                grid=tuple(np.flatnonzero(in_grid[start:stop]).tolist()),
            )
        )
    return shares


def local_model_dir(uri: str) -> str:
    """A local folder holding the exported model: the path itself, or a temp copy of a URI."""
    if "://" not in uri:
        return uri
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(uri)
    dest = tempfile.mkdtemp(prefix="dedt-model-")
    pafs.copy_files(path, dest, source_filesystem=fs)
    return dest


class ShareSampler:
    """The exported model + the feature networks on one device; runs shares.

    `space` is one feature space or a sequence of them (the headline space first). On CPU,
    torch runs `threads` threads, else this node's cores / `actors` (`actor_threads`); with
    neither (in-process use) torch's setting is left as it is."""

    def __init__(
        self,
        model_uri: str,
        scheduler: str,
        num_inference_steps: int,
        guidance_scale: float,
        space: FeatureSpace | Sequence[FeatureSpace],
        device: str = "cpu",
        feature_batch: int = 64,
        threads: int | None = None,
        actors: int | None = None,
    ) -> None:
        from dedt_ray.diffusion.export import load_export
        from dedt_ray.diffusion.models import sampling_scheduler

        self.device = torch.device(device)
        if self.device.type == "cpu" and (threads or actors):  # else: as torch is set
            use_actor_threads(threads, actors or 1)
        self.unet, noise_scheduler, self.vae, self.info = load_export(
            local_model_dir(model_uri), device=device
        )
        self.scheduler = sampling_scheduler(noise_scheduler, scheduler)
        self.steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.null_class = self.info.get("null_class")
        self.conditional = self.unet.config.num_class_embeds is not None
        spaces = [space] if isinstance(space, FeatureSpace) else list(space)
        self.extractors = [FeatureExtractor(s, device, feature_batch) for s in spaces]

    def generate(self, share: Share) -> np.ndarray:
        """uint8 NHWC images of one share (deterministic given the share's seed)."""
        from dedt_ray.diffusion.sampling import generate

        generator = torch.Generator(device=self.device).manual_seed(share.seed)
        return generate(
            self.unet,
            self.scheduler,
            labels=list(share.labels) if self.conditional else None,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance_scale if self.conditional else 1.0,
            generator=generator,
            vae=self.vae,
            num_samples=share.count,
            null_class=self.null_class,
        )

    def run(self, share: Share) -> dict[str, Any]:
        """Generate, featurise; returns features (of the first space; `all_features`: one
        array per space), labels (-1 unconditional), reservoir keys, the grid images and the
        torch threads it ran with."""
        images = self.generate(share)
        features = [extract(images) for extract in self.extractors]
        labels = (
            np.asarray(share.labels, dtype=np.int64)
            if share.labels is not None
            else np.full(share.count, -1, np.int64)
        )
        grid = np.asarray(share.grid, dtype=np.int64)
        return {
            "index": share.index,
            "features": features[0],
            "all_features": features,
            "labels": labels,
            "keys": np.random.default_rng([share.seed, 1]).random(share.count),
            "grid_images": images[grid],
            "grid_labels": labels[grid],
            "grid_positions": grid,
            "threads": torch.get_num_threads(),
        }

    def flops_per_image(self) -> int:
        """FLOPs of generating one image (every denoising step, guidance, VAE decode), counted
        by torch's FlopCounterMode; the feature network is not included."""
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        share = Share(0, 1, 0, (0,) if self.conditional else None)
        with counter:
            self.generate(share)
        return int(counter.get_total_flops())


def samples_grid(
    images: np.ndarray, labels: np.ndarray, columns: int, rows: list[int] | None
) -> np.ndarray:
    """[rows * columns, H, W, C] uint8 laid out one row per label in `rows` (white where a
    class has fewer images); `rows=None` fills rows in order (unconditional)."""
    images = np.asarray(images)
    h, w, c = images.shape[1:]
    if rows is None:
        n_rows = max(1, -(-len(images) // columns))
        out = np.full((n_rows * columns, h, w, c), 255, np.uint8)
        out[: len(images)] = images
        return out
    out = np.full((len(rows) * columns, h, w, c), 255, np.uint8)
    for r, label in enumerate(rows):
        picked = images[np.asarray(labels) == label][:columns]
        out[r * columns : r * columns + len(picked)] = picked
    return out
