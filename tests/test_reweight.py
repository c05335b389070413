"""Reweighting without Ray: config checks, CLI exit codes, the DRO proxy loss, its state."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dedt_ray.config import ConfigError, ModelConfig, load_config
from dedt_ray.diffusion.core import LossConfig, denoising_loss, train_step
from dedt_ray.diffusion.models import ModelSpec, build_noise_scheduler, build_unet
from dedt_ray.reweight import DROLoss, GroupDRO
from dedt_ray.reweight.checks import (
    check_reweight,
    pretrained_unet_dir,
    stage_config,
    stage_steps,
)
from dedt_ray.smoke import SMOKE_UNET

TINY = SMOKE_UNET


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
    steps = round(0.035 * cfg.train.steps)
    assert stage_steps(cfg, "reference") == stage_steps(cfg, "reweight") == steps
    rcfg = stage_config(cfg, "reweight")
    assert rcfg.train.steps == steps and rcfg.train.batch_size == cfg.train.batch_size
    assert rcfg.train.warmup_steps == min(cfg.train.warmup_steps, steps // 10)
    assert rcfg.train.class_weighting == "sampling" and rcfg.train.lr == cfg.train.lr
    assert cfg.train.steps != steps  # the original is untouched
    cfg = load_config(None, ["reference.steps=7", "reweight.steps=9", "reweight.batch_size=8"])
    assert stage_config(cfg, "reference").train.steps == 7
    assert stage_config(cfg, "reweight").train.batch_size == 8
    with pytest.raises(ConfigError, match="reweight: .*must be a multiple"):
        check_reweight(load_config(None, ["train.num_workers=2", "reweight.batch_size=7"]))
    check_reweight(load_config(None, ["reweight.enabled=false", "reweight.batch_size=7"]))


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
def test_dro_loss_is_one_groupdro_step_on_shared_noise():
    proxy, reference = unet(0), unet(1)
    sched = build_noise_scheduler(ModelConfig(**TINY))
    x0, labels, t, noise = batch()
    dro = DROLoss(reference, num_classes=3, eta=2.0, smoothing=0.01)
    loss = dro.loss(proxy, sched, x0, labels, labels, t, noise)
    with torch.no_grad():  # by hand: the same (x_t, t, noise) for both models
        lp = denoising_loss(proxy, sched, x0, labels, t, noise)
        lr = denoising_loss(reference, sched, x0, labels, t, noise)
    expected = GroupDRO(3, eta=2.0, smoothing=0.01)
    expected_loss = expected.step(lp, lr, labels)
    np.testing.assert_allclose(dro.dro.weights, expected.weights, rtol=1e-6)
    np.testing.assert_allclose(dro.dro.excess, expected.excess, rtol=1e-6)
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-6)
    assert not torch.allclose(dro.dro.weights, torch.full((3,), 1 / 3, dtype=torch.float64))
    loss.backward()
    assert all(p.grad is None for p in reference.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in proxy.parameters())


def test_dro_loss_reference_labels():
    x0, labels, t, noise = batch(6)
    sched = build_noise_scheduler(ModelConfig(**TINY))
    dropped = torch.tensor([0, 3, 2, 3, 1, 2])  # 3 = the null class
    with_null = DROLoss(unet(1, num_classes=3), 3, 1.0, 0.0)  # 4 embeddings
    assert torch.equal(with_null._reference_labels(labels, dropped), dropped)
    assert torch.equal(with_null._reference_labels(labels, None), torch.full((6,), 3))
    torch.manual_seed(0)
    no_null = build_unet(ModelConfig(**TINY), ModelSpec(8, 1, 3))
    no_null.register_to_config(num_class_embeds=3)
    assert torch.equal(DROLoss(no_null, 3, 1.0, 0.0)._reference_labels(labels, dropped), labels)
    uncond = DROLoss(unet(1, num_classes=0), 3, 1.0, 0.0)
    assert uncond._reference_labels(labels, dropped) is None
    # an unconditional proxy and reference still group the losses by the true labels
    proxy = unet(0, num_classes=0)
    uncond.loss(proxy, sched, x0, labels, None, t, noise)
    with torch.no_grad():
        gap = denoising_loss(proxy, sched, x0, None, t, noise) - denoising_loss(
            uncond.reference, sched, x0, None, t, noise
        )
    by_class = [gap[labels == c].clamp_min(0).mean().item() for c in range(3)]
    np.testing.assert_allclose(uncond.dro.excess, by_class, rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="class embeddings"):
        DROLoss(unet(1, num_classes=5), 3, 1.0, 0.0)


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
            dro.record(step + 1)

    proxy = unet(0)
    opt = torch.optim.Adam(proxy.parameters(), lr=1e-3)
    dro = DROLoss(unet(1), 3, 1.0, 1e-3)
    run(4, dro, proxy, opt)
    assert dro.dro.num_updates == 8  # one update per micro-batch
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
    assert resumed.dro.num_updates == 8
