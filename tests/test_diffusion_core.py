"""The pure diffusion core: models, loss, step, stream, state, sampling, export (no Ray)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel

from dedt_ray.artifacts import read_class_weights
from dedt_ray.config import ConfigError, ModelConfig, load_config
from dedt_ray.diffusion.core import (
    LossConfig,
    build_lr_scheduler,
    build_optimizer,
    count_step_flops,
    denoising_loss,
    drop_labels,
    min_snr_weight,
    sample_timesteps,
    snr,
    train_step,
    training_loss,
)
from dedt_ray.diffusion.export import load_export, save_export
from dedt_ray.diffusion.models import (
    ModelSpec,
    build_noise_scheduler,
    build_unet,
    sampling_scheduler,
)
from dedt_ray.diffusion.sample import sample_labels
from dedt_ray.diffusion.sampling import from_uint8, generate, image_grid, to_uint8
from dedt_ray.diffusion.state import flatten, load_state, save_state, unflatten
from dedt_ray.diffusion.stream import IndexStream
from dedt_ray.diffusion.worker import step_seed
from dedt_ray.smoke import SMOKE_UNET

TINY = SMOKE_UNET


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(spec: ModelSpec | None = None, **kw) -> tuple[UNet2DModel, DDPMScheduler]:
    cfg = ModelConfig(**{**TINY, **kw})
    torch.manual_seed(0)
    return build_unet(cfg, spec or ModelSpec(8, 1, 3)), build_noise_scheduler(cfg)


# -- models --------------------------------------------------------------------------------
def test_unet_from_config_class_embeddings_and_attention():
    unet, sched = tiny(attention_levels=[True, False])
    assert unet.config.num_class_embeds == 4  # 3 classes + the null class
    assert unet.config.down_block_types == ("AttnDownBlock2D", "DownBlock2D")
    assert unet.config.up_block_types == ("UpBlock2D", "AttnUpBlock2D")
    assert sched.config.beta_schedule == "linear" and sched.config.clip_sample is True
    latent_sched = build_noise_scheduler(ModelConfig(**TINY, latent=True, vae="v"))
    assert latent_sched.config.clip_sample is False
    assert ModelSpec(8, 1, 3).null_class == 3 and ModelSpec(8, 1, 0).null_class is None
    uncond, _ = tiny(ModelSpec(8, 1, 0))
    assert uncond.config.num_class_embeds is None


def test_cosine_schedule_and_v_prediction():
    _, sched = tiny(beta_schedule="cosine", prediction_type="v_prediction")
    assert sched.config.beta_schedule == "squaredcos_cap_v2"
    assert sched.config.prediction_type == "v_prediction"
    ddim = sampling_scheduler(sched, "ddim")
    assert ddim.config.prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="ddpm"):
        sampling_scheduler(sched, "euler")


# -- loss ----------------------------------------------------------------------------------
class Oracle(torch.nn.Module):
    """Returns a fixed target, to check which target the loss compares against."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = out

    def forward(self, x, t, class_labels=None):
        return type("Out", (), {"sample": self.out})()


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_denoising_loss_target(kind):
    _, sched = tiny(prediction_type=kind)
    x0, noise = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    t = torch.tensor([1, 500, 999])
    target = noise if kind == "epsilon" else sched.get_velocity(x0, noise, t)
    assert denoising_loss(Oracle(target), sched, x0, None, t, noise).abs().max() < 1e-6
    wrong = denoising_loss(Oracle(torch.zeros_like(x0)), sched, x0, None, t, noise)
    assert wrong.shape == (3,) and torch.allclose(wrong, target.pow(2).flatten(1).mean(1))


def test_timesteps_range_and_min_snr():
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(2000, 1000, g, t_range=(200, 300))
    assert t.min() >= 200 and t.max() < 300 and len(t.unique()) == 100
    with pytest.raises(ValueError):
        sample_timesteps(4, 1000, g, t_range=(300, 300))
    _, sched = tiny()
    s = snr(sched, torch.tensor([0, 999]))
    assert s[0] > 5 > s[1]  # almost clean vs almost pure noise
    w = min_snr_weight(s, 5.0, "epsilon")
    assert torch.allclose(w, torch.stack([5.0 / s[0], torch.tensor(1.0)]))
    assert torch.all(min_snr_weight(s, 5.0, "v_prediction") < 1)


