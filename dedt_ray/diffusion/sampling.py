"""Sampling core: DDPM/DDIM with class labels and classifier-free guidance (pure, no Ray)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DModel
from PIL import Image


@torch.no_grad()
def generate(
    unet: UNet2DModel,
    scheduler: DDPMScheduler | DDIMScheduler,
    labels: Sequence[int] | torch.Tensor | None,
    num_inference_steps: int,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
    vae: AutoencoderKL | None = None,
    num_samples: int | None = None,
    null_class: int | None = None,
    on_step: Callable[[], None] | None = None,
) -> np.ndarray:
    """Generate images; returns uint8 [N, H, W, C].

    `labels` (class indices) sets N for a class-conditional UNet; for an unconditional one
    pass `labels=None` and `num_samples`. With `guidance_scale != 1` the output is
    `uncond + s * (cond - uncond)`, where uncond uses `null_class` (default: the UNet's last
    class embedding). `scheduler` is modified (set_timesteps); pass a fresh one per call if
    it is shared across threads. With `vae`, the UNet's samples are latents scaled by
    `vae.config.scaling_factor` and are decoded. `on_step` is called after every denoising
    step (a progress bar).
    """
    device = unet.device
    conditional = unet.config.num_class_embeds is not None
    if conditional:
        if labels is None:
            raise ValueError("a class-conditional UNet needs labels")
        y = torch.as_tensor(labels, dtype=torch.long, device=device).reshape(-1)
        n = y.shape[0]
        null = unet.config.num_class_embeds - 1 if null_class is None else null_class
    else:
        if labels is not None and len(labels) and guidance_scale != 1.0:
            raise ValueError("guidance needs a class-conditional UNet")
        n = num_samples if num_samples is not None else (len(labels) if labels is not None else 0)
        y = None
    if n <= 0:
        raise ValueError("nothing to generate: give labels or num_samples")
    channels, size = unet.config.in_channels, unet.config.sample_size
    size = size if isinstance(size, int) else size[0]
    dtype = next(unet.parameters()).dtype
    noise_device = generator.device if generator is not None else device
    x = torch.randn((n, channels, size, size), generator=generator, device=noise_device)
    x = x.to(device=device, dtype=dtype)
    x = x * scheduler.init_noise_sigma
    scheduler.set_timesteps(num_inference_steps, device=device)
    guided = conditional and guidance_scale != 1.0
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(x, t)
        if guided:
            out = unet(
                torch.cat([model_in, model_in]),
                t,
                class_labels=torch.cat([y, torch.full_like(y, null)]),
            ).sample
            cond, uncond = out.chunk(2)
            out = uncond + guidance_scale * (cond - uncond)
        else:
            out = unet(model_in, t, class_labels=y).sample
        x = scheduler.step(out, t, x, generator=generator).prev_sample
        if on_step is not None:
            on_step()
    if vae is not None:
        x = vae.decode(x.to(vae.dtype) / vae.config.scaling_factor).sample
    return to_uint8(x)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW float -> uint8 NHWC."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def from_uint8(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> [-1, 1] float NCHW."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def image_grid(images: np.ndarray, ncols: int | None = None, scale: int = 1) -> Image.Image:
    """Tile uint8 NHWC images into one PIL image, row-major, with diffusers'
    `make_image_grid` (a short last row is filled with white); `scale` enlarges pixels."""
    from diffusers.utils import make_image_grid

    n, h, w, c = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    blank = np.full((h, w, c), 255, np.uint8)
    tiles = [*images, *([blank] * (nrows * ncols - n))]
    pil = make_image_grid(
        [Image.fromarray(t[:, :, 0] if c == 1 else t) for t in tiles], nrows, ncols
    )
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.Resampling.NEAREST)
    return pil
