"""What a training worker receives: the `TrainJob` and its typed hooks (pure, no Ray).

Two hooks say what a run trains and how, so upper layers plug in without the trainer knowing
them:
- a `ModelSource` builds the denoiser: `ScratchModel` (from `model.*`), `PretrainedModel`
  (a diffusers UNet2DModel folder), or one an upper layer defines (TDC's pruned model);
- a `LossSpec` builds the loss on the worker: `PlainLoss` (the core denoising loss), or one an
  upper layer defines (the DoReMi Group DRO proxy loss).
Both are frozen dataclasses: they travel to the workers as they are, and their fields join
the resume key (`hook_key`), so a changed hook never resumes a checkpoint written for another.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from dedt_ray.config import ModelConfig, TrainConfig
from dedt_ray.diffusion.core import training_losses
from dedt_ray.diffusion.models import ModelSpec, build_unet


@dataclass(frozen=True)
class WorkerInfo:
    """Where a loss is built: device and process group."""

    device: torch.device
    world: int = 1
    distributed: bool = False


@runtime_checkable
class ModelSource(Protocol):
    """Builds the (trainable) denoiser of a run."""

    def build(self, model_cfg: ModelConfig, spec: ModelSpec) -> nn.Module: ...


@runtime_checkable
class TrainLoss(Protocol):
    """A `core.training_loss`-shaped callable with state that goes into checkpoints."""

    def __call__(self, model, scheduler, x0, labels, sample_weights, generator, cfg): ...

    def after_step(self, step: int) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class LossSpec(Protocol):
    """Builds the run's `TrainLoss` on each worker."""

    needs_labels: bool  # the loss reads the true class labels, also for unconditional models

    def build(self, worker: WorkerInfo) -> TrainLoss: ...


@dataclass(frozen=True)
class ScratchModel:
    """A freshly initialised UNet2DModel from `model.*` (torch is seeded before)."""

    def build(self, model_cfg: ModelConfig, spec: ModelSpec) -> nn.Module:
        return build_unet(model_cfg, spec)


@dataclass(frozen=True)
class PretrainedModel:
    """A diffusers UNet2DModel folder (local path) to start from."""

    path: str

    def build(self, model_cfg: ModelConfig, spec: ModelSpec) -> nn.Module:
        from diffusers import UNet2DModel

        return UNet2DModel.from_pretrained(self.path)


class CoreLoss:
    """`core.training_loss`; with `record`, each micro-batch's per-sample losses (before the
    sample weights) are kept in `recorded` for the trainer (InfoBatch's score table)."""

    def __init__(self, record: bool = False) -> None:
        self.record = record
        self.recorded: list[torch.Tensor] = []

    def __call__(self, model, scheduler, x0, labels, sample_weights, generator, cfg):
        losses = training_losses(model, scheduler, x0, labels, generator, cfg)
        if self.record:
            self.recorded.append(losses.detach())
        if sample_weights is not None:
            losses = losses * sample_weights
        return losses.mean()

    def after_step(self, step: int) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


@dataclass(frozen=True)
class PlainLoss:
    """The denoising loss (Min-SNR and sample weights as `train.*` says)."""

    needs_labels: bool = False
    record: bool = False  # keep per-sample losses (InfoBatch)

    def build(self, worker: WorkerInfo) -> TrainLoss:
        return CoreLoss(self.record)


@dataclass(frozen=True)
class CurveHook:
    """Quality along training: rank 0 sends the EMA weights to `scorer` (an actor an upper
    layer starts, with `submit(point, weights, source, key)` and `status()`) every `every`
    steps without waiting; with `until_converged` the run stops once `status()` says so."""

    scorer: Any
    every: int
    until_converged: bool = False
    key: int = 0  # this run's part of a composite model (a TDC group)
    flops_offset: float = 0.0  # compute spent before this run, added to each point


def hook_key(hook: Any) -> dict[str, Any]:
    """A hook as JSON for the resume key: its class and every field."""
    kind = f"{type(hook).__module__}.{type(hook).__qualname__}"
    return {"type": kind, **dataclasses.asdict(hook)}


@dataclass
class TrainJob:
    """Everything a worker needs: plain values plus the two typed hooks."""

    model: dict[str, Any]  # ModelConfig as JSON
    train: dict[str, Any]  # TrainConfig as JSON
    spec: ModelSpec
    seed: int
    fingerprint: str  # the resume key a checkpoint must carry
    source: ModelSource = field(default_factory=ScratchModel)
    loss: LossSpec = field(default_factory=PlainLoss)
    sampling_weights: list[float] | None = None  # class sampling probabilities
    loss_class_weights: list[float] | None = None  # per-class loss multipliers
    t_range: tuple[int, int] | None = None  # train only on timesteps in [t_lo, t_hi)
    curve: CurveHook | None = None  # quality along training (not part of the resume key)
    local: bool = False  # ScalingConfig(num_workers=0): in the driver process
    # local mode: the URI of the run's checkpoint folder (`<run>/_ray/<name>`), which the loop
    # writes and resumes from itself (Ray Train's local mode persists no checkpoint)
    checkpoints: str | None = None
    # local mode: called with each report's metrics in this process (Ray Train's local mode
    # calls no callbacks); `trainer.fit` sets it, so the job stays picklable for workers
    on_report: Callable[[dict[str, Any]], None] | None = None
    use_gpu: bool = False

    @property
    def model_cfg(self) -> ModelConfig:
        return ModelConfig.model_validate(self.model)

    @property
    def train_cfg(self) -> TrainConfig:
        return TrainConfig.model_validate(self.train)

    @property
    def pixels(self) -> bool:
        """Rows are uint8 HWC images (else float CHW latents)."""
        return not self.spec.latent
