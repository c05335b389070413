"""The compute of DoReMi reweighting, as plain arithmetic on measured FLOPs (pure).

Reference training, the proxy's training steps, and one reference forward pass per proxy
sample (the excess loss needs the reference's loss on the same (x_t, t, noise)); compared with
the final model's estimated training FLOPs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class DROCost:
    """FLOPs of the weight search, part by part."""

    reference_training: int
    proxy_training: int
    reference_forward: int

    @property
    def total(self) -> int:
        return self.reference_training + self.proxy_training + self.reference_forward

    def parts(self) -> dict[str, int]:
        return asdict(self)


def dro_cost(
    reference_training: int,
    proxy_flops_per_step: int,
    proxy_steps: int,
    reference_forward_per_micro_batch: int,
    micro_batches_per_step: int,
) -> DROCost:
    """Reference training + proxy forward/backward + a reference forward per proxy micro-batch."""
    return DROCost(
        reference_training=int(reference_training),
        proxy_training=int(proxy_flops_per_step * proxy_steps),
        reference_forward=int(reference_forward_per_micro_batch * micro_batches_per_step)
        * int(proxy_steps),
    )


def train_flops_estimate(
    train_steps: int, flops_per_step: int, train_batch: int, measured_batch: int
) -> float:
    """The final training's FLOPs from a FLOPs-per-step measured at another batch size."""
    return train_steps * flops_per_step * train_batch / measured_batch


def cost_fraction(cost: int, train_flops: float) -> float | None:
    """The search's share of the final training's FLOPs (None without a training estimate)."""
    return cost / train_flops if train_flops else None


def equal_steps(budget: float, final_flops: float, flops_per_step_pair: float) -> int:
    """Steps `s` for reference and proxy each with `s x (one reference step + one proxy step
    with its reference forward) <= budget x the final training's FLOPs` (at least 1)."""
    if flops_per_step_pair <= 0:
        raise ValueError(f"flops per step must be positive, got {flops_per_step_pair}")
    return max(1, int(budget * final_flops // flops_per_step_pair))