def test_drop_labels_rate():
    labels = torch.zeros(20000, dtype=torch.long)
    out = drop_labels(labels, 0.1, 7, torch.Generator().manual_seed(0))
    assert set(out.unique().tolist()) == {0, 7}
    assert abs((out == 7).float().mean().item() - 0.1) < 0.01
    assert torch.equal(drop_labels(labels, 0.0, 7), labels)


def test_sample_weights_scale_the_loss():
    unet, sched = tiny()
    x0, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    cfg = LossConfig(null_class=3)

    def loss(w):
        return training_loss(unet, sched, x0, y, w, torch.Generator().manual_seed(1), cfg)

    base = loss(None)
    assert loss(torch.zeros(4)).item() == 0.0
    assert torch.allclose(loss(torch.full((4,), 2.0)), 2 * base)


def test_flops_counted_and_scale_with_batch():
    unet, sched = tiny()
    small = count_step_flops(unet, sched, torch.randn(2, 1, 8, 8), torch.tensor([0, 1]))
    big = count_step_flops(unet, sched, torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0]))
    assert small > 0 and abs(big / small - 2) < 0.05
    assert all(p.grad is None for p in unet.parameters())


def _run_steps(unet, sched, opt, lr, ema, data, steps, start=0):
    x, y = data
    for step in range(start, start + steps):
        g = torch.Generator().manual_seed(step_seed(0, 0, step))
        idx = torch.arange(step * 4, step * 4 + 4) % len(x)
        train_step(unet, sched, opt, lr, [(x[idx], y[idx], None)], g, LossConfig(0.1, 3), 1.0)
        ema.step(unet.parameters())


