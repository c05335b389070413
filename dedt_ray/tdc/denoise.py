"""The denoising loss restricted to a timestep range, shared by pruning and scoring."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from dedt_ray.diffusion.core import LossConfig, draw_noise
from dedt_ray.diffusion.core import denoising_loss as per_sample_loss


class Batch(NamedTuple):
    """Training images (N, C, H, W) scaled to [-1, 1], with class labels (N,) or None."""

    images: torch.Tensor
    labels: torch.Tensor | None = None

    def take(self, idx: torch.Tensor | slice) -> Batch:
        """The samples at ``idx``."""
        return Batch(self.images[idx], None if self.labels is None else self.labels[idx])


def stratified_timesteps(t_range: tuple[int, int], n: int) -> torch.Tensor:
    """``n`` timesteps spread evenly over ``[lo, hi)``: the midpoints of ``n`` equal strata
    (every timestep once when ``n >= hi - lo``), ascending."""
    lo, hi = t_range
    if hi <= lo or n < 1:
        raise ValueError(f"need a non-empty range and n >= 1, got t_range={t_range}, n={n}")
    if n >= hi - lo:
        return torch.arange(lo, hi)
    return lo + ((torch.arange(n, dtype=torch.float64) + 0.5) * (hi - lo) / n).long()


def denoising_loss(
    model: torch.nn.Module,
    scheduler: Any,
    batch: Batch,
    t_range: tuple[int, int],
    generator: torch.Generator,
    timesteps: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean denoising loss of the model's prediction, t uniform in ``[lo, hi)``.

    The draw is the trainer's (``core.draw_noise``: t, then the noise; labels as given), made
    on the CPU from ``generator``, so a seeded generator gives the same (x_t, t, noise) on any
    device; the target is the noise or, for v-prediction, the velocity (``core.denoising_loss``).
    ``timesteps`` (one per image, or one for all) replaces the drawn t.
    """
    device = next(model.parameters()).device
    draw = draw_noise(
        batch.images, None, scheduler.config.num_train_timesteps, generator,
        LossConfig(t_range=t_range),
    )  # fmt: skip
    t = draw.t
    if timesteps is not None:
        t = torch.as_tensor(timesteps, dtype=torch.long).expand(batch.images.shape[0])
    labels = None if batch.labels is None else batch.labels.to(device)
    x0, t, noise = batch.images.to(device), t.to(device), draw.noise.to(device)
    return per_sample_loss(model, scheduler, x0, labels, t, noise).mean()
