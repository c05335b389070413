"""Structured UNet pruning: coupled groups, budgets within 2%, Taylor importance, save/load."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch_pruning as tp
from diffusers import DDPMScheduler, UNet2DModel
from torch import nn

from dedt_ray.tdc.budget import example_inputs, model_flops
from dedt_ray.tdc.denoise import Batch, stratified_timesteps
from dedt_ray.tdc.pruning import (
    BudgetError,
    UNetPruner,
    architecture_table,
    block_names,
    block_of,
    load_pruned,
    prune_to_budget,
    save_pruned,
    sync_attributes,
    taylor_gradients,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: conftest.py


def tiny_unet(attention: bool = True, classes: bool = True, seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    down = ("DownBlock2D", "AttnDownBlock2D") if attention else ("DownBlock2D", "DownBlock2D")
    up = ("AttnUpBlock2D", "UpBlock2D") if attention else ("UpBlock2D", "UpBlock2D")
    return UNet2DModel(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=down,
        up_block_types=up,
        add_attention=attention,
        norm_num_groups=8,
        num_class_embeds=11 if classes else None,
    ).eval()


def _inputs(model: UNet2DModel, batch: int = 3) -> dict:
    gen = torch.Generator().manual_seed(1)
    labels = torch.arange(batch) % 11 if model.config.num_class_embeds else None
    return {
        "sample": torch.randn(batch, 1, 16, 16, generator=gen),
        "timestep": torch.tensor([3, 400, 900][:batch]),
        "class_labels": labels,
    }


def _check_valid(model: UNet2DModel) -> None:
    for name, m in model.named_modules():
        if isinstance(m, nn.GroupNorm):
            assert m.num_groups == 8 and m.num_channels % 8 == 0, name
    assert model.conv_in.in_channels == 1 and model.conv_out.out_channels == 1
    assert model.time_embedding.linear_1.in_features == 32  # the sinusoidal projection's width
    with torch.no_grad():
        out = model(**_inputs(model)).sample
    assert out.shape == (3, 1, 16, 16) and torch.isfinite(out).all()


@pytest.fixture(scope="module")
def pruners() -> dict[str, UNetPruner]:
    return {
        "attn+cls": UNetPruner(tiny_unet(), "magnitude"),
        "plain": UNetPruner(tiny_unet(attention=False), "magnitude"),
        "attn": UNetPruner(tiny_unet(classes=False), "magnitude"),
    }


def test_block_names() -> None:
    model = tiny_unet()
    assert block_names(model) == ["down.0", "down.1", "mid", "up.0", "up.1"]
    assert block_of("conv_in") == "down.0"
    assert block_of("down_blocks.1.attentions.0.to_q") == "down.1"
    assert block_of("up_blocks.10.resnets.0.conv1") == "up.10"
    assert block_of("mid_block.resnets.0.conv1") == "mid"
    assert block_of("time_embedding.linear_1") is None and block_of("conv_out") is None
    table = architecture_table(model)
    assert [r["block"] for r in table] == block_names(model)
    assert [r["channels"] for r in table] == [32, 64, 64, 64, 32]
    assert 0.9 < sum(r["flops_share"] for r in table) < 1.0  # conv_in/out, time emb outside


def test_groups_cover_streams_inner_channels_and_attention(pruners) -> None:
    groups = pruners["attn+cls"].groups
    by_root = {g.root: g for g in groups}
    assert len(groups) == 20  # 8 resnet inner, 4 attention inner, 8 streams
    # Every resnet's inner channels and every attention's inner dims form a prunable group.
    for name in dict(tiny_unet().named_modules()):
        if name.endswith("conv1") and "resnets" in name:
            assert any((name, True) == (mem[0], mem[1]) for g in groups for mem in g.members)
        if name.endswith("to_v"):
            g = by_root[name]
            names = {mem[0] for mem in g.members}
            assert {name[:-1] + "q", name[:-1] + "k", name.replace("to_v", "to_out.0")} <= names
            assert g.n_sets == 8  # 8 heads of dim 8: pruned equally within every head
    # The level-0 stream couples conv_in, down.0 and both skip concatenations of up.1.
    stream = by_root["conv_in"]
    names = {mem[0] for mem in stream.members}
    assert {"down_blocks.0.resnets.0.conv2", "up_blocks.1.resnets.0.norm1"} <= names
    assert "up_blocks.1.resnets.1.conv_shortcut" in names and stream.block == "down.0"
    # The time embedding is never pruned; conv_out's outputs are never pruned.
    members = {(mem[0], mem[1]) for g in groups for mem in g.members}
    assert not any(n.startswith(("time_embedding", "class_embedding")) for n, _ in members)
    assert ("conv_out", True) not in members and ("conv_out", False) in members


def test_pruned_channels_match_torch_pruning_surgery(pruners) -> None:
    """Our slicing equals torch-pruning's own group.prune() on the same root channels."""
    pruner = pruners["attn+cls"]
    cut = pruner.cut_for({"down.0": 0.25, "down.1": 0.5, "mid": 0.4, "up.0": 0.3, "up.1": 0.5})
    ours = pruner.build(cut)

    ref = copy.deepcopy(pruner.model)
    graph = tp.DependencyGraph().build_dependency(
        ref,
        example_inputs=example_inputs(ref),
        forward_fn=lambda m, kw: m(**kw),
        output_transform=lambda out: out.sample,
    )
    for g, c in zip(pruner.groups, cut, strict=True):
        if c:
            root = ref.get_submodule(g.root)
            fn = tp.prune_conv_out_channels if isinstance(root, nn.Conv2d) else None
            fn = fn or tp.prune_linear_out_channels
            graph.get_pruning_group(root, fn, g.removed(c).tolist()).prune()
    sync_attributes(ref)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }
    with torch.no_grad():
        torch.testing.assert_close(ours(**_inputs(ours)).sample, ref(**_inputs(ref)).sample)


