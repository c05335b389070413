"""FLOPs budgets per timestep group (TDC step 3), FLOPs measurement and the search's FLOPs.

``FLOPs_g(i) = (i/N + (N - i)/N * k) * F`` for ``i = 1..N``: ``i = N`` is the full model ``F``,
``i = 1`` the smallest, ``(1/N + (N-1)/N * k) * F``. By default the noisiest group gets the
smallest model (``smallest="noisiest"``), as T-Stitch / OMS-DPM suggest; ``"cleanest"`` flips it.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on one forward pass at batch
1 (a multiply-add counts 2). Attention runs on PyTorch's math backend while counting: the fused
CPU flash-attention kernel is not counted by ``FlopCounterMode``, the math path is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


def group_budgets(
    n_groups: int,
    k: float,
    base_flops: float,
    smallest: Literal["noisiest", "cleanest"] = "noisiest",
) -> list[float]:
    """FLOPs budget of each group, in group order (group 0 = least noisy)."""
    if not isinstance(n_groups, int) or n_groups < 1:
        raise ValueError(f"n_groups must be a positive integer, got {n_groups!r}")
    if not 0.0 < k <= 1.0:
        raise ValueError(f"k (smallest relative size) must be in (0, 1], got {k}")
    if base_flops <= 0:
        raise ValueError(f"base_flops must be positive, got {base_flops}")
    n = n_groups
    by_size = [(i / n + (n - i) / n * k) * base_flops for i in range(1, n + 1)]  # ascending
    if smallest == "noisiest":
        return by_size[::-1]
    if smallest == "cleanest":
        return by_size
    raise ValueError(f"smallest must be 'noisiest' or 'cleanest', got {smallest!r}")


def example_inputs(
    model: torch.nn.Module,
    sample_size: int | tuple[int, int] | None = None,
    in_channels: int | None = None,
    class_conditional: bool | None = None,
) -> dict[str, torch.Tensor | None]:
    """Batch-1 keyword inputs for a UNet2DModel; unset arguments come from ``model.config``."""
    config = model.config
    size = sample_size if sample_size is not None else config.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    channels = in_channels if in_channels is not None else config.in_channels
    if class_conditional is None:
        class_conditional = config.num_class_embeds is not None
    device = next(model.parameters()).device
    return {
        "sample": torch.zeros(1, channels, height, width, device=device),
        "timestep": torch.ones(1, dtype=torch.long, device=device),
        "class_labels": torch.zeros(1, dtype=torch.long, device=device)
        if class_conditional
        else None,
    }


def count_flops(model: torch.nn.Module, inputs: dict[str, torch.Tensor | None]) -> FlopCounterMode:
    """Run ``model(**inputs)`` under a FlopCounterMode and return it (totals and per module)."""
    with (
        FlopCounterMode(display=False) as counter,
        torch.no_grad(),
        sdpa_kernel(SDPBackend.MATH),
    ):
        model(**inputs)
    return counter


def model_flops(
    model: torch.nn.Module,
    sample_size: int | tuple[int, int] | None = None,
    in_channels: int | None = None,
    class_conditional: bool | None = None,
) -> int:
    """FLOPs of one forward pass (batch 1) at the training resolution."""
    inputs = example_inputs(model, sample_size, in_channels, class_conditional)
    return int(count_flops(model, inputs).get_total_flops())


# -- accounting (pure arithmetic on measured FLOPs) -------------------------------------------
def search_flops(
    base_fwd: int,
    taylor_pairs: int,
    candidate_flops: Sequence[int | None],
    score_steps: int,
    score_batch: int,
    heldout: int,
) -> int:
    """Training-equivalent FLOPs of one group's pruning search, a forward + backward pass
    counted as 3 forwards: Taylor importance (``taylor_pairs`` (image, timestep) pairs on the
    base model of ``base_fwd`` FLOPs) plus, per scored candidate of ``candidate_flops`` FLOPs
    (None: the round missed the budget, nothing ran), its fine-tune (``score_steps`` steps of
    ``score_batch`` images) and its held-out evaluation (``heldout`` forwards)."""
    total = 3 * base_fwd * taylor_pairs
    for flops in candidate_flops:
        if flops is not None:
            total += 3 * flops * score_steps * score_batch + flops * heldout
    return int(total)


def stage2_steps(baseline: float, stage1: float, search: float, group_step_flops: list[int]) -> int:
    """Stage-2 steps per group (the same for every group) that the single model's budget has
    left after stage 1 and the search: `floor((baseline - stage1 - search) / sum_g F_g)`;
    0 when nothing is left."""
    per_round = sum(group_step_flops)
    if per_round <= 0:
        raise ValueError(f"group step FLOPs must be positive, got {group_step_flops}")
    return max(0, int((baseline - stage1 - search) // per_round))


def training_totals(
    stage1: int, search: int, stage2: int, baseline: int
) -> dict[str, int | float | bool | None]:
    """TDC's training FLOPs (stage 1 + search + stage 2) next to the single-model baseline."""
    total = stage1 + search + stage2
    return {
        "stage1_flops": stage1,
        "search_flops": search,
        "stage2_flops": stage2,
        "total_flops": total,
        "baseline_flops": baseline,
        "ratio_to_baseline": total / baseline if baseline else None,
        "within_baseline": total <= baseline,
    }


def sampling_totals(
    routed_flops_per_image: int, base_fwd: int, n_timesteps: int
) -> dict[str, int | float | None]:
    """Sampling FLOPs per image of the routed model next to the single model's."""
    single = base_fwd * n_timesteps
    return {
        "routed_flops_per_image": routed_flops_per_image,
        "single_flops_per_image": int(single),
        "ratio": routed_flops_per_image / single if single else None,
    }
