"""Weight-free encoders: raw pixels and a seeded Gaussian random projection of them."""

from __future__ import annotations

import math

import torch
from torch import nn

from dedt_ray.encoders.base import EncoderSpec, Preprocessor, area_side

# random_projection first area-pools images larger than this, so its matrix stays small
# (at most 3 * 64 * 64 rows).
MAX_PROJECTION_SIDE = 64


def preprocessor(model: str | None, in_channels: int, image_size: int) -> Preprocessor:
    """Native size and channels; both encoders pool on their device, so `dim` is not needed here."""
    return Preprocessor(in_channels, image_size, in_channels, mode="area")


def pixels(model: str | None, pre: Preprocessor, dim: int, seed: int) -> tuple[nn.Module, int]:
    """Pixels in [0, 1], area-pooled to the largest side s with C * s * s <= dim, flattened.

    The width is C * s * s, which can be below `dim` (and is C when dim < C).
    """
    side = area_side(dim, pre.channels, pre.input_size)
    return nn.Sequential(nn.AdaptiveAvgPool2d(side), nn.Flatten()), pre.channels * side * side


class RandomProjection(nn.Module):
    """x in [0, 1] -> area-pool to `side` -> flatten -> x @ R, R ~ N(0, 1/dim) entrywise (JL).

    R is drawn from a CPU generator seeded with `seed`, so it is the same on every device.
    """

    def __init__(self, channels: int, side: int, dim: int, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        matrix = torch.randn(channels * side * side, dim, generator=gen) / math.sqrt(dim)
        self.pool = nn.AdaptiveAvgPool2d(side)
        self.register_buffer("matrix", matrix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x).flatten(1) @ self.matrix


def random_projection(
    model: str | None, pre: Preprocessor, dim: int, seed: int
) -> tuple[nn.Module, int]:
    side = min(pre.input_size, MAX_PROJECTION_SIDE)
    return RandomProjection(pre.channels, side, dim, seed), dim


PIXELS = EncoderSpec(preprocessor, pixels)
RANDOM_PROJECTION = EncoderSpec(preprocessor, random_projection)
