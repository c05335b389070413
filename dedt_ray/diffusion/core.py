"""The training step, on one screen (pure torch + diffusers, no Ray).

Reusable pieces for other trainers: `draw_noise` (t, optionally inside [t_lo, t_hi) for TDC
group fine-tunes, noise and label dropout: the one draw every loss shares), `denoising_loss`
(per-sample losses, e.g. proxy vs reference on the same (x_t, t, noise) for DRO),
`timestep_weights` (Min-SNR-gamma), and `train_step`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.optimization import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
)
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class LossConfig:
    """What the loss depends on besides model and data."""

    label_dropout: float = 0.0
    null_class: int | None = None  # label index for "no class"; None: unconditional
    min_snr_gamma: float | None = None
    t_range: tuple[int, int] | None = None  # train only on timesteps in [t_lo, t_hi)


def sample_timesteps(
    n: int,
    num_train_timesteps: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    t_range: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Uniform integer timesteps in [0, T) or in `t_range` = [t_lo, t_hi)."""
    lo, hi = t_range if t_range is not None else (0, num_train_timesteps)
    if not 0 <= lo < hi <= num_train_timesteps:
        raise ValueError(
            f"t_range {t_range} must satisfy 0 <= t_lo < t_hi <= {num_train_timesteps}"
        )
    return torch.randint(lo, hi, (n,), generator=generator, device=device, dtype=torch.long)


