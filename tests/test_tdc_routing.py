"""RoutedUNet: per-group models behind one forward, under DDPM and DDIM sampling loops."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from dedt_ray.tdc.budget import model_flops
from dedt_ray.tdc.grouping import group_of, group_timesteps
from dedt_ray.tdc.pruning import UNetPruner
from dedt_ray.tdc.routing import (
    RoutedUNet,
    load_routed,
    sampling_flops,
    save_routed,
    scheduler_config,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def routed(tiny_unet) -> RoutedUNet:
    sched = DDPMScheduler(num_train_timesteps=1000)
    groups = group_timesteps(sched, 3, "quantile")
    small = UNetPruner(tiny_unet(2), "magnitude")
    models = [tiny_unet(0), tiny_unet(1), small.prune_to_budget(0.5 * small.base_flops).model]
    return RoutedUNet(models, groups, scheduler_config(sched))


def _sample(routed: RoutedUNet, scheduler, steps: int) -> dict[int, list[int]]:
    """Run a sampling loop; return the timesteps each group's model saw."""
    seen: dict[int, list[int]] = {i: [] for i in range(len(routed.models))}
    hooks = [
        m.register_forward_pre_hook(lambda _, args, i=i: seen[i].extend(args[1].tolist()))
        for i, m in enumerate(routed.models)
    ]
    scheduler.set_timesteps(steps)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 2])
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = routed(x, t, class_labels=labels).sample
            x = scheduler.step(eps, t, x).prev_sample
    for h in hooks:
        h.remove()
    assert torch.isfinite(x).all()
    return seen


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_every_timestep_goes_to_its_group(routed: RoutedUNet, kind: str) -> None:
    cls = DDPMScheduler if kind == "ddpm" else DDIMScheduler
    scheduler = cls(num_train_timesteps=1000)
    seen = _sample(routed, scheduler, 10)
    expected = [int(t) for t in scheduler.timesteps]
    assert sorted(t for ts in seen.values() for t in set(ts)) == sorted(expected)
    for i, ts in seen.items():
        assert ts and all(group_of(t, routed.groups) == i for t in ts), (i, ts)
        assert len(ts) == 2 * len(set(ts))  # the whole batch of 2, every step


def test_ddim_respaced_timesteps_are_original_scale() -> None:
    ddim = DDIMScheduler(num_train_timesteps=1000)
    ddim.set_timesteps(10)
    assert ddim.timesteps.tolist() == list(range(900, -1, -100))


def test_mixed_batch_is_split_per_group(routed: RoutedUNet) -> None:
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([999, 5, 500, 340])
    labels = torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        out = routed(x, t, class_labels=labels).sample
        for row, g in enumerate([2, 0, 1, 1]):
            alone = routed.models[g](x[row : row + 1], t[row : row + 1], labels[row : row + 1])
            torch.testing.assert_close(out[row : row + 1], alone.sample)
        (tuple_out,) = routed(x, t, class_labels=labels, return_dict=False)
    torch.testing.assert_close(tuple_out, out)
    with pytest.raises(ValueError, match="timestep 1000 is outside"):
        routed(x, torch.tensor([1000, 0, 0, 0]), class_labels=labels)


def test_save_load_round_trip(routed: RoutedUNet, tmp_path) -> None:
    save_routed(routed, tmp_path / "r")
    routing = json.loads((tmp_path / "r" / "routing.json").read_text())
    assert routing["groups"] == [[0, 333], [333, 667], [667, 1000]]
    assert routing["models"] == ["group_00", "group_01", "group_02"]
    loaded = load_routed(tmp_path / "r")
    assert loaded.groups == routed.groups
    scheduler = loaded.make_scheduler()
    assert isinstance(scheduler, DDPMScheduler) and scheduler.config.num_train_timesteps == 1000
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    t, labels = torch.tensor([10, 400, 800]), torch.tensor([0, 1, 2])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, labels).sample, routed(x, t, labels).sample)


def test_sampling_flops(routed: RoutedUNet) -> None:
    per_model = [model_flops(m) for m in routed.models]
    assert per_model[2] < 0.52 * per_model[0]
    ddim = DDIMScheduler(num_train_timesteps=1000)
    # 10 DDIM steps 900..0: t < 333 -> 4 steps, 333 <= t < 667 -> 3, t >= 667 -> 3.
    expected = 4 * per_model[0] + 3 * per_model[1] + 3 * per_model[2]
    assert sampling_flops(routed, ddim, 10) == expected
    assert ddim.num_inference_steps is None  # the caller's scheduler is untouched