def test_train_step_learns_and_resume_is_exact(tmp_path):
    """Training decreases the loss; save/load of every state continues bit-exactly."""
    data = (torch.rand(8, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))

    def fresh():
        unet, sched = tiny()
        opt = build_optimizer(unet, 3e-3, 0.01)
        lr = build_lr_scheduler(opt, "cosine", 2, 12)
        return unet, sched, opt, lr, EMAModel(unet.parameters(), decay=0.9)

    ref = fresh()
    _run_steps(*ref, data, 12)
    part = fresh()
    _run_steps(*part, data, 6)
    unet, _, opt, lr, ema = part
    save_state(
        str(tmp_path),
        {"model": unet.state_dict(), "optimizer": opt.state_dict(), "lr": lr.state_dict(),
         "ema": ema.state_dict()},
    )  # fmt: skip
    assert json.load(open(tmp_path / "state.json"))  # the structure is plain JSON
    state = load_state(str(tmp_path))
    resumed = fresh()
    resumed[0].load_state_dict(state["model"])
    resumed[2].load_state_dict(state["optimizer"])
    resumed[3].load_state_dict(state["lr"])
    resumed[4].load_state_dict(state["ema"])
    _run_steps(*resumed, data, 6, start=6)
    for a, b in zip(ref[0].parameters(), resumed[0].parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(ref[4].shadow_params, resumed[4].shadow_params, strict=True):
        assert torch.equal(a, b)
    assert ref[3].get_last_lr() == resumed[3].get_last_lr()

    unet, sched, opt, lr, _ = fresh()
    x, y = data
    probe = LossConfig(null_class=3)

    def eval_loss():
        with torch.no_grad():
            g = torch.Generator().manual_seed(123)
            return training_loss(unet, sched, x, y, None, g, probe).item()

    before = eval_loss()
    lr = build_lr_scheduler(opt, "constant", 0, 60)
    for i in range(60):
        g = torch.Generator().manual_seed(i)
        train_step(unet, sched, opt, lr, [(x[:4], y[:4], None), (x[4:], y[4:], None)], g, probe)
    assert eval_loss() < 0.7 * before


# -- stream --------------------------------------------------------------------------------
def test_stream_uniform_is_a_permutation_per_chunk():
    labels = np.arange(10) % 3
    s = IndexStream(labels, seed=1)
    first, second = s.next(10), s.next(10)
    assert sorted(first) == list(range(10)) and sorted(second) == list(range(10))
    assert not np.array_equal(first, second)


def test_stream_class_weights_match_frequencies():
    labels = np.repeat([0, 1, 2], [500, 100, 20])  # imbalanced shard
    weights = np.array([0.2, 0.3, 0.5])
    s = IndexStream(labels, seed=0, rank=0, class_weights=weights)
    drawn = labels[s.next(30_000)]
    freq = np.bincount(drawn, minlength=3) / len(drawn)
    sigma = np.sqrt(weights * (1 - weights) / len(drawn))
    assert np.all(np.abs(freq - weights) < 4 * sigma)
    # within one chunk, rows of a class are reused evenly (a cycled permutation), not i.i.d.
    chunk = IndexStream(labels, seed=5, class_weights=weights).next(len(labels))
    counts = np.bincount(chunk, minlength=len(labels))[labels == 2]
    assert counts.min() >= 1 and counts.max() - counts.min() <= 1


def test_stream_ranks_differ_and_resume_continues():
    labels = np.arange(50) % 5
    a, b = IndexStream(labels, 3, rank=0), IndexStream(labels, 3, rank=1)
    assert not np.array_equal(a.next(50), b.next(50))
    full = IndexStream(labels, 3, rank=0, class_weights=np.ones(5))
    expected = np.concatenate([full.next(37), full.next(41)])
    head = IndexStream(labels, 3, rank=0, class_weights=np.ones(5))
    head.next(37)
    tail = IndexStream(labels, 3, rank=0, class_weights=np.ones(5))
    tail.load_state_dict(head.state_dict())
    assert np.array_equal(np.concatenate([expected[:37], tail.next(41)]), expected)


def test_stream_missing_class_and_bad_weights():
    labels = np.array([0, 0, 2, 2])
    s = IndexStream(labels, 0, class_weights=np.array([0.5, 0.25, 0.25]))
    assert set(labels[s.next(100)]) == {0, 2}  # class 1's weight is spread
    with pytest.raises(ValueError):
        IndexStream(labels, 0, class_weights=np.array([-1.0, 1.0, 1.0]))
    with pytest.raises(ValueError):
        IndexStream(labels, 0, class_weights=np.array([1.0, 1.0]))  # label 2 has no weight


# -- state and inputs ----------------------------------------------------------------------
def test_flatten_round_trip_nested_state():
    state = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2, 2)}},
        "param_groups": [{"betas": (0.9, 0.999), "params": [0], "lr": 1e-3, "foreach": None}],
    }
    tensors: dict = {}
    structure = flatten(state, tensors)
    json.dumps(structure)
    back = unflatten(structure, tensors)
    assert back["param_groups"][0]["betas"] == (0.9, 0.999)
    assert list(back["state"]) == [0] and torch.equal(back["state"][0]["exp_avg"], torch.ones(2, 2))
    with pytest.raises(TypeError):
        flatten({"f": object()}, {})


def test_read_class_weights():
    w = read_class_weights({"weights": {"0": 1.0, "1": 3.0}, "steps": 10}, 2)
    assert np.allclose(w, [0.25, 0.75])
    for bad in [
        {"weights": {"0": 1.0}},  # label 1 missing
        {"weights": {"0": 1.0, "x": 1.0}},
        {"weights": {"0": 1.0, "1": -1.0}},
        {"weights": {"0": 1.0, "2": 1.0}},
        {"weights": [1.0, 1.0]},
        {"weights": {"0": "1", "1": 1.0}},
    ]:
        with pytest.raises(ValueError):
            read_class_weights(bad, 2)


