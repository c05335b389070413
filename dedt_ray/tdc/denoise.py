"""The denoising loss restricted to a timestep range, shared by pruning and scoring."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F


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
    """Mean squared error of the model's prediction, t uniform in ``[lo, hi)``.

    The target is the noise (``epsilon``) or, for ``prediction_type="v_prediction"``, the
    velocity. Noise and timesteps are drawn on the CPU from ``generator``, so a seeded generator
    gives the same (x_t, t, noise) on any device. ``timesteps`` (one per image, or one for
    all) replaces the random draw of t.
    """
    lo, hi = t_range
    x0 = batch.images
    device = next(model.parameters()).device
    noise = torch.randn(x0.shape, generator=generator).to(device)
    if timesteps is None:
        t = torch.randint(lo, hi, (x0.shape[0],), generator=generator)
    else:
        t = torch.as_tensor(timesteps, dtype=torch.long).expand(x0.shape[0])
    t = t.to(device)
    x0 = x0.to(device)
    x_t = scheduler.add_noise(x0, noise, t)
    if getattr(scheduler.config, "prediction_type", "epsilon") == "v_prediction":
        target = scheduler.get_velocity(x0, noise, t)
    else:
        target = noise
    labels = None if batch.labels is None else batch.labels.to(device)
    pred = model(x_t, t, class_labels=labels).sample
    return F.mse_loss(pred, target)
