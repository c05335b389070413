"""The fallback feature space: a small CNN classifier trained on the real images (pure torch).

When the Inception weights are absent, the project trains this network on the labelled real
training images and takes its penultimate activations (`feature_dim` wide, after ReLU) as
the feature space of a Frechet distance named `FD_<name>` (e.g. `FD_digits-cnn`), never
"FID". Saved as safetensors weights + a JSON config, so a rerun reuses it.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

MAX_INPUT_SIZE = 32


def _norm(channels: int) -> nn.GroupNorm:
    """GroupNorm: no running statistics, so short trainings behave the same in eval mode."""
    return nn.GroupNorm(8 if channels % 8 == 0 else 1, channels)


class SmallCNN(nn.Module):
    """uint8-derived [N, C, s, s] in [-1, 1] -> logits; `features` gives the penultimate layer.

    Images are first resized to `input_size` (antialiased bilinear), so real and generated
    images pass through the same resize.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        input_size: int,
        width: int = 32,
        feature_dim: int = 128,
    ) -> None:
        super().__init__()
        self.input_size = input_size
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1),
            _norm(w),
            nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1),
            _norm(2 * w),
            nn.ReLU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1),
            _norm(4 * w),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * w, feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            size = (self.input_size, self.input_size)
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def to_input(images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1]."""
    arr = np.ascontiguousarray(images)
    x = torch.from_numpy(arr).to(device).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def input_size_for(image_size: int) -> int:
    return min(image_size, MAX_INPUT_SIZE)


def build(config: dict[str, Any]) -> SmallCNN:
    """A SmallCNN from its JSON config."""
    return SmallCNN(
        config["in_channels"],
        config["num_classes"],
        config["input_size"],
        config.get("width", 32),
        config.get("feature_dim", 128),
    )


@torch.no_grad()
def accuracy(model: SmallCNN, images: np.ndarray, labels: np.ndarray, batch: int = 512) -> float:
    """Top-1 accuracy (eval mode)."""
    if len(labels) == 0:
        return float("nan")
    model.eval()
    device = next(model.parameters()).device
    hits = 0
    for i in range(0, len(labels), batch):
        logits = model(to_input(images[i : i + batch], device))
        hits += int((logits.argmax(1).cpu().numpy() == labels[i : i + batch]).sum())
    return hits / len(labels)


def train_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 2e-3,
    width: int = 32,
    feature_dim: int = 128,
    val_fraction: float = 0.1,
    seed: int = 0,
    device: str = "cpu",
) -> tuple[SmallCNN, dict[str, Any]]:
    """Train a SmallCNN on uint8 NHWC `images` with int `labels` in [0, num_classes).

    A seeded `val_fraction` of the rows is held out to report accuracy. Returns the model
    (eval mode, on CPU) and its JSON config (architecture + training record).
    """
    images, labels = np.asarray(images), np.asarray(labels, dtype=np.int64)
    if images.ndim != 4 or images.dtype != np.uint8 or len(images) != len(labels):
        raise ValueError(f"expected uint8 [N, H, W, C] images and N labels, got {images.shape}")
    if len(labels) < 2 or labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"the classifier feature space needs labelled images (labels in 0..{num_classes - 1}, "
            f"got {len(labels)} rows spanning {labels.min(initial=0)}..{labels.max(initial=0)})"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    n_val = int(round(val_fraction * len(labels))) if len(labels) >= 20 else 0
    val, train = order[:n_val], order[n_val:]
    config = {
        "in_channels": int(images.shape[-1]),
        "num_classes": int(num_classes),
        "input_size": input_size_for(int(images.shape[1])),
        "width": width,
        "feature_dim": feature_dim,
    }
    torch.manual_seed(seed)
    model = build(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = max(1, -(-len(train) // batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * steps_per_epoch
    )
    x_train, y_train = images[train], labels[train]
    losses = []
    for _ in range(epochs):
        model.train()
        perm = rng.permutation(len(train))
        total = 0.0
        for i in range(0, len(perm), batch_size):
            idx = perm[i : i + batch_size]
            x = to_input(x_train[idx], device)
            y = torch.from_numpy(y_train[idx]).to(device)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / max(1, len(train)))
    model = model.cpu().eval()
    config.update(
        {
            "epochs": epochs,
            "seed": seed,
            "train_images": int(len(train)),
            "val_images": int(n_val),
            "train_loss": [round(v, 5) for v in losses],
            "train_accuracy": accuracy(model, x_train, y_train),
            "val_accuracy": accuracy(model, images[val], labels[val]) if n_val else None,
        }
    )
    return model, config


def to_bytes(model: SmallCNN) -> bytes:
    """The weights as safetensors bytes."""
    return save_safetensors({k: v.contiguous() for k, v in model.state_dict().items()})


def from_bytes(weights: bytes, config: dict[str, Any]) -> SmallCNN:
    """Inverse of `to_bytes` (+ the JSON config); eval mode."""
    model = build(config)
    model.load_state_dict(load_safetensors(weights))
    return model.eval()


def config_bytes(config: dict[str, Any]) -> bytes:
    return json.dumps(config, indent=2).encode()
