"""How long reference and proxy train: equal steps within `reweight.budget` of the final FLOPs.

DoReMi trains a small reference (uniform weights, the full data) and a small proxy of the same
architecture, each for a real run; the search is cheap because the models are small, not
because the runs are short. Here the two share `reweight.proxy_model` (half the widths by
default) and train for as many steps as `reweight.budget` x the final model's training FLOPs
buys: `s (F_ref + F_proxy + F_ref_forward) = budget x S x F_final`, S the final training's
steps (`train.steps`, or those of `train.epochs` over its rows), FLOPs measured per step on the
real architectures (torch FlopCounterMode, batch 1, scaled to each batch).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from dedt_ray.config import Config, ModelConfig
from dedt_ray.diffusion.core import count_step_flops
from dedt_ray.diffusion.models import ModelSpec, build_noise_scheduler, build_unet
from dedt_ray.reweight.checks import proxy_model
from dedt_ray.reweight.cost import equal_steps


@dataclass(frozen=True)
class DROPlan:
    """The steps of reference and proxy and the FLOPs they were planned from."""

    reference_steps: int
    proxy_steps: int
    final_flops: float  # the final training's steps x the final model's FLOPs per step
    reference_step_flops: int  # the small model, forward + backward, reference batch
    proxy_step_flops: int  # the small model, forward + backward, proxy batch
    reference_forward_flops: int  # the reference's forward on a proxy batch
    budget: float

    @property
    def planned_fraction(self) -> float:
        """Reference + proxy FLOPs at these steps over the final training's."""
        spent = self.reference_steps * self.reference_step_flops + self.proxy_steps * (
            self.proxy_step_flops + self.reference_forward_flops
        )
        return spent / self.final_flops

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "planned_fraction": self.planned_fraction}


def per_image_flops(model_cfg: ModelConfig, spec: ModelSpec) -> tuple[int, int]:
    """(forward + backward, forward) FLOPs of one image through the model (batch 1)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    unet = build_unet(model_cfg, spec)
    x = torch.zeros(1, spec.channels, spec.sample_size, spec.sample_size)
    y = torch.zeros(1, dtype=torch.long) if spec.num_classes > 0 else None
    train = count_step_flops(unet, build_noise_scheduler(model_cfg), x, y)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        unet(x, torch.ones(1, dtype=torch.long), class_labels=y)
    return train, int(counter.get_total_flops())


def plan_dro(cfg: Config, spec: ModelSpec, final_steps: int) -> DROPlan:
    """Equal reference and proxy steps within the budget of a final training of `final_steps`
    (`trainer.budget_steps` of its rows; explicit steps win)."""
    small = proxy_model(cfg)
    final_train, _ = per_image_flops(cfg.model, spec)
    small_train, small_forward = per_image_flops(small, spec)
    ref_batch = cfg.reference.batch_size or cfg.train.batch_size
    proxy_batch = cfg.reweight.batch_size or cfg.train.batch_size
    final = float(final_steps * final_train * cfg.train.batch_size)
    ref_step, proxy_step = small_train * ref_batch, small_train * proxy_batch
    ref_forward = small_forward * proxy_batch
    steps = equal_steps(cfg.reweight.budget, final, ref_step + proxy_step + ref_forward)
    return DROPlan(
        reference_steps=cfg.reference.steps or steps,
        proxy_steps=cfg.reweight.steps or steps,
        final_flops=final,
        reference_step_flops=ref_step,
        proxy_step_flops=proxy_step,
        reference_forward_flops=ref_forward,
        budget=cfg.reweight.budget,
    )