# -- sampling and export -------------------------------------------------------------------
def test_generate_labels_seed_guidance():
    unet, sched = tiny()
    unet.eval()

    def gen(kind, scale, seed=0):
        g = torch.Generator().manual_seed(seed)
        return generate(unet, sampling_scheduler(sched, kind), [0, 1, 2], 4, scale, g)

    a = gen("ddim", 1.0)
    assert a.shape == (3, 8, 8, 1) and a.dtype == np.uint8
    assert np.array_equal(a, gen("ddim", 1.0))
    assert not np.array_equal(a, gen("ddim", 1.0, seed=1))
    assert not np.array_equal(a, gen("ddim", 3.0))
    assert gen("ddpm", 2.0).shape == (3, 8, 8, 1)
    with pytest.raises(ValueError):
        generate(unet, sched, None, 2)


def test_uint8_round_trip_and_grid():
    images = np.random.default_rng(0).integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    assert np.array_equal(to_uint8(from_uint8(images)), images)
    grid = image_grid(images, ncols=2, scale=2)  # diffusers' make_image_grid: no separators
    assert grid.size == (2 * 2 * 4, 2 * 3 * 4)
    cells = np.asarray(image_grid(images, ncols=2))
    assert np.array_equal(cells[4:8, 4:8], images[3])  # row-major
    assert (cells[8:12, 4:8] == 255).all()  # the short last row is filled with white


def test_export_loads_with_diffusers(tmp_path):
    unet, sched = tiny(ModelSpec(8, 1, 0))
    save_export(str(tmp_path), unet, sched, {"num_classes": 0})
    assert os.path.isfile(tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    loaded = UNet2DModel.from_pretrained(str(tmp_path), subfolder="unet")
    for a, b in zip(unet.parameters(), loaded.parameters(), strict=True):
        assert torch.equal(a, b)
    loaded_sched = DDPMScheduler.from_pretrained(str(tmp_path), subfolder="scheduler")
    for key in ("num_train_timesteps", "beta_schedule", "prediction_type", "clip_sample"):
        assert loaded_sched.config[key] == sched.config[key]
    pipe = DDPMPipeline.from_pretrained(str(tmp_path))
    out = pipe(batch_size=2, num_inference_steps=2, output_type="np").images
    assert out.shape == (2, 8, 8, 1)


def test_latent_export_generates_decoded_images(tmp_path, tiny_vae):
    vae = tiny_vae().eval()
    unet, sched = tiny(ModelSpec(4, 4, 2, latent=True))
    save_export(str(tmp_path), unet, sched, {"num_classes": 2}, vae=vae)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_dedt_ray", "DedtRayPipeline"] and "vae" in index
    unet2, sched2, vae2, info = load_export(str(tmp_path))
    assert info["num_classes"] == 2 and vae2 is not None
    g = torch.Generator().manual_seed(0)
    images = generate(unet2, sampling_scheduler(sched2, "ddim"), [0, 1], 2, 1.5, g, vae=vae2)
    assert images.shape == (2, 8, 8, 1)


def test_sample_labels():
    info = {"num_classes": 3, "classes": ["a", "b", "c"]}
    assert sample_labels(5, None, info) == [0, 1, 2, 0, 1]
    assert sample_labels(4, "c,0", info) == [2, 0, 2, 0]
    assert sample_labels(2, None, {"num_classes": 0}) is None
    with pytest.raises(ValueError):
        sample_labels(2, "z", info)


def test_random_hflip_is_seeded_and_flips_whole_images():
    from dedt_ray.diffusion.worker import random_hflip

    x = torch.randn(64, 1, 4, 6)
    out = random_hflip(x, 7)
    mirrored = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, x, strict=True)])
    same = torch.tensor([torch.equal(o, i) for o, i in zip(out, x, strict=True)])
    assert bool((mirrored | same).all()) and 16 < int(mirrored.sum()) < 48
    assert torch.equal(random_hflip(x, 7), out) and not torch.equal(random_hflip(x, 8), out)
    with pytest.raises(ConfigError, match="hflip"):
        load_config(None, ["train.hflip=true", "model.latent=true", "model.vae=v"])