@pytest.mark.parametrize("variant", ["attn+cls", "plain", "attn"])
@pytest.mark.parametrize("fraction", [0.5, 0.7])
def test_prune_to_budget_within_two_percent(pruners, variant: str, fraction: float) -> None:
    pruner = pruners[variant]
    budget = fraction * pruner.base_flops
    result = pruner.prune_to_budget(budget)
    assert result.flops == model_flops(result.model)  # measured on the built model
    assert abs(result.flops - budget) <= 0.02 * budget
    assert all(0.0 < r < 0.9 for r in result.ratios.values())
    _check_valid(result.model)
    if variant != "plain":
        attn = result.model.mid_block.attentions[0]
        assert attn.heads == 8 and attn.to_q.out_features == attn.inner_dim < 64


def test_flops_of_a_cut_equal_the_measured_flops(pruners) -> None:
    rng = np.random.default_rng(0)
    for pruner in pruners.values():
        for _ in range(3):
            cut = tuple(int(rng.integers(g.per_set)) for g in pruner.groups)
            assert pruner.flops(cut) == model_flops(pruner.build(cut))


def test_shape_is_respected(pruners) -> None:
    pruner = pruners["attn+cls"]
    shape = {"down.0": 0.0, "down.1": 0.0, "mid": 0.0, "up.0": 1.0, "up.1": 0.0}
    result = pruner.prune_to_budget(0.8 * pruner.base_flops, shape)
    assert result.ratios["up.0"] > 0
    assert all(result.ratios[b] == 0 for b in ("down.0", "down.1", "mid", "up.1"))
    assert abs(result.flops / pruner.base_flops - 0.8) <= 0.02 * 0.8


def test_budget_edge_cases(pruners) -> None:
    pruner = pruners["plain"]
    full = pruner.prune_to_budget(1.0 * pruner.base_flops)
    assert full.flops == pruner.base_flops and not any(full.ratios.values())
    with pytest.raises(BudgetError, match="reaches"):
        pruner.prune_to_budget(0.01 * pruner.base_flops)
    with pytest.raises(BudgetError, match="prunes nothing"):
        pruner.prune_to_budget(0.5 * pruner.base_flops, dict.fromkeys(pruner.blocks, 0.0))
    with pytest.raises(ValueError, match="shape must map blocks"):
        pruner.prune_to_budget(0.5 * pruner.base_flops, {"nope": 1.0})
    with pytest.raises(ValueError, match="outside"):
        pruner.prune({"mid": 0.95})


