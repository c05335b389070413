"""Reweighting without Ray: config checks, CLI exit codes, the DRO proxy loss, its state."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dedt_ray.config import ConfigError, ModelConfig, load_config
from dedt_ray.diffusion.core import LossConfig, denoising_loss, train_step, zero_prediction_loss
from dedt_ray.diffusion.models import ModelSpec, build_noise_scheduler, build_unet
from dedt_ray.reweight import DROLoss
from dedt_ray.reweight.checks import (
    check_reference_classes,
    check_reweight,
    pretrained_unet_dir,
    proxy_model,
    stage_config,
)
from dedt_ray.reweight.plan import plan_dro
from dedt_ray.smoke import SMOKE_UNET

TINY = SMOKE_UNET
TINY_OVERRIDES = ["data.image_size=8", "model.block_out_channels=[16,32]"]


pytestmark = pytest.mark.usefixtures("one_thread")


def unet(seed: int, num_classes: int = 3, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_unet(ModelConfig(**{**TINY, **kw}), ModelSpec(8, 1, num_classes))


def batch(n: int = 12, k: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
    labels = torch.arange(n) % k
    t = torch.randint(0, 1000, (n,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    return x0, labels, t, noise


# -- config ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("reweight.eta=0", "reweight.eta"),
        ("reweight.eta=-1", "reweight.eta"),
        ("reweight.smoothing=1", "reweight.smoothing"),
        ("reweight.smoothing=-0.1", "reweight.smoothing"),
        ("reweight.steps=0", "reweight.steps"),
        ("reference.data=half", "reference.data"),
    ],
)
def test_bad_reweight_config_is_rejected(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


def test_defaults_and_derived_stage_configs():
    cfg = load_config(None, [])
    assert cfg.reweight.enabled and cfg.reweight.eta == 1.0 and cfg.reweight.smoothing == 1e-3
    assert cfg.reference.data == "full" and cfg.reweight.budget == 0.08  # DoReMi's setup
    groups = cfg.model.norm_num_groups
    half = [max(groups, c // 2 // groups * groups) for c in cfg.model.block_out_channels]
    assert proxy_model(cfg).block_out_channels == half == [8, 16, 32]
    rcfg = stage_config(cfg, "reweight", 7)
    assert rcfg.model.block_out_channels == half and rcfg.train.steps == 7
    assert rcfg.train.batch_size == cfg.train.batch_size and rcfg.train.lr == cfg.train.lr
    assert rcfg.train.warmup_steps == min(cfg.train.warmup_steps, 7 // 10)
    assert rcfg.train.class_weighting == "sampling"
    assert cfg.train.steps != 7 and cfg.model.block_out_channels != half  # untouched
    cfg = load_config(None, ["reweight.proxy_model={block_out_channels: [16, 16]}"])
    assert proxy_model(cfg).block_out_channels == [16, 16]
    with pytest.raises(ConfigError, match="reweight.proxy_model.*block_out_channels"):
        check_reweight(load_config(None, ["reweight.proxy_model={block_out_channels: [12]}"]))
    with pytest.raises(ConfigError, match="reweight: .*must be a multiple"):
        check_reweight(load_config(None, ["train.num_workers=2", "reweight.batch_size=7"]))
    check_reweight(load_config(None, ["reweight.enabled=false", "reweight.batch_size=7"]))


def test_plan_spends_the_budget_on_equal_steps():
    spec = ModelSpec(8, 1, 10)
    cfg = load_config(None, [*TINY_OVERRIDES, "train.steps=200", "train.batch_size=16"])
    plan = plan_dro(cfg, spec, 200)
    assert plan.reference_steps == plan.proxy_steps > 1
    pair = plan.reference_step_flops + plan.proxy_step_flops + plan.reference_forward_flops
    assert plan.proxy_steps == int(0.08 * plan.final_flops // pair)
    assert plan.planned_fraction <= 0.08 < plan.planned_fraction + pair / plan.final_flops
    # the small model: about a quarter of the final model's FLOPs (half the widths)
    final_step = plan.final_flops / cfg.train.steps
    assert 0.15 < plan.proxy_step_flops / final_step < 0.4
    assert plan_dro(cfg, spec, 400).proxy_steps >= 2 * plan.proxy_steps - 1
    explicit = load_config(None, [*TINY_OVERRIDES, "reference.steps=3", "reweight.steps=5"])
    planned = plan_dro(explicit, spec, 200)
    assert (planned.reference_steps, planned.proxy_steps) == (3, 5)


def test_plan_follows_an_epoch_budget_not_the_step_ceiling():
    """With `train.epochs` the final training runs ceil(epochs x rows / batch) steps, whatever
    `train.steps` says: the stages plan DRO from that (`budget_steps`)."""
    from dedt_ray.diffusion.trainer import budget_steps

    spec = ModelSpec(8, 1, 10)
    over = [*TINY_OVERRIDES, "train.steps=2400", "train.batch_size=16", "train.epochs=10"]
    cfg = load_config(None, over)
    steps = budget_steps(cfg, 160)
    assert steps == 100
    plan = plan_dro(cfg, spec, steps)
    assert plan.final_flops == plan_dro(cfg, spec, 100).final_flops
    assert plan.final_flops * 24 == pytest.approx(plan_dro(cfg, spec, 2400).final_flops)


def _save_unet(path, **kw) -> None:
    unet(0, **kw).save_pretrained(str(path))


def test_pretrained_folder_validation(tmp_path):
    _save_unet(tmp_path / "bare")
    assert pretrained_unet_dir(str(tmp_path / "bare")) == str(tmp_path / "bare")
    _save_unet(tmp_path / "pipe" / "unet")
    assert pretrained_unet_dir(str(tmp_path / "pipe")) == str(tmp_path / "pipe" / "unet")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    for bad, match in [
        ("vae", "not a diffusers UNet2DModel folder"),
        ("noweights", "no weights"),
        ("missing", "does not exist"),
    ]:
        with pytest.raises(ConfigError, match=match):
            pretrained_unet_dir(str(tmp_path / bad))


@pytest.mark.parametrize(
    "override",
    ["reweight.eta=0", "reweight.smoothing=1.5", "reference.pretrained={tmp}"],
)
def test_cli_exits_2_before_any_ray_work(tmp_path, capsys, override):
    from dedt_ray.cli import main

    run_dir = tmp_path / "run"
    code = main(["reweight", "--run-dir", str(run_dir), override.format(tmp=tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert override.split("=")[0] in err
    assert not run_dir.exists()


# -- the DRO proxy loss ------------------------------------------------------------------
def _hand_update(alpha, lp, lr, labels, eta, c, previous):
    """DoReMi's step by hand: per-class mean of max(lp - lr, 0) over every sample of the step
    (absent classes keep `previous`), then softmax(log alpha + eta excess) mixed with uniform."""
    excess = list(previous)
    for k in range(len(alpha)):
        gaps = [max(a - b, 0.0) for a, b, y in zip(lp, lr, labels, strict=True) if y == k]
        if gaps:
            excess[k] = sum(gaps) / len(gaps)
    z = [np.log(a) + eta * e for a, e in zip(alpha, excess, strict=True)]
    soft = np.exp(np.asarray(z) - max(z))
    soft = soft / soft.sum()
    return (1 - c) * soft + c / len(alpha), excess


def test_dro_updates_once_per_optimizer_step_from_every_micro_batch():
    proxy, reference = unet(0), unet(1)
    sched = build_noise_scheduler(ModelConfig(**TINY))
    x0, labels, t, noise = batch(12)
    labels = torch.tensor([0, 0, 1, 1, 0, 1, 0, 0, 1, 1, 0, 1])  # class 2 is absent
    dro = DROLoss(reference, num_classes=3, eta=2.0, smoothing=0.01, initial_excess=1.0)
    halves = (slice(0, 6), slice(6, 12))
    losses = [dro.loss(proxy, sched, x0[h], labels[h], t[h], noise[h]) for h in halves]
    np.testing.assert_allclose(dro.dro.weights, 1 / 3)  # no update inside the step
    dro.after_step(1)
    with torch.no_grad():  # by hand: the same (x_t, t, noise) and labels for both models
        lp = denoising_loss(proxy, sched, x0, labels, t, noise).tolist()
        lr = denoising_loss(reference, sched, x0, labels, t, noise).tolist()
    want, excess = _hand_update([1 / 3] * 3, lp, lr, labels.tolist(), 2.0, 0.01, [1.0] * 3)
    np.testing.assert_allclose(dro.dro.weights, want, rtol=1e-6)
    np.testing.assert_allclose(dro.dro.excess, excess, rtol=1e-6)
    assert dro.dro.num_updates == 1 and dro.dro.excess[2] == 1.0  # unseen: initial excess
    assert dro.dro.weights[2] == max(dro.dro.weights)  # not pushed down before it is seen
    for h, loss in zip(halves, losses, strict=True):  # uniform weights during the step
        assert loss.item() == pytest.approx(np.mean(lp[h]), rel=1e-5)
    assert dro.trace()["present"].tolist() == [[1.0, 1.0, 0.0]]
    sum(losses).backward()
    assert all(p.grad is None for p in reference.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in proxy.parameters())


def test_dro_loss_reference_labels():
    x0, labels, t, noise = batch(6)
    sched = build_noise_scheduler(ModelConfig(**TINY))
    with_null = DROLoss(unet(1, num_classes=3), 3, 1.0, 0.0)  # 4 embeddings
    assert torch.equal(with_null._reference_labels(labels, True), labels)  # identical inputs
    assert torch.equal(with_null._reference_labels(labels, False), torch.full((6,), 3))
    torch.manual_seed(0)
    no_null = build_unet(ModelConfig(**TINY), ModelSpec(8, 1, 3))
    no_null.register_to_config(num_class_embeds=3)
    assert torch.equal(DROLoss(no_null, 3, 1.0, 0.0)._reference_labels(labels, True), labels)
    uncond = DROLoss(unet(1, num_classes=0), 3, 1.0, 0.0)
    assert uncond._reference_labels(labels, False) is None
    # an unconditional proxy and reference still group the losses by the true labels
    proxy = unet(0, num_classes=0)
    uncond.loss(proxy, sched, x0, labels, t, noise)
    uncond.after_step(1)
    with torch.no_grad():
        gap = denoising_loss(proxy, sched, x0, None, t, noise) - denoising_loss(
            uncond.reference, sched, x0, None, t, noise
        )
    by_class = [gap[labels == c].clamp_min(0).mean().item() for c in range(3)]
    np.testing.assert_allclose(uncond.dro.excess, by_class, rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="class embeddings"):
        DROLoss(unet(1, num_classes=5), 3, 1.0, 0.0)
    check_reference_classes(4, 3, True)
    check_reference_classes(None, 3, False)
    for embeds, conditional in [(None, True), (3, False), (5, True)]:
        with pytest.raises(ConfigError, match=f"{embeds} class embeddings.*{3} classes"):
            check_reference_classes(embeds, 3, conditional)


def test_dro_hook_in_train_step_trace_and_state_round_trip():
    sched = build_noise_scheduler(ModelConfig(**TINY))
    cfg = LossConfig(label_dropout=0.2, null_class=3)

    def run(steps: int, dro: DROLoss, proxy: torch.nn.Module, opt, start: int = 0):
        for step in range(start, steps):
            x0, labels, _, _ = batch(12, seed=step)
            g = torch.Generator().manual_seed(step)
            sched_lr = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
            micro = [(x0[:6], labels[:6], None), (x0[6:], labels[6:], None)]
            train_step(proxy, sched, opt, sched_lr, micro, g, cfg, 1.0, loss_fn=dro)
            dro.after_step(step + 1)

    proxy = unet(0)
    opt = torch.optim.Adam(proxy.parameters(), lr=1e-3)
    dro = DROLoss(unet(1), 3, 1.0, 1e-3)
    run(4, dro, proxy, opt)
    assert dro.dro.num_updates == 4  # one update per optimizer step, not per micro-batch
    trace = dro.trace()
    assert trace["step"].tolist() == [1, 2, 3, 4] and trace["weight"].shape == (4, 3)
    np.testing.assert_allclose(trace["weight"][-1], dro.dro.weights)
    np.testing.assert_allclose(trace["weight"].sum(1), 1.0)

    # stop after 2 steps, save through the checkpoint format, resume: same trace as above
    from dedt_ray.diffusion.state import flatten, unflatten

    proxy2 = unet(0)
    opt2 = torch.optim.Adam(proxy2.parameters(), lr=1e-3)
    first = DROLoss(unet(1), 3, 1.0, 1e-3)
    run(2, first, proxy2, opt2)
    tensors: dict[str, torch.Tensor] = {}
    structure = json.loads(json.dumps(flatten(first.state_dict(), tensors, "s")))
    resumed = DROLoss(unet(1), 3, 1.0, 1e-3)
    resumed.load_state_dict(unflatten(structure, tensors))
    run(4, resumed, proxy2, opt2, start=2)
    for name in ("step", "weight", "average", "excess"):
        np.testing.assert_allclose(resumed.trace()[name], trace[name], rtol=1e-5)
    assert resumed.dro.num_updates == 4


def test_zero_prediction_loss():
    eps = build_noise_scheduler(ModelConfig(**TINY))
    assert zero_prediction_loss(eps) == pytest.approx(1.0)
    v = build_noise_scheduler(ModelConfig(**TINY, prediction_type="v_prediction"))
    abar = v.alphas_cumprod.double()
    assert zero_prediction_loss(v, None, 0.3) == pytest.approx(
        float((abar + (1 - abar) * 0.3).mean())
    )
    assert zero_prediction_loss(v, None, 1.0) == pytest.approx(1.0)
    snr = abar / (1 - abar)
    min_snr = (torch.clamp(snr, max=5.0) / snr).mean().item()
    assert zero_prediction_loss(eps, 5.0) == pytest.approx(min_snr)