def snr(scheduler: DDPMScheduler, t: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio abar_t / (1 - abar_t) at integer timesteps `t`."""
    abar = scheduler.alphas_cumprod.to(t.device)[t].float()
    return abar / (1.0 - abar)


def min_snr_weight(snr_t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) for epsilon or v prediction targets."""
    clipped = torch.clamp(snr_t, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr_t
    if prediction_type == "v_prediction":
        return clipped / (snr_t + 1.0)
    raise ValueError(f"min-SNR weighting is not defined for prediction_type={prediction_type!r}")


def drop_labels(
    labels: torch.Tensor, p: float, null_class: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Replace each label by `null_class` with probability `p` (classifier-free guidance)."""
    if p <= 0:
        return labels
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, null_class), labels)


def denoising_loss(
    model: nn.Module,
    scheduler: DDPMScheduler,
    x0: torch.Tensor,
    labels: torch.Tensor | None,
    t: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """Per-sample MSE [B] between the model output at (x_t, t) and the scheduler's target."""
    x_t = scheduler.add_noise(x0, noise, t)
    pred = model(x_t, t, class_labels=labels).sample
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(x0, noise, t)
    else:
        raise ValueError(f"unsupported prediction_type {kind!r}")
    return F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)


class NoiseDraw(NamedTuple):
    """One micro-batch's random draw: timesteps, noise and the labels the model sees."""

    t: torch.Tensor
    noise: torch.Tensor
    cond: torch.Tensor | None  # labels after label dropout; None for unconditional models


def draw_noise(
    x0: torch.Tensor,
    labels: torch.Tensor | None,
    num_train_timesteps: int,
    generator: torch.Generator | None,
    cfg: LossConfig,
) -> NoiseDraw:
    """Draw t (in `cfg.t_range`), the noise, then drop labels, in that order, from `generator`.

    The one draw every loss shares (the core loss, the DRO proxy loss, TDC's denoising score),
    so the same generator state gives the same (x_t, t, noise) to all of them."""
    n = x0.shape[0]
    t = sample_timesteps(n, num_train_timesteps, generator, x0.device, cfg.t_range)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    cond = None
    if labels is not None and cfg.null_class is not None:
        cond = drop_labels(labels, cfg.label_dropout, cfg.null_class, generator)
    return NoiseDraw(t, noise, cond)


def timestep_weights(
    scheduler: DDPMScheduler, t: torch.Tensor, min_snr_gamma: float | None
) -> torch.Tensor | None:
    """Per-sample loss weights of the timesteps: Min-SNR-gamma, or None (uniform)."""
    if min_snr_gamma is None:
        return None
    return min_snr_weight(snr(scheduler, t), min_snr_gamma, scheduler.config.prediction_type)


def zero_prediction_loss(
    scheduler: DDPMScheduler, min_snr_gamma: float | None = None, x0_second_moment: float = 1.0
) -> float:
    """Per-element loss of a model that predicts 0, averaged over uniform t (the diffusion
    analogue of a uniform predictor's loss): E[eps^2] = 1 for epsilon prediction,
    E[v^2] = abar_t + (1 - abar_t) E[x0^2] for v-prediction; Min-SNR weights when given."""
    t = torch.arange(scheduler.config.num_train_timesteps)
    if scheduler.config.prediction_type == "epsilon":
        target = torch.ones(len(t), dtype=torch.float64)
    elif scheduler.config.prediction_type == "v_prediction":
        abar = scheduler.alphas_cumprod.double()[t]
        target = abar + (1.0 - abar) * x0_second_moment
    else:
        raise ValueError(f"unsupported prediction_type {scheduler.config.prediction_type!r}")
    w_t = timestep_weights(scheduler, t, min_snr_gamma)
    return float((target if w_t is None else target * w_t.double()).mean())


def training_losses(
    model: nn.Module,
    scheduler: DDPMScheduler,
    x0: torch.Tensor,
    labels: torch.Tensor | None,
    generator: torch.Generator | None,
    cfg: LossConfig,
) -> torch.Tensor:
    """Per-sample losses [B] of one micro-batch: draw t and noise, drop labels, Min-SNR."""
    draw = draw_noise(x0, labels, scheduler.config.num_train_timesteps, generator, cfg)
    per_sample = denoising_loss(model, scheduler, x0, draw.cond, draw.t, draw.noise)
    w_t = timestep_weights(scheduler, draw.t, cfg.min_snr_gamma)
    return per_sample if w_t is None else per_sample * w_t


def training_loss(
    model: nn.Module,
    scheduler: DDPMScheduler,
    x0: torch.Tensor,
    labels: torch.Tensor | None,
    sample_weights: torch.Tensor | None,
    generator: torch.Generator | None,
    cfg: LossConfig,
) -> torch.Tensor:
    """Scalar loss of one micro-batch: `training_losses`, times the sample weights, averaged."""
    per_sample = training_losses(model, scheduler, x0, labels, generator, cfg)
    if sample_weights is not None:
        per_sample = per_sample * sample_weights
    return per_sample.mean()


@dataclass
class Precision:
    """Autocast + (for fp16) gradient scaling; a no-op on CPU or with mode "no"."""

    mode: str = "no"
    device_type: str = "cpu"

    def __post_init__(self) -> None:
        self.enabled = self.mode != "no" and self.device_type == "cuda"
        self.dtype = torch.bfloat16 if self.mode == "bf16" else torch.float16
        use_scaler = self.enabled and self.mode == "fp16"
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)


def build_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, kind: str, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then cosine decay to 0 at `total_steps` or constant."""
    if kind == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    if kind == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup_steps)
    raise ValueError(f"lr schedule must be 'cosine' or 'constant', got {kind!r}")


MicroBatch = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]  # x0, labels, weights


def train_step(
    model: nn.Module,
    scheduler: DDPMScheduler,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    micro_batches: Sequence[MicroBatch],
    generator: torch.Generator | None,
    loss_cfg: LossConfig,
    grad_clip: float | None = None,
    precision: Precision | None = None,
    loss_fn: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """One optimizer step over `micro_batches` (gradient accumulation; DDP syncs on the last).

    `loss_fn` replaces `training_loss` (same signature), e.g. the DRO proxy loss.
    Returns the mean loss as a detached 0-d tensor (no host sync).
    """
    loss_fn = loss_fn or training_loss
    precision = precision or Precision()
    scaler = precision.scaler
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=micro_batches[0][0].device)
    last = len(micro_batches) - 1
    for i, (x0, labels, weights) in enumerate(micro_batches):
        no_sync = isinstance(model, DistributedDataParallel) and i < last
        with model.no_sync() if no_sync else contextlib.nullcontext():
            with precision.autocast():
                loss = loss_fn(model, scheduler, x0, labels, weights, generator, loss_cfg)
            loss = loss / len(micro_batches)
            (scaler.scale(loss) if scaler else loss).backward()
        total += loss.detach()
    if scaler:
        scaler.unscale_(optimizer)
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    lr_scheduler.step()
    return total


def count_step_flops(
    model: nn.Module,
    scheduler: DDPMScheduler,
    x0: torch.Tensor,
    labels: torch.Tensor | None,
) -> int:
    """Forward + backward FLOPs of one micro-batch of this shape (torch FlopCounterMode).

    Runs one extra pass on the given module and clears its gradients afterwards.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        t = torch.zeros(x0.shape[0], dtype=torch.long, device=x0.device) + 1
        loss = denoising_loss(model, scheduler, x0, labels, t, torch.randn_like(x0)).mean()
        loss.backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def iterate_micro_batches(
    x: torch.Tensor, labels: torch.Tensor | None, weights: torch.Tensor | None, size: int
) -> Iterator[MicroBatch]:
    """Split one rank's step batch into micro-batches of `size` rows."""
    for i in range(0, x.shape[0], size):
        yield (
            x[i : i + size],
            labels[i : i + size] if labels is not None else None,
            weights[i : i + size] if weights is not None else None,
        )