def test_taylor_importance_uses_the_group_loss() -> None:
    model = tiny_unet()
    before = copy.deepcopy(model.state_dict())
    sched = DDPMScheduler(num_train_timesteps=1000)
    gen = torch.Generator().manual_seed(0)
    data = Batch(torch.rand(32, 1, 16, 16, generator=gen) * 2 - 1, torch.arange(32) % 10)
    low = UNetPruner.from_denoising(model, sched, data, (0, 100), n_timesteps=2, batch_size=8)
    high = UNetPruner.from_denoising(model, sched, data, (900, 1000), n_timesteps=2, batch_size=8)
    assert low.taylor_pairs == high.taylor_pairs == 32 * 2
    assert all(p.grad is None for p in model.parameters())  # the caller's model is untouched
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    mag = UNetPruner(model, "magnitude")
    for a, b, c in zip(low.groups, high.groups, mag.groups, strict=True):
        assert a.root == b.root == c.root and (a.importance >= 0).all()
    pairs = list(zip(low.groups, high.groups, mag.groups, strict=True))
    assert all(not np.allclose(a.importance, b.importance) for a, b, _ in pairs)  # other t
    assert any(tuple(a.removed(2)) != tuple(c.removed(2)) for a, _, c in pairs)  # not magnitude
    with pytest.raises(ValueError, match="no gradient"):
        UNetPruner(model, "taylor")
    result = prune_to_budget(
        model, 0.6 * mag.base_flops, scheduler=sched, data=data, t_range=(0, 100)
    )
    assert abs(result.flops / mag.base_flops - 0.6) <= 0.02 * 0.6


def test_stratified_timesteps() -> None:
    assert stratified_timesteps((0, 100), 4).tolist() == [12, 37, 62, 87]  # stratum midpoints
    t = stratified_timesteps((500, 1000), 16)
    width = 500 / 16
    assert all(500 + i * width <= v < 500 + (i + 1) * width for i, v in enumerate(t.tolist()))
    assert stratified_timesteps((10, 13), 8).tolist() == [10, 11, 12]  # every timestep once
    with pytest.raises(ValueError, match="non-empty range"):
        stratified_timesteps((5, 5), 4)


class _Scale(nn.Module):
    """``a * x_t`` as the noise prediction: loss and gradient are known in closed form."""

    def __init__(self, a: float) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels=None) -> SimpleNamespace:
        return SimpleNamespace(sample=self.a * x)


def test_taylor_gradients_average_images_over_the_groups_timesteps() -> None:
    """With eps_hat = a x_t, x_t = sqrt(abar) x0 + sqrt(1 - abar) eps: at a = 0 the gradient
    dL/da = -2 E[eps x_t] = -2 sqrt(1 - abar); at a = 1 the loss is abar E[x0^2] +
    (1 - sqrt(1 - abar))^2, falling with t. ``taylor_gradients`` must return the gradient's
    mean over the stratified timesteps of the range (every image at each) and stop where
    Diff-Pruning's threshold says."""
    sched = DDPMScheduler(num_train_timesteps=1000)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(64, 1, 16, 16, generator=gen) * 2 - 1
    data, x2 = Batch(images), float((images**2).mean())
    abar = sched.alphas_cumprod.double()
    for t_range in [(0, 1000), (900, 1000)]:  # the gradient is the group's own
        ts = stratified_timesteps(t_range, 8)
        model = _Scale(0.0)
        assert taylor_gradients(model, sched, data, t_range, 8, batch_size=24) == 64 * 8
        expected = float((-2 * (1 - abar[ts]).sqrt()).mean())
        assert float(model.a.grad) == pytest.approx(expected, rel=0.03)
    ts = stratified_timesteps((0, 1000), 8)
    losses = abar[ts] * x2 + (1 - (1 - abar[ts]).sqrt()) ** 2
    thr = 0.3
    ratio = [float(v / losses[: i + 1].max()) for i, v in enumerate(losses)]
    assert all(abs(r / thr - 1) > 0.2 for r in ratio)  # no timestep near the threshold
    stop = next(i for i, r in enumerate(ratio) if r < thr)
    assert 0 < stop < 7
    assert taylor_gradients(_Scale(1.0), sched, data, (0, 1000), 8, threshold=thr) == 64 * (
        stop + 1
    )


@pytest.mark.parametrize("variant", ["attn+cls", "plain"])
def test_save_load_round_trip(pruners, tmp_path, variant: str) -> None:
    result = pruners[variant].prune_to_budget(0.5 * pruners[variant].base_flops)
    save_pruned(result.model, tmp_path / "m")
    assert {p.name for p in (tmp_path / "m").iterdir()} == {"model.safetensors", "pruned.json"}
    loaded = load_pruned(tmp_path / "m")
    assert model_flops(loaded) == result.flops
    with torch.no_grad():
        a = result.model(**_inputs(result.model)).sample
        b = loaded(**_inputs(loaded)).sample
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    description = json.loads((tmp_path / "m" / "pruned.json").read_text())
    description["modules"]["conv_in"]["out"] = 8  # inconsistent with the saved weights
    (tmp_path / "m" / "pruned.json").write_text(json.dumps(description))
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_pruned(tmp_path / "m")
