"""diffusers `AutoencoderKL`: the flattened latent mean, as a latent diffusion model sees it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from dedt_ray.encoders.base import EncoderSpec, Preprocessor, resolve_hf_model
from dedt_ray.encoders.hf import load_pretrained


def _vae_path(model: str | None) -> Path:
    """The VAE's folder; a whole pipeline folder (with vae/config.json) is accepted too."""
    path = resolve_hf_model(model, "vae")
    if not (path / "config.json").exists() and (path / "vae" / "config.json").exists():
        return path / "vae"
    return path


def _layout(config: dict[str, Any], image_size: int) -> tuple[int, int]:
    """(input side, latent side): the image size rounded up to a multiple of the VAE's
    downsampling factor 2 ** (len(block_out_channels) - 1)."""
    factor = 2 ** (len(config["block_out_channels"]) - 1)
    latent = math.ceil(image_size / factor)
    return latent * factor, latent


def preprocessor(model: str | None, in_channels: int, image_size: int) -> Preprocessor:
    """Reads the VAE's config.json only; inputs go to [-1, 1]."""
    from diffusers import AutoencoderKL

    config = AutoencoderKL.load_config(_vae_path(model))
    side, _ = _layout(config, image_size)
    channels = config.get("in_channels", 3)
    return Preprocessor(in_channels, side, channels, mean=(0.5,) * channels, std=(0.5,) * channels)


class LatentMean(nn.Module):
    """x in [-1, 1] -> (latent_dist.mean - shift_factor) * scaling_factor, flattened."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae
        self.shift = getattr(vae.config, "shift_factor", None) or 0.0
        self.scale = vae.config.scaling_factor

    def forward(self, x: Tensor) -> Tensor:
        mean = self.vae.encode(x).latent_dist.mean
        return ((mean - self.shift) * self.scale).flatten(1)


def network(model: str | None, pre: Preprocessor, dim: int, seed: int) -> tuple[nn.Module, int]:
    """The encoder half only (the decoder is dropped); width latent_channels * h * w."""
    from diffusers import AutoencoderKL

    vae = load_pretrained(AutoencoderKL, _vae_path(model))
    vae.decoder = None  # unused: frees its memory
    _, latent = _layout(vae.config, pre.input_size)
    return LatentMean(vae), vae.config.latent_channels * latent * latent


VAE = EncoderSpec(preprocessor, network)
