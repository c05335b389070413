"""Structured channel pruning of a diffusers ``UNet2DModel`` to a FLOPs budget (TDC step 4).

How it works:

1. **Coupled channels.** torch-pruning's dependency graph traces a CPU copy of the UNet once and
   yields every group of coupled channels: each residual stream (through the skip concatenations
   of the up blocks), each resnet's inner channels (conv1 out, time_emb_proj out, norm2, conv2
   in), each attention's inner dims (to_q/to_k/to_v out, to_out in) and the time-embedding width.
   Groups whose earliest block is ``down.i`` / ``mid`` / ``up.i`` (``conv_in`` counts as
   ``down.0``) take that block's ratio; the time-embedding groups and ``conv_out``'s output are
   never pruned, so ``conv_in``/``conv_out`` keep the image channels and the embedding inputs
   stay consistent.
2. **Importance** of a channel is the first-order Taylor term ``sum |w * dL/dw|`` over every
   weight tied to it in its group (Diff-Pruning; the gradient of the denoising loss of a batch
   of images at timesteps spread over the group's range, see ``taylor_gradients``), or
   ``sum |w|`` (``importance="magnitude"``).
3. **Sets.** A group touching ``GroupNorm(G)`` or an attention with ``H`` heads is split into
   ``lcm(G, H)`` contiguous sets and the same positions are removed from every set. GroupNorm
   keeps ``num_groups`` and each group keeps its own channels; attention keeps its heads with a
   smaller head dim (diffusers derives the head dim from the projection width). Widths are
   therefore coarse: 32 channels in 8 GroupNorm groups can be 32, 24, 16 or 8 wide.
4. **Surgery is ours**, by slicing: every group's removed indices are mapped (by the graph,
   including concatenation offsets) to each coupled layer in the *unpruned* model's coordinates,
   and each layer is rebuilt once. torch-pruning's own ``group.prune()`` mutates the traced model,
   so every candidate would need a fresh trace; here one trace serves every candidate of a
   budget search and every proxy round.

Why the plain ``MetaPruner`` call pruned ~0.04% of FLOPs (reproduced): with GroupNorm it ranks
the positions within one GroupNorm group (4 for 32 channels), ``round_to`` then rounds that count
in channel units (8), which selects every position, so ``check_pruning_group`` rejects the group:
only the time embedding (no GroupNorm) was pruned. Ignoring the attention modules also freezes
every group coupled to an attention output. The graph itself is right: with the per-set rule
above every group prunes.

The pruned model keeps the base ``config`` (which no longer tells its widths);
``save_pruned`` writes the widths of every conv/linear/norm/embedding to ``pruned.json`` next to
``model.safetensors`` and ``load_pruned`` rebuilds the architecture from them (no pickle).
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch_pruning as tp
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import skip_init

from dedt_ray.tdc.budget import count_flops, example_inputs, model_flops
from dedt_ray.tdc.denoise import Batch, denoising_loss, stratified_timesteps

FORMAT = "dedt_ray.tdc.pruned/1"
PRUNABLE = (nn.Conv2d, nn.Linear, nn.GroupNorm, nn.Embedding)


class UnsupportedLayerError(TypeError):
    """A layer type the structured pruner does not know how to slice."""


class BudgetError(ValueError):
    """A FLOPs budget cannot be met within tolerance."""


# ---------------------------------------------------------------------------------------------
# Blocks


def block_names(model: UNet2DModel) -> list[str]:
    """Prunable block names in forward order: ``down.i``, ``mid``, ``up.i``."""
    names = [f"down.{i}" for i in range(len(model.down_blocks))]
    if model.mid_block is not None:
        names.append("mid")
    return names + [f"up.{i}" for i in range(len(model.up_blocks))]


def block_of(module_name: str) -> str | None:
    """Block of a module name (``conv_in`` belongs to ``down.0``), or None outside blocks."""
    if module_name == "conv_in":
        return "down.0"
    if m := re.match(r"(down|up)_blocks\.(\d+)(\.|$)", module_name):
        return f"{m.group(1)}.{m.group(2)}"
    if module_name == "mid_block" or module_name.startswith("mid_block."):
        return "mid"
    return None


def architecture_table(model: UNet2DModel) -> list[dict[str, Any]]:
    """Per block: output width and share of the model's FLOPs (for logs and LLM prompts)."""
    counts = count_flops(model, example_inputs(model)).get_flop_counts()
    root = type(model).__name__
    total = sum(counts.get(root, {}).values()) or 1
    rows = []
    for name in block_names(model):
        kind, _, idx = name.partition(".")
        block = model.mid_block if kind == "mid" else getattr(model, f"{kind}_blocks")[int(idx)]
        key = f"{root}.mid_block" if kind == "mid" else f"{root}.{kind}_blocks.{idx}"
        rows.append(
            {
                "block": name,
                "channels": block.resnets[-1].conv2.out_channels,
                "flops_share": sum(counts.get(key, {}).values()) / total,
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------
# Shapes: rebuild modules at new widths, keep diffusers' bookkeeping attributes in sync


def module_shapes(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Widths of every conv / linear / group norm / embedding, by module name."""
    shapes: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            shapes[name] = {"type": "Conv2d", "in": m.in_channels, "out": m.out_channels}
        elif isinstance(m, nn.Linear):
            shapes[name] = {"type": "Linear", "in": m.in_features, "out": m.out_features}
        elif isinstance(m, nn.GroupNorm):
            shapes[name] = {"type": "GroupNorm", "groups": m.num_groups, "channels": m.num_channels}
        elif isinstance(m, nn.Embedding):
            shapes[name] = {"type": "Embedding", "num": m.num_embeddings, "dim": m.embedding_dim}
    return shapes


def _resized(m: nn.Module, n_in: int, n_out: int) -> nn.Module:
    """An uninitialised module like ``m`` with ``n_in`` inputs and ``n_out`` outputs."""
    kw = {"device": next(m.parameters()).device, "dtype": next(m.parameters()).dtype}
    if isinstance(m, nn.Conv2d):
        if m.groups != 1:
            raise UnsupportedLayerError(f"grouped convolution {m} cannot be pruned")
        return skip_init(
            nn.Conv2d,
            n_in,
            n_out,
            m.kernel_size,
            m.stride,
            m.padding,
            m.dilation,
            bias=m.bias is not None,
            padding_mode=m.padding_mode,
            **kw,
        )
    if isinstance(m, nn.Linear):
        return skip_init(nn.Linear, n_in, n_out, bias=m.bias is not None, **kw)
    if isinstance(m, nn.GroupNorm):
        return skip_init(nn.GroupNorm, m.num_groups, n_out, eps=m.eps, affine=m.affine, **kw)
    if isinstance(m, nn.Embedding):
        return skip_init(nn.Embedding, m.num_embeddings, n_out, **kw)
    raise UnsupportedLayerError(f"cannot resize {type(m).__name__}")


def _widths(m: nn.Module) -> tuple[int, int]:
    if isinstance(m, nn.Conv2d):
        return m.in_channels, m.out_channels
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    if isinstance(m, nn.GroupNorm):
        return m.num_channels, m.num_channels
    if isinstance(m, nn.Embedding):
        return m.num_embeddings, m.embedding_dim
    raise UnsupportedLayerError(f"cannot prune {type(m).__name__}")


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def sync_attributes(model: UNet2DModel) -> None:
    """Update diffusers' width attributes from the layers, then check the model is consistent."""
    for name, m in model.named_modules():
        if isinstance(m, ResnetBlock2D):
            m.in_channels, m.out_channels = m.conv1.in_channels, m.conv2.out_channels
        elif isinstance(m, (Downsample2D, Upsample2D)) and isinstance(m.conv, nn.Conv2d):
            m.channels, m.out_channels = m.conv.in_channels, m.conv.out_channels
        elif isinstance(m, Attention):
            m.inner_dim, m.inner_kv_dim = m.to_q.out_features, m.to_k.out_features
            m.query_dim, m.out_dim = m.to_q.in_features, m.to_out[0].out_features
            widths = {m.to_q.out_features, m.to_k.out_features, m.to_v.out_features}
            if len(widths) != 1 or m.to_out[0].in_features not in widths or m.inner_dim % m.heads:
                raise ValueError(f"attention {name} is inconsistent after pruning: {m}")
        if isinstance(m, nn.GroupNorm) and m.num_channels % m.num_groups:
            raise ValueError(f"{name}: {m.num_channels} channels in {m.num_groups} groups")


def apply_shapes(model: UNet2DModel, shapes: Mapping[str, Mapping[str, Any]]) -> None:
    """Rebuild every module whose width differs from ``shapes`` (uninitialised: load weights
    next)."""
    current = module_shapes(model)
    for name, spec in shapes.items():
        if name not in current or current[name]["type"] != spec["type"]:
            raise ValueError(f"module {name} ({spec['type']}) is not in the base architecture")
        if current[name] == dict(spec):
            continue
        if spec["type"] == "GroupNorm" and spec["groups"] != current[name]["groups"]:
            raise ValueError(f"{name}: pruning never changes num_groups, got {spec['groups']}")
        n_in, n_out = {
            "Conv2d": ("in", "out"),
            "Linear": ("in", "out"),
            "GroupNorm": ("channels", "channels"),
            "Embedding": ("num", "dim"),
        }[spec["type"]]
        _set_module(model, name, _resized(model.get_submodule(name), spec[n_in], spec[n_out]))
    sync_attributes(model)


def _sliced(m: nn.Module, keep_in: torch.Tensor, keep_out: torch.Tensor) -> nn.Module:
    """A copy of ``m`` keeping input indices ``keep_in`` and output indices ``keep_out``."""
    new = _resized(m, len(keep_in), len(keep_out))
    with torch.no_grad():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            new.weight.copy_(m.weight[keep_out][:, keep_in])
            if m.bias is not None:
                new.bias.copy_(m.bias[keep_out])
        elif isinstance(m, nn.GroupNorm):
            if m.affine:
                new.weight.copy_(m.weight[keep_out])
                new.bias.copy_(m.bias[keep_out])
        else:  # Embedding: rows are classes, columns the embedding dim
            new.weight.copy_(m.weight[:, keep_out])
    return new


# ---------------------------------------------------------------------------------------------
# Channel groups and importance


@dataclass
class ChannelGroup:
    """Coupled channels pruned together, indexed by the root layer's channels."""

    block: str
    root: str
    size: int
    n_sets: int  # channels are pruned equally in n_sets contiguous sets
    members: list[tuple[str, bool, np.ndarray, np.ndarray]]  # (module, is_out, idxs, root idxs)
    importance: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def per_set(self) -> int:
        return self.size // self.n_sets

    def removed(self, cut: int) -> np.ndarray:
        """Root channels removed when ``cut`` least important positions go from every set."""
        scores = self.importance.reshape(self.n_sets, self.per_set).sum(0)
        positions = np.argsort(scores, kind="stable")[:cut]
        return (np.arange(self.n_sets)[:, None] * self.per_set + positions).ravel()

    def removed_per_set(self, ratio: float) -> int:
        """Positions removed from each set at ``ratio`` (at least one kept)."""
        return min(self.per_set - 1, math.floor(self.per_set * ratio + 0.5))


def _importance(model: nn.Module, group: ChannelGroup, kind: str) -> np.ndarray:
    imp = np.zeros(group.size)
    for name, is_out, idxs, root_idxs in group.members:
        m = model.get_submodule(name)
        score = torch.zeros(_widths(m)[1 if is_out else 0])
        for pname, p in m.named_parameters(recurse=False):
            if kind == "taylor" and p.grad is None:
                raise ValueError(f"{name}.{pname} has no gradient: run taylor_gradients first")
            term = (p * p.grad if kind == "taylor" else p).detach().abs().float().cpu()
            if isinstance(m, nn.Embedding):
                term = term.t()  # the pruned dim first
            elif isinstance(m, (nn.Conv2d, nn.Linear)) and not is_out:
                if pname != "weight":
                    continue  # a bias has no input dim
                term = term.transpose(0, 1)
            score += term.reshape(term.shape[0], -1).sum(1)
        np.add.at(imp, root_idxs, score[idxs].numpy())
    return imp


def channel_groups(
    model: UNet2DModel, importance: Literal["taylor", "magnitude"]
) -> list[ChannelGroup]:
    """Prunable channel groups of ``model`` with per-channel importance."""
    traced = copy.deepcopy(model).cpu()
    inputs = example_inputs(traced)
    graph = tp.DependencyGraph().build_dependency(
        traced,
        example_inputs=inputs,
        forward_fn=lambda m, kw: m(**kw),
        output_transform=lambda out: out.sample,
    )
    name_of = {m: n for n, m in traced.named_modules()}
    heads = {
        f"{n}.{proj}": m.heads
        for n, m in traced.named_modules()
        if isinstance(m, Attention)
        for proj in ("to_q", "to_k", "to_v")
    }
    order = {b: i for i, b in enumerate(block_names(model))}
    groups = []
    for g in graph.get_all_groups(ignored_layers=[traced.conv_out], root_module_types=PRUNABLE[:2]):
        members, blocks, sets = [], [], 1
        for item in g.items:
            name = name_of.get(item.dep.target.module)
            if name is None:  # a functional op (add, concat, reshape)
                continue
            module = item.dep.target.module
            if not isinstance(module, PRUNABLE):
                if any(True for _ in module.parameters(recurse=False)):
                    raise UnsupportedLayerError(f"cannot prune {type(module).__name__} {name}")
                continue
            is_out = graph.is_out_channel_pruning_fn(item.dep.handler)
            members.append((name, is_out, np.asarray(item.idxs), np.asarray(item.root_idxs)))
            if is_out and isinstance(module, (nn.Conv2d, nn.Linear)) and block_of(name):
                blocks.append(block_of(name))
            if isinstance(module, nn.GroupNorm):
                sets = math.lcm(sets, module.num_groups)
            if is_out and name in heads:
                sets = math.lcm(sets, heads[name])
        if not blocks:
            continue  # the time embedding: kept whole
        root = name_of[g[0].dep.target.module]
        size = len(g[0].idxs)
        group = ChannelGroup(
            block=min(blocks, key=order.__getitem__),
            root=root,
            size=size,
            n_sets=sets if size % sets == 0 else size,  # indivisible: nothing prunable
            members=members,
        )
        group.importance = _importance(model, group, importance)
        groups.append(group)
    return groups


def taylor_gradients(
    model: nn.Module,
    scheduler: Any,
    data: Batch,
    t_range: tuple[int, int],
    n_timesteps: int = 16,
    batch_size: int = 32,
    seed: int = 0,
    threshold: float = 0.0,
) -> int:
    """Fill ``model``'s ``.grad`` with the mean gradient of the denoising loss over every image
    of ``data`` at each of ``n_timesteps`` timesteps spread over ``t_range`` (as Diff-Pruning:
    one batch of images at every step of the range). Timesteps run from least to most noisy;
    with ``threshold > 0`` the accumulation stops after the first timestep whose loss falls
    below ``threshold`` x the largest loss so far (Diff-Pruning's ``thr``). Returns the number
    of (image, timestep) pairs used."""
    model.zero_grad(set_to_none=True)
    gen = torch.Generator().manual_seed(seed)
    n = data.images.shape[0]
    pairs, loss_max = 0, 0.0
    for t in stratified_timesteps(t_range, n_timesteps).tolist():
        loss_t = 0.0
        for start in range(0, n, batch_size):
            part = data.take(slice(start, start + batch_size))
            m = part.images.shape[0]
            loss = denoising_loss(model, scheduler, part, t_range, gen, timesteps=t)
            (loss * m).backward()
            loss_t += float(loss.detach()) * m / n
        pairs += n
        loss_max = max(loss_max, loss_t)
        if loss_t < threshold * loss_max:
            break
    for p in model.parameters():
        if p.grad is not None:
            p.grad /= pairs
    return pairs


# ---------------------------------------------------------------------------------------------
# The pruner


@dataclass
class PruneResult:
    """A pruned model with its achieved per-block ratios and measured FLOPs."""

    model: UNet2DModel
    ratios: dict[str, float]  # fraction of the block's prunable channels removed
    flops: int
    base_flops: int


class UNetPruner:
    """Prunes copies of one UNet2DModel; traced and scored once, then any ratios are cheap."""

    def __init__(
        self, model: UNet2DModel, importance: Literal["taylor", "magnitude"] = "taylor"
    ) -> None:
        """Trace ``model`` (with Taylor importance its ``.grad`` must be filled)."""
        self.model = model
        self.taylor_pairs = 0  # (image, timestep) pairs behind Taylor importance (from_denoising)
        self.blocks = block_names(model)
        self.groups = channel_groups(model, importance)
        counts = count_flops(model, example_inputs(model)).get_flop_counts()
        prefix = type(model).__name__ + "."
        flops = {k.removeprefix(prefix): sum(v.values()) for k, v in counts.items()}
        self.base_flops = int(sum(counts["Global"].values()))
        self._layer_flops = {
            n: flops[n]
            for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and flops.get(n)
        }
        self._attention_flops = {
            n: flops.get(n, 0)
            - sum(flops.get(f"{n}.{p}", 0) for p in ("to_q", "to_k", "to_v"))
            - flops.get(f"{n}.to_out.0", 0)
            for n, m in model.named_modules()
            if isinstance(m, Attention)
        }
        self._other_flops = (
            self.base_flops - sum(self._layer_flops.values()) - sum(self._attention_flops.values())
        )
        self._flops: dict[tuple[int, ...], int] = {}

    @classmethod
    def from_denoising(
        cls,
        model: UNet2DModel,
        scheduler: Any,
        data: Batch,
        t_range: tuple[int, int],
        n_timesteps: int = 16,
        batch_size: int = 32,
        seed: int = 0,
        threshold: float = 0.0,
    ) -> UNetPruner:
        """A pruner with Taylor importance from the loss on ``t_range`` (``model`` untouched);
        see ``taylor_gradients``. ``taylor_pairs`` tells how many (image, t) pairs it used."""
        scored = copy.deepcopy(model)
        pairs = taylor_gradients(
            scored, scheduler, data, t_range, n_timesteps, batch_size, seed, threshold
        )
        pruner = cls(scored, "taylor")
        pruner.taylor_pairs = pairs
        return pruner

    # -- cuts: positions removed per set, one entry per group ----------------------------------

    def cut_for(self, ratios: Mapping[str, float], max_ratio: float = 0.9) -> tuple[int, ...]:
        """The cut that removes ``ratios[block]`` of each group's channels (rounded per set)."""
        unknown = set(ratios) - set(self.blocks)
        if unknown:
            raise ValueError(f"unknown blocks {sorted(unknown)}; blocks are {self.blocks}")
        for block, r in ratios.items():
            if not 0.0 <= r <= max_ratio:
                raise ValueError(f"ratio {r} for block {block} is outside [0, {max_ratio}]")
        return tuple(g.removed_per_set(ratios.get(g.block, 0.0)) for g in self.groups)

    def ratios_of(self, cut: tuple[int, ...]) -> dict[str, float]:
        """Fraction of each block's prunable channels that ``cut`` removes."""
        removed = dict.fromkeys(self.blocks, 0)
        total = dict.fromkeys(self.blocks, 0)
        for g, c in zip(self.groups, cut, strict=True):
            removed[g.block] += c * g.n_sets
            total[g.block] += g.size
        return {b: removed[b] / total[b] if total[b] else 0.0 for b in self.blocks}

    def _removed(self, cut: tuple[int, ...]) -> dict[str, tuple[set[int], set[int]]]:
        """Per module: the (input, output) indices ``cut`` removes (a norm's in ``outputs``)."""
        removed: dict[str, tuple[set[int], set[int]]] = {}
        for g, c in zip(self.groups, cut, strict=True):
            if c == 0:
                continue
            root = g.removed(c)
            for name, is_out, idxs, root_idxs in g.members:
                ins, outs = removed.setdefault(name, (set(), set()))
                is_norm = isinstance(self.model.get_submodule(name), nn.GroupNorm)
                (outs if is_out or is_norm else ins).update(idxs[np.isin(root_idxs, root)].tolist())
        return removed

    def build(self, cut: tuple[int, ...]) -> UNet2DModel:
        """A pruned copy of the model for ``cut``."""
        model = copy.deepcopy(self.model)
        model.zero_grad(set_to_none=True)
        for name, (ins, outs) in self._removed(cut).items():
            m = model.get_submodule(name)
            n_in, n_out = _widths(m)
            if isinstance(m, nn.GroupNorm):
                ins = outs
            keep_in = torch.tensor(sorted(set(range(n_in)) - ins), dtype=torch.long)
            keep_out = torch.tensor(sorted(set(range(n_out)) - outs), dtype=torch.long)
            _set_module(model, name, _sliced(m, keep_in, keep_out))
        sync_attributes(model)
        return model

    def flops(self, cut: tuple[int, ...]) -> int:
        """FLOPs of the model pruned by ``cut``, from the base model's measured per-layer FLOPs.

        Exact for this model family: a conv / linear layer's FLOPs scale with inputs x outputs
        and an attention core's (QK^T, AV) with its inner width; nothing else is counted.
        ``PruneResult.flops`` is measured on the built model all the same.
        """
        if cut not in self._flops:
            total = float(self._other_flops)
            removed = self._removed(cut)
            for name, flops in self._layer_flops.items():
                n_in, n_out = _widths(self.model.get_submodule(name))
                ins, outs = removed.get(name, ((), ()))
                total += flops * (n_in - len(ins)) / n_in * (n_out - len(outs)) / n_out
            for name, flops in self._attention_flops.items():
                inner = self.model.get_submodule(name).to_q.out_features
                _, outs = removed.get(name + ".to_q", ((), ()))
                total += flops * (inner - len(outs)) / inner
            self._flops[cut] = round(total)
        return self._flops[cut]

    def prune(self, ratios: Mapping[str, float], max_ratio: float = 0.9) -> PruneResult:
        """Prune each block's channel groups by its ratio (no budget)."""
        cut = self.cut_for(ratios, max_ratio)
        return self._result(cut)

    def _result(self, cut: tuple[int, ...]) -> PruneResult:
        model = self.build(cut)
        return PruneResult(model, self.ratios_of(cut), model_flops(model), self.base_flops)

    # -- budget --------------------------------------------------------------------------------

    def prune_to_budget(
        self,
        budget_flops: float,
        shape: Mapping[str, float] | None = None,
        tol: float = 0.02,
        max_ratio: float = 0.9,
    ) -> PruneResult:
        """Prune to ``budget_flops`` within ``tol`` (relative), keeping ``shape``'s proportions.

        The per-block ``shape`` (default uniform) is scaled by a multiplier found by bisection
        until the FLOPs (``flops``, exact) straddle the budget. Widths are discrete and groups
        of equal size change at the same multiplier, so the two straddling cuts are joined by a
        walk of single-group steps, itself bisected; if no step lands within ``tol``, one-step
        changes of any group around the crossing are tried. The candidate closest to the budget
        wins and its FLOPs are measured on the built model. A budget at or above the base FLOPs
        returns an unpruned copy. Raises ``BudgetError`` when the budget cannot be met.
        """
        shape = dict(shape) if shape is not None else dict.fromkeys(self.blocks, 1.0)
        if any(r < 0 for r in shape.values()) or set(shape) - set(self.blocks):
            raise ValueError(f"shape must map blocks {self.blocks} to ratios >= 0, got {shape}")
        lo_ok, hi_ok = budget_flops * (1 - tol), budget_flops * (1 + tol)
        zero = tuple(0 for _ in self.groups)
        if self.base_flops <= hi_ok:
            return self._result(zero)
        positive = [r for r in shape.values() if r > 0]
        if not positive:
            raise BudgetError(f"budget {budget_flops:.3g} < base FLOPs but shape prunes nothing")

        def cut_at(s: float) -> tuple[int, ...]:
            return self.cut_for({b: min(max_ratio, s * r) for b, r in shape.items()}, max_ratio)

        lo, hi = 0.0, max_ratio / min(positive)
        if self.flops(cut_at(hi)) > hi_ok:
            raise BudgetError(
                f"pruning at most {max_ratio:.0%} per block with shape {shape} reaches "
                f"{self.flops(cut_at(hi)) / self.base_flops:.1%} of the base FLOPs; the budget "
                f"is {budget_flops / self.base_flops:.1%}"
            )
        for _ in range(60):  # bisection: flops(cut_at(lo)) > budget >= flops(cut_at(hi))
            if sum(abs(a - b) for a, b in zip(cut_at(lo), cut_at(hi), strict=True)) <= 1:
                break
            mid = (lo + hi) / 2
            if self.flops(cut_at(mid)) > budget_flops:
                lo = mid
            else:
                hi = mid
        # Groups that share a breakpoint change together: walk from above to below one
        # group step at a time (FLOPs fall along the walk) and bisect the walk.
        walk = [cut_at(lo)]
        below = cut_at(hi)
        for i in range(len(self.groups)):
            while walk[-1][i] != below[i]:
                c = walk[-1]
                walk.append(c[:i] + (c[i] + (1 if below[i] > c[i] else -1),) + c[i + 1 :])
        a, b = 0, len(walk) - 1
        while b - a > 1:
            mid = (a + b) // 2
            a, b = (mid, b) if self.flops(walk[mid]) > budget_flops else (a, mid)
        candidates = [walk[a], walk[b]]
        if not any(lo_ok <= self.flops(c) <= hi_ok for c in candidates):
            above, below = walk[a], walk[b]
            for i, g in enumerate(self.groups):  # one-step changes around the crossing
                if above[i] < g.per_set - 1:
                    candidates.append(above[:i] + (above[i] + 1,) + above[i + 1 :])
                if below[i] > 0:
                    candidates.append(below[:i] + (below[i] - 1,) + below[i + 1 :])
        inside = [c for c in candidates if lo_ok <= self.flops(c) <= hi_ok]
        if not inside:
            got = sorted(self.flops(c) / budget_flops for c in candidates)
            raise BudgetError(
                f"no pruning with shape {shape} lands within {tol:.0%} of the budget "
                f"{budget_flops:.4g}; nearest candidates reach {got[0]:.3f}..{got[-1]:.3f} of it"
            )
        result = self._result(min(inside, key=lambda c: abs(self.flops(c) - budget_flops)))
        if not lo_ok <= result.flops <= hi_ok:  # the per-layer scaling is exact; a safety net
            raise BudgetError(f"measured {result.flops} FLOPs, outside {tol:.0%} of the budget")
        return result


def prune_to_budget(
    model: UNet2DModel,
    budget_flops: float,
    shape: Mapping[str, float] | None = None,
    *,
    scheduler: Any = None,
    data: Batch | None = None,
    t_range: tuple[int, int] | None = None,
    tol: float = 0.02,
    max_ratio: float = 0.9,
    seed: int = 0,
) -> PruneResult:
    """Prune a copy of ``model`` to ``budget_flops`` (Taylor importance on ``t_range`` when
    ``scheduler``, ``data`` and ``t_range`` are given, else weight magnitude)."""
    if data is not None and scheduler is not None and t_range is not None:
        pruner = UNetPruner.from_denoising(model, scheduler, data, t_range, seed=seed)
    else:
        pruner = UNetPruner(model, "magnitude")
    return pruner.prune_to_budget(budget_flops, shape, tol, max_ratio)


# ---------------------------------------------------------------------------------------------
# Save / load without pickle


def save_pruned(model: UNet2DModel, path: str | Path) -> None:
    """Write ``model.safetensors`` and ``pruned.json`` (base config + every layer's widths)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in model.config.items() if not k.startswith("_")}
    description = {"format": FORMAT, "config": config, "modules": module_shapes(model)}
    (path / "pruned.json").write_text(json.dumps(description, indent=1))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path / "model.safetensors"))


def load_pruned(path: str | Path, device: str | torch.device = "cpu") -> UNet2DModel:
    """Rebuild a model written by ``save_pruned`` and load its weights (strict)."""
    path = Path(path)
    description = json.loads((path / "pruned.json").read_text())
    if description.get("format") != FORMAT:
        raise ValueError(f"{path}/pruned.json is not a {FORMAT} description")
    model = UNet2DModel.from_config(description["config"])
    apply_shapes(model, description["modules"])
    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    return model.to(device).eval()


@dataclass(frozen=True)
class PrunedModel:
    """The trainer's model source for a TDC group fine-tune: a ``save_pruned`` folder."""

    path: str

    def build(self, model_cfg: Any, spec: Any) -> UNet2DModel:
        from dedt_ray.store import local_folder

        with local_folder(self.path) as folder:  # a URI on an object-store run directory
            return load_pruned(folder)
