"""Feature spaces for the distances: Inception-v3 pool3 (FID), a fallback classifier, or a
transformers image tower from local weights (CLIP, DINOv2, ViT: `evaluate.extra_spaces`).

A `FeatureSpace` is plain data (picklable, sent to Ray actors); `FeatureExtractor` builds
the network on a device and maps uint8 NHWC images, conformed to the real images' size and
channels, to float32 features. Metric names carry the space: "FID" / "KID" only for
Inception, "FD_<name>" / "KD_<name>" for anything else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

INCEPTION = "inception"
HF_KINDS = ("clip", "dinov2", "vit")  # transformers towers (dedt_ray.encoders.hf)


@dataclass(frozen=True)
class FeatureSpace:
    """Which network maps images to features, and how its metrics are named.

    `kind="inception"`: `weights` is pytorch-fid's weights file (a path or a torch hub cache
    name). `kind="classifier"`: `classifier` holds (safetensors bytes, JSON config).
    `kind` in HF_KINDS: `weights` is the model folder or hub-cache name.
    `in_channels` / `image_size` are the real images' format; generated ones are conformed.
    """

    kind: Literal["inception", "classifier", "clip", "dinov2", "vit"]
    name: str
    in_channels: int
    image_size: int
    weights: str | None = None
    classifier: tuple[bytes, dict[str, Any]] | None = field(default=None, repr=False)

    @property
    def metric(self) -> str:
        """The Frechet distance's name: "FID" for Inception-v3 pool3, "FD_<name>" otherwise."""
        return metric_name(self.kind, self.name)

    @property
    def kernel(self) -> str:
        """The kernel distance's name: "KID" for Inception-v3 pool3, "KD_<name>" otherwise."""
        return kernel_name(self.kind, self.name)

    def describe(self) -> dict[str, Any]:
        """JSON-able summary for metrics.json."""
        out: dict[str, Any] = {"kind": self.kind, "name": self.name, "metric": self.metric,
                               "kernel_metric": self.kernel}  # fmt: skip
        if self.kind == INCEPTION or self.kind in HF_KINDS:
            out["weights"] = self.weights
        elif self.classifier is not None:
            cfg = self.classifier[1]
            keys = ("key", "feature_dim", "input_size", "epochs", "train_images", "val_images")
            out.update({k: cfg.get(k) for k in keys})
            out["val_accuracy"] = cfg.get("val_accuracy")
            out["train_accuracy"] = cfg.get("train_accuracy")
        return out


def metric_name(kind: str, name: str) -> str:
    return "FID" if kind == INCEPTION else f"FD_{name}"


def kernel_name(kind: str, name: str) -> str:
    return "KID" if kind == INCEPTION else f"KD_{name}"


def classifier_name(source: str, path: str | None) -> str:
    """`<dataset>-cnn`: the source for built-in datasets, else the data path's last part."""
    base = source
    if source in ("image_folder", "parquet") and path:
        parts = [p for p in re.split(r"[/\\]", path.rstrip("/\\")) if p]
        base = parts[-1] if parts else source
        base = re.sub(r"\.parquet$", "", base)
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-").lower() or "data"
    return f"{base}-cnn"


def conform_images(images: np.ndarray, size: int, channels: int) -> np.ndarray:
    """uint8 NHWC -> uint8 [N, size, size, channels]: luma (PIL's "L" weights) or grey
    repeated to RGB, then an antialiased bicubic resize when the size differs."""
    x = np.asarray(images)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"expected uint8 [N, H, W, 1|3] images, got {x.dtype} {x.shape}")
    if x.shape[-1] == 3 and channels == 1:
        luma = x.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        x = np.clip(np.round(luma), 0, 255).astype(np.uint8)[..., None]
    elif x.shape[-1] == 1 and channels == 3:
        x = np.repeat(x, 3, axis=-1)
    if x.shape[1] != size or x.shape[2] != size:
        t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float()
        t = F.interpolate(t, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        x = t.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return np.ascontiguousarray(x)


class FeatureExtractor:
    """A `FeatureSpace` built on a device: uint8 NHWC images -> float32 [N, dim]."""

    def __init__(self, space: FeatureSpace, device: str = "cpu", batch_size: int = 64) -> None:
        self.space = space
        self.device = torch.device(device)
        self.batch_size = batch_size
        self._net = self._encoder = None
        if space.kind == INCEPTION:
            from dedt_ray.encoders.inception import FEATURES, load_network

            self._net = load_network(space.weights).to(self.device).eval()
            self.dim = FEATURES
        elif space.kind in HF_KINDS:
            from dedt_ray.encoders import build_encoder

            self._encoder = build_encoder(
                space.kind, space.weights, 1, space.in_channels, space.image_size, device=device
            )
            self.dim = self._encoder.dim
        elif space.kind == "classifier":
            from dedt_ray.evaluate.classifier import from_bytes

            if space.classifier is None:
                raise ValueError("a classifier feature space needs its weights and config")
            weights, config = space.classifier
            self._net = from_bytes(weights, config).to(self.device)
            self.dim = int(config["feature_dim"])
        else:
            raise ValueError(f"unknown feature space kind {space.kind!r}")

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Conform to the real images' size and channels, then `encode`."""
        return self.encode(conform_images(images, self.space.image_size, self.space.in_channels))

    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, C] as they are (C the space's channels) -> float32 [N, dim]."""
        out = [np.zeros((0, self.dim), np.float32)]
        for i in range(0, len(images), self.batch_size):
            out.append(self._batch(images[i : i + self.batch_size]))
        return np.concatenate(out)

    @torch.no_grad()
    def _batch(self, images: np.ndarray) -> np.ndarray:
        if self._encoder is not None:
            return self._encoder(self._encoder.resize(images))
        if self.space.kind == INCEPTION:  # pytorch-fid's float resize, grey repeated to RGB
            from dedt_ray.encoders.inception import fid_input

            images = np.ascontiguousarray(images)
            if not images.flags.writeable:  # Ray's zero-copy batches
                images = images.copy()
            x = torch.from_numpy(images).permute(0, 3, 1, 2).to(self.device)
            x = x.expand(-1, 3, -1, -1)
            return self._net(fid_input(x)).float().cpu().numpy()
        from dedt_ray.evaluate.classifier import to_input

        return self._net.features(to_input(images, self.device)).float().cpu().numpy()
