"""TDC (timestep divide-and-conquer) pure core: timestep groups by SNR, FLOPs budgets,
structured UNet pruning to a budget, proxy-driven per-group decisions and the routed sampler.
No Ray here; stages wire these into Ray Train."""

from dedt_ray.tdc.budget import group_budgets, model_flops
from dedt_ray.tdc.denoise import Batch, denoising_loss
from dedt_ray.tdc.grouping import (
    describe_groups,
    group_of,
    group_sizes,
    group_timesteps,
    snr_db,
    validate_groups,
)
from dedt_ray.tdc.proxy import (
    LLMProxy,
    OptunaProxy,
    Proposal,
    PruningProxy,
    RoundRecord,
    decide_group,
    denoising_score,
)
from dedt_ray.tdc.pruning import (
    BudgetError,
    PruneResult,
    UNetPruner,
    architecture_table,
    block_names,
    load_pruned,
    prune_to_budget,
    save_pruned,
    taylor_gradients,
)
from dedt_ray.tdc.routing import RoutedUNet, load_routed, sampling_flops, save_routed

__all__ = [
    "Batch",
    "BudgetError",
    "LLMProxy",
    "OptunaProxy",
    "Proposal",
    "PruneResult",
    "PruningProxy",
    "RoundRecord",
    "RoutedUNet",
    "UNetPruner",
    "architecture_table",
    "block_names",
    "decide_group",
    "denoising_loss",
    "denoising_score",
    "describe_groups",
    "group_budgets",
    "group_of",
    "group_sizes",
    "group_timesteps",
    "load_pruned",
    "load_routed",
    "model_flops",
    "prune_to_budget",
    "sampling_flops",
    "save_pruned",
    "save_routed",
    "snr_db",
    "taylor_gradients",
    "validate_groups",
]
