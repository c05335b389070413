"""The two halves of every encoder: a cheap CPU `Preprocessor` and the on-device `Encoder`."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class EncoderSpec:
    """An encoder's two halves: preprocessor(model, in_channels, image_size) and
    network(model, preprocessor, dim, seed) -> (module taking normalised NCHW float images,
    output width). `dedt_ray.registry.ENCODERS` names each spec."""

    preprocessor: Callable[[str | None, int, int], Preprocessor]
    network: Callable[[str | None, Preprocessor, int, int], tuple[nn.Module, int]]


@dataclass(frozen=True)
class Preprocessor:
    """Resize (CPU, uint8) plus the normalisation constants the encoder applies on its device.

    `resize` turns uint8 [N, H, W, in_channels] into uint8 [N, input_size, input_size, channels]:
    interpolate to `resize_to` (default `input_size`) with torch's `mode`, centre-crop to
    `input_size`, and repeat a grey channel to RGB when `channels` is 3. The encoder then feeds
    `(x / 255 - mean) / std` (or `x / 255` when `mean` is None) to its network.
    """

    in_channels: int
    input_size: int
    channels: int
    mode: str = "bicubic"
    antialias: bool = True
    resize_to: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {self.in_channels}")
        if self.channels != self.in_channels and (self.in_channels, self.channels) != (1, 3):
            raise ValueError(
                f"the encoder takes {self.channels}-channel images, the data has {self.in_channels}"
            )

    def resize(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, in_channels] -> uint8 [N, input_size, input_size, channels]."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != self.in_channels:
            raise ValueError(
                f"expected uint8 images [N, H, W, {self.in_channels}], "
                f"got {images.dtype} {list(images.shape)}"
            )
        if not len(images):
            return np.zeros((0, self.input_size, self.input_size, self.channels), np.uint8)
        x = _nchw(images)
        side = self.resize_to or self.input_size
        if tuple(x.shape[-2:]) != (side, side):
            smooth = self.mode in ("bilinear", "bicubic")
            x = F.interpolate(
                x.float(),
                size=(side, side),
                mode=self.mode,
                antialias=self.antialias and smooth,
                align_corners=False if smooth else None,
            )
            x = x.round_().clamp_(0, 255).to(torch.uint8)
        if side != self.input_size:
            top = (side - self.input_size) // 2
            x = x[..., top : top + self.input_size, top : top + self.input_size]
        x = x.expand(-1, self.channels, -1, -1)  # 1 -> 3 channels when the encoder wants RGB
        return np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy())


class Encoder:
    """A frozen network behind a `Preprocessor`: uint8 images in, float32 [N, dim] out."""

    def __init__(
        self,
        preprocessor: Preprocessor,
        network: nn.Module,
        dim: int,
        device: str = "cpu",
        autocast: str | None = None,
    ) -> None:
        if autocast is not None and autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast must be None or one of {sorted(AUTOCAST_DTYPES)}")
        self.preprocessor = preprocessor
        self.dim = dim
        self.device = torch.device(device)
        self.autocast = autocast
        self.network = (
            network.to(device=self.device, dtype=torch.float32).eval().requires_grad_(False)
        )
        p = preprocessor
        self._mean = None if p.mean is None else torch.tensor(p.mean, device=self.device)
        self._std = None if p.std is None else torch.tensor(p.std, device=self.device)

    @property
    def input_size(self) -> int:
        return self.preprocessor.input_size

    def resize(self, images: np.ndarray) -> np.ndarray:
        """See `Preprocessor.resize`."""
        return self.preprocessor.resize(images)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, input_size, input_size, channels] (from `resize`) -> float32 [N, dim]."""
        p = self.preprocessor
        images = np.asarray(images)
        expected = (p.input_size, p.input_size, p.channels)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != expected:
            raise ValueError(
                f"expected uint8 images [N, {', '.join(map(str, expected))}] (call resize first), "
                f"got {images.dtype} {list(images.shape)}"
            )
        if not len(images):
            return np.zeros((0, self.dim), dtype=np.float32)
        autocast = (
            torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES[self.autocast])
            if self.autocast
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            x = _nchw(images).to(self.device).float() / 255
            if self._mean is not None and self._std is not None:
                x = (x - self._mean[:, None, None]) / self._std[:, None, None]
            out = self.network(x).float().reshape(len(images), -1)
        if out.shape[1] != self.dim:
            raise RuntimeError(f"network gave {out.shape[1]} features, expected {self.dim}")
        return out.cpu().numpy()

    def flops_per_image(self) -> int:
        """FLOPs of encoding one image (torch FlopCounterMode over the network; the CPU resize
        and elementwise ops such as pooling are not counted)."""
        from torch.utils.flop_counter import FlopCounterMode

        p = self.preprocessor
        counter = FlopCounterMode(display=False)
        with counter:
            self(np.zeros((1, p.input_size, p.input_size, p.channels), np.uint8))
        return int(counter.get_total_flops())


def _nchw(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> NCHW tensor view; read-only arrays (Ray's zero-copy batches) are copied."""
    if not images.flags.writeable:
        images = images.copy()
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)


def area_side(dim: int, channels: int, image_size: int) -> int:
    """The largest side s <= image_size with channels * s * s <= dim (at least 1)."""
    return max(1, min(image_size, math.isqrt(dim // channels)))


def resolve_hf_model(model: str | None, name: str) -> Path:
    """A local directory, or the snapshot of a hub repo already in the Hugging Face cache.

    Never downloads: a name that is not in the cache is an error naming it.
    """
    if not model:
        raise ValueError(f"encoder {name!r} needs a model: a local path or a hub-cache name")
    path = Path(model).expanduser()
    if path.exists():
        return path
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(model, local_files_only=True))
    except (ValueError, OSError) as err:  # HFValidationError, LocalEntryNotFoundError
        raise FileNotFoundError(
            f"encoder {name!r}: model {model!r} is neither a local path nor a repo in the "
            f"Hugging Face cache ({constants.HF_HUB_CACHE}); weights are never downloaded at "
            "run time"
        ) from err
