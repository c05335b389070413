"""Pure accounting and the trainer's typed pieces: FLOPs totals, DRO cost, the shared noise
draw, hook fields in the resume key, the export loader's class resolution."""

from __future__ import annotations

import json

import pytest
import torch

from dedt_ray.config import load_config
from dedt_ray.diffusion.core import LossConfig, draw_noise
from dedt_ray.diffusion.export import load_denoiser
from dedt_ray.diffusion.job import PlainLoss, ScratchModel, hook_key
from dedt_ray.diffusion.trainer import resume_key
from dedt_ray.reweight.cost import cost_fraction, dro_cost, equal_steps, train_flops_estimate
from dedt_ray.reweight.dro import DROSpec
from dedt_ray.tdc.budget import (
    sampling_totals,
    search_flops,
    stage2_steps,
    training_totals,
)
from dedt_ray.tdc.pruning import PrunedModel


def test_training_totals_against_the_baseline() -> None:
    under = training_totals(stage1=60, search=5, stage2=30, baseline=100)
    assert under["total_flops"] == 95 and under["within_baseline"]
    assert under["ratio_to_baseline"] == pytest.approx(0.95)
    over = training_totals(stage1=100, search=5, stage2=30, baseline=100)
    assert not over["within_baseline"] and over["ratio_to_baseline"] == pytest.approx(1.35)
    assert training_totals(1, 0, 0, 0)["ratio_to_baseline"] is None


def test_stage2_steps_fill_what_the_budget_leaves() -> None:
    # baseline 1000, stage 1 500, search 60: 440 left for groups of 100 + 60 FLOPs per step
    assert stage2_steps(1000, 500, 60, [100, 60]) == 2
    steps = stage2_steps(1000, 500, 60, [100, 60])
    assert training_totals(500, 60, steps * 160, 1000)["within_baseline"]
    assert not training_totals(500, 60, (steps + 1) * 160, 1000)["within_baseline"]
    assert stage2_steps(1000, 900, 200, [100]) == 0  # nothing left
    assert load_config(None, ["tdc.stage1_fraction=0.3"]).tdc.stage1_steps(1000) == 300
    with pytest.raises(ValueError):
        stage2_steps(1000, 0, 0, [0])


def test_sampling_totals_ratio() -> None:
    out = sampling_totals(routed_flops_per_image=750, base_fwd=20, n_timesteps=50)
    assert out["single_flops_per_image"] == 1000 and out["ratio"] == pytest.approx(0.75)


def test_search_flops_by_hand() -> None:
    # 64 Taylor (image, t) pairs; candidates fine-tuned 3 steps of 16 images, 20 held out;
    # the failed round (None) ran nothing
    base, cands = 1000, [400, None, 600]
    taylor = 3 * base * 64
    scored = sum(3 * f * 3 * 16 + f * 20 for f in (400, 600))
    assert search_flops(base, 64, cands, 3, 16, 20) == taylor + scored
    assert search_flops(base, 64, [], 3, 16, 20) == taylor


def test_dro_cost_by_hand() -> None:
    cost = dro_cost(
        reference_training=1000,
        proxy_flops_per_step=30,
        proxy_steps=10,
        reference_forward_per_micro_batch=4,
        micro_batches_per_step=2,
    )
    assert cost.parts() == {
        "reference_training": 1000,
        "proxy_training": 300,
        "reference_forward": 80,
    }
    assert cost.total == 1380
    estimate = train_flops_estimate(100, 30, train_batch=64, measured_batch=32)
    assert estimate == 6000 and cost_fraction(cost.total, estimate) == pytest.approx(0.23)
    assert cost_fraction(5, 0.0) is None
    # equal reference and proxy steps: 0.08 x 1e6 FLOPs over 700 FLOPs per (ref + proxy) pair
    assert equal_steps(0.08, 1e6, 700) == 114 and equal_steps(0.08, 1e3, 700) == 1


def test_noise_draw_order_is_t_noise_labels() -> None:
    x0, labels = torch.zeros(4, 1, 2, 2), torch.arange(4)
    cfg = LossConfig(label_dropout=0.5, null_class=9, t_range=(10, 20))
    draw = draw_noise(x0, labels, 100, torch.Generator().manual_seed(3), cfg)
    gen = torch.Generator().manual_seed(3)
    t = torch.randint(10, 20, (4,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    drop = torch.rand(4, generator=gen) < 0.5
    assert torch.equal(draw.t, t) and torch.equal(draw.noise, noise)
    assert torch.equal(draw.cond, torch.where(drop, torch.full_like(labels, 9), labels))
    unconditional = draw_noise(x0, labels, 100, gen, LossConfig())
    assert unconditional.cond is None  # no null class: the model takes no labels


def test_hooks_reach_the_resume_key() -> None:
    cfg = load_config(None, [])
    plain = resume_key(cfg, {})
    assert plain == resume_key(cfg, {}, ScratchModel(), PlainLoss())
    a = resume_key(cfg, {}, loss=DROSpec("ref", 10, eta=1.0, smoothing=1e-3))
    b = resume_key(cfg, {}, loss=DROSpec("ref", 10, eta=2.0, smoothing=1e-3))
    assert len({plain, a, b}) == 3
    assert resume_key(cfg, {}, PrunedModel("g0")) != resume_key(cfg, {}, PrunedModel("g1"))
    assert hook_key(DROSpec("r", 3, 1.0, 0.0))["type"] == "dedt_ray.reweight.dro.DROSpec"


def test_export_loader_imports_only_diffusers_or_dedt_ray(tmp_path) -> None:
    (tmp_path / "model_index.json").write_text(json.dumps({"unet": ["os", "system"]}))
    with pytest.raises(ValueError, match="not diffusers nor dedt_ray"):
        load_denoiser(str(tmp_path))
