"""Inception-v3 pool3 features (2048-d), the network pytorch-fid uses for FID.

Why this file defines the network instead of importing it: pytorch-fid, torch-fidelity and
timm all build on torchvision, and torchvision's PyPI wheels are CUDA builds whose C ops fail
to import beside the CPU build of torch ("operator torchvision::nms does not exist"); the
matching CPU wheels live outside PyPI. So this is a faithful copy of torchvision's Inception3
as pytorch-fid patches it (FIDInceptionA/C/E_1/E_2: TensorFlow's average pooling that ignores
padding, and max pooling in the last block). Module names and shapes equal the state_dict of
pytorch-fid's weights file `pt_inception-2015-12-05-6726825d.pth` (1008-way `fc` included,
unused), so that file loads strictly. Input: RGB in [-1, 1] at 299 x 299. FID (the evaluate
stage, `dedt-ray fid`) prepares it exactly as pytorch-fid does (`fid_input`: a float bilinear
resize, no rounding); the selection encoder (`embed.encoder=inception`) resizes to uint8 in a
CPU task first, like every encoder, and so differs by that rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dedt_ray.encoders.base import EncoderSpec, Preprocessor

INPUT_SIZE = 299
FEATURES = 2048
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"

Pool = Callable[[Tensor], Tensor]


def tf_avg_pool(x: Tensor) -> Tensor:
    """3x3 stride-1 average pool that, like TensorFlow's, leaves the zero padding out."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def max_pool(x: Tensor) -> Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **kwargs: Any) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


class InceptionA(nn.Module):
    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(tf_avg_pool(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7dbl = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4):
            b7dbl = layer(b7dbl)
        b7dbl = self.branch7x7dbl_5(b7dbl)
        return torch.cat([self.branch1x1(x), b7, b7dbl, self.branch_pool(tf_avg_pool(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """pytorch-fid's FIDInceptionE_1 (pool=tf_avg_pool) or FIDInceptionE_2 (pool=max_pool)."""

    def __init__(self, in_channels: int, pool: Pool) -> None:
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_1(x)
        b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(b3),
                self.branch3x3_2b(b3),
                self.branch3x3dbl_3a(b3dbl),
                self.branch3x3dbl_3b(b3dbl),
                self.branch_pool(self.pool(x)),
            ],
            1,
        )


class FIDInceptionV3(nn.Module):
    """RGB in [-1, 1], [N, 3, 299, 299] -> pool3 features [N, 2048]."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool=tf_avg_pool)
        self.Mixed_7c = InceptionE(2048, pool=max_pool)
        self.fc = nn.Linear(FEATURES, 1008)  # in the weights file; not used for features

    def forward(self, x: Tensor) -> Tensor:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def weights_path(model: str | None) -> Path:
    """A file path, or a file name in the torch hub cache (where pytorch-fid downloads to)."""
    if not model:
        raise ValueError(
            f"encoder 'inception' needs a model: the path of pytorch-fid's {WEIGHTS_FILE} "
            "(or a .safetensors copy)"
        )
    path = Path(model).expanduser()
    cached = Path(torch.hub.get_dir()) / "checkpoints" / model
    for candidate in (path, cached):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"encoder 'inception': weights file {model!r} not found (neither that path nor "
        f"{cached}); weights are never downloaded at run time"
    )


def load_state_dict(path: Path) -> dict[str, Tensor]:
    """Tensors only: safetensors, or `torch.load(weights_only=True)` (never arbitrary pickles)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def fid_input(images: Tensor) -> Tensor:
    """pytorch-fid's preprocessing of uint8 RGB [N, 3, H, W]: [0, 1] floats (as torchvision's
    ToTensor), a bilinear resize to 299 x 299 in floating point (`F.interpolate`,
    align_corners=False, no antialias, no rounding to uint8), then `2 x - 1`."""
    x = images.float().div(255)
    x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    return 2 * x - 1


def preprocessor(model: str | None, in_channels: int, image_size: int) -> Preprocessor:
    """299 x 299 RGB by bilinear resize without antialias, then 2x - 1; needs no weights."""
    return Preprocessor(
        in_channels,
        INPUT_SIZE,
        3,
        mode="bilinear",
        antialias=False,
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
    )


def load_network(model: str | None) -> FIDInceptionV3:
    """FIDInceptionV3 with the weights file (path or hub-cache name) loaded strictly."""
    path = weights_path(model)
    with torch.device("meta"):  # no random init: every tensor comes from the file
        net = FIDInceptionV3()
    try:
        net.load_state_dict(load_state_dict(path), assign=True)
    except RuntimeError as err:
        raise ValueError(f"{path} is not a pytorch-fid Inception-v3 state_dict: {err}") from err
    return net


def network(model: str | None, pre: Preprocessor, dim: int, seed: int) -> tuple[nn.Module, int]:
    """The encoder registry's entry: `load_network` and its width."""
    return load_network(model), FEATURES


INCEPTION = EncoderSpec(preprocessor, network)
