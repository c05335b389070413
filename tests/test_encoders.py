"""Encoder registry: every encoder built from a tiny random-weight model saved to disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dedt_ray.encoders import ENCODERS, Encoder, Preprocessor, build_encoder, build_preprocessor

from tiny_models import random_inception, save_clip, save_dinov2
from tiny_models import vision_config as _vision

MODEL_ENCODERS = ["clip", "clip_full", "clip_tower", "dinov2", "vit", "vae", "inception"]


def _images(n: int, size: int, channels: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), dtype=np.uint8)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random-weight checkpoints, saved the way the real ones are."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file
    from transformers import (
        CLIPConfig,
        CLIPModel,
        CLIPVisionConfig,
        CLIPVisionModel,
        ViTConfig,
        ViTModel,
    )

    root = tmp_path_factory.mktemp("models")
    save_clip(root / "clip")
    clip = _vision(intermediate_size=37, projection_dim=16)
    CLIPVisionModel(CLIPVisionConfig(**clip)).save_pretrained(root / "clip_tower")
    text = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2)
    text |= dict(num_attention_heads=2, max_position_embeddings=16)
    full = CLIPConfig(text_config=text, vision_config=clip, projection_dim=16)
    CLIPModel(full).save_pretrained(root / "clip_full")
    save_dinov2(root / "dinov2")
    ViTModel(ViTConfig(**_vision(intermediate_size=37))).save_pretrained(root / "vit")
    AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=32,
    ).save_pretrained(root / "pipeline" / "vae")  # a pipeline folder: the VAE is in vae/

    state = random_inception()
    torch.save(state, root / "pt_inception.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, root / "inception.safetensors")
    return {
        **{name: root / name for name in ("clip", "clip_full", "clip_tower", "dinov2", "vit")},
        "vae": root / "pipeline",
        "inception": root / "pt_inception.pth",
        "inception_safetensors": root / "inception.safetensors",
    }


@pytest.fixture(scope="module")
def encoders(models: dict[str, Path]) -> dict[tuple[str, int], Encoder]:
    """One built encoder per (model, in_channels), shared by the tests below."""
    built = {}
    for key in MODEL_ENCODERS:
        for channels in (1, 3):
            name = key.split("_")[0]
            built[key, channels] = build_encoder(name, str(models[key]), 64, channels, 12, seed=0)
    return built


def test_unknown_encoder_lists_the_allowed_names() -> None:
    for build in (
        lambda: build_encoder("resnet", None, 64, 1, 16),
        lambda: build_preprocessor("resnet", None, 1, 16),
    ):
        with pytest.raises(ValueError, match="'resnet'.*pixels, random_projection, clip") as err:
            build()
        assert all(name in str(err.value) for name in ENCODERS)


@pytest.mark.parametrize("name", ["clip", "dinov2", "vit", "vae", "inception"])
def test_missing_model_is_a_clear_error(name: str, tmp_path: Path) -> None:
    missing = str(tmp_path / "no" / "such-model")
    with pytest.raises(FileNotFoundError, match="no/such-model"):
        build_encoder(name, missing, 64, 3, 16)
    with pytest.raises(ValueError, match=f"{name!r} needs a model"):
        build_encoder(name, None, 64, 3, 16)


def test_hub_name_resolves_from_the_cache_only(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from huggingface_hub import constants

    repo = tmp_path / "models--tiny--vit"
    shutil.copytree(models["vit"], repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    enc = build_encoder("vit", "tiny/vit", 64, 3, 32)
    assert enc(enc.resize(_images(2, 32, 3))).shape == (2, 32)
    with pytest.raises(FileNotFoundError, match="'tiny/absent'.*Hugging Face cache"):
        build_encoder("vit", "tiny/absent", 64, 3, 32)


def test_pixels_area_pools_to_the_dim_budget() -> None:
    images = _images(3, 16, 1)
    enc = build_encoder("pixels", None, 64, 1, 16)
    assert (enc.input_size, enc.dim) == (16, 64)  # 16 px grey, 64 dims -> 8 x 8
    out = enc(enc.resize(images))
    expected = images.reshape(3, 8, 2, 8, 2).mean(axis=(2, 4)).reshape(3, 64) / 255
    np.testing.assert_allclose(out, expected, atol=1e-6)

    images.flags.writeable = False  # as Ray Data's zero-copy batches
    np.testing.assert_array_equal(enc(enc.resize(images)), out)

    rgb = build_encoder("pixels", None, 64, 3, 32)
    assert rgb.dim == 48  # 3 * 4 * 4 <= 64
    assert rgb(rgb.resize(_images(2, 32, 3))).shape == (2, 48)
    assert build_encoder("pixels", None, 10_000, 1, 8).dim == 64  # never upsamples


def test_random_projection_is_seeded_and_keeps_distances() -> None:
    images = _images(6, 16, 1)
    enc = build_encoder("random_projection", None, 512, 1, 16, seed=3)
    out = enc(enc.resize(images))
    assert out.shape == (6, 512) and out.dtype == np.float32
    np.testing.assert_array_equal(
        out, build_encoder("random_projection", None, 512, 1, 16, seed=3)(images)
    )
    assert not np.allclose(
        out, build_encoder("random_projection", None, 512, 1, 16, seed=4)(images)
    )
    flat = images.reshape(6, -1) / 255
    ratio = np.linalg.norm(out[0] - out[1:], axis=1) / np.linalg.norm(flat[0] - flat[1:], axis=1)
    assert np.all((ratio > 0.8) & (ratio < 1.2))


@pytest.mark.parametrize("key", MODEL_ENCODERS)
@pytest.mark.parametrize("channels", [1, 3])
def test_model_encoders(key: str, channels: int, encoders: dict) -> None:
    enc = encoders[key, channels]
    n = 2 if key == "inception" else 3  # inception at 299 px is the slow one
    resized = enc.resize(_images(n, 12, channels))
    assert resized.shape == (n, enc.input_size, enc.input_size, 3)
    assert resized.dtype == np.uint8
    out = enc(resized)
    assert out.shape == (n, enc.dim) and out.dtype == np.float32
    assert np.isfinite(out).all()
    assert not np.allclose(out[0], out[1], rtol=1e-4, atol=1e-6)
    if channels == 3:  # once per encoder: the second call gives the same numbers
        np.testing.assert_array_equal(out, enc(resized))


def test_model_encoder_layouts(encoders: dict, models: dict[str, Path]) -> None:
    layout = {key: (encoders[key, 3].input_size, encoders[key, 3].dim) for key in MODEL_ENCODERS}
    assert layout == {
        "clip": (32, 16),  # processor: resize to 40, centre-crop 32; projection_dim
        "clip_full": (32, 16),  # no processor saved: config image size; projection_dim
        "clip_tower": (32, 32),  # a tower without projection: pooled output, hidden size
        "dinov2": (32, 32),
        "vit": (32, 32),
        "vae": (12, 4 * 6 * 6),  # 12 px is a multiple of the factor 2; 4 latent channels
        "inception": (299, 2048),
    }
    assert build_preprocessor("vae", str(models["vae"]), 3, 11).input_size == 12  # rounded up


def test_preprocessor_needs_no_weights_and_matches_the_encoder(
    models: dict[str, Path], encoders: dict
) -> None:
    images = _images(2, 12, 1)
    for key in MODEL_ENCODERS:
        pre = build_preprocessor(key.split("_")[0], str(models[key]), 1, 12)
        np.testing.assert_array_equal(pre.resize(images), encoders[key, 1].resize(images))
    pre = build_preprocessor("inception", "not/needed/until/the/weights/load.pth", 1, 12)
    assert pre.input_size == 299


def test_resize_crops_and_repeats_grey() -> None:
    pre = build_preprocessor("pixels", None, 1, 16)
    assert pre.resize(_images(4, 16, 1)).shape == (4, 16, 16, 1)
    assert pre.resize(_images(0, 16, 1)).shape == (0, 16, 16, 1)

    crop = Preprocessor(1, input_size=4, channels=3, mode="bilinear", resize_to=8)
    gradient = np.broadcast_to(np.arange(8, dtype=np.uint8)[None, :, None], (1, 8, 8, 1))
    out = crop.resize(np.ascontiguousarray(gradient))
    assert out.shape == (1, 4, 4, 3)
    np.testing.assert_array_equal(out[0, 0, :, 0], [2, 3, 4, 5])  # the centre columns
    assert (out == out[..., :1]).all()  # grey repeated to RGB


def test_bad_inputs_are_clear_errors(encoders: dict) -> None:
    enc = build_encoder("pixels", None, 64, 1, 16)
    with pytest.raises(ValueError, match="uint8 images"):
        enc.resize(_images(2, 16, 3))
    with pytest.raises(ValueError, match="uint8 images"):
        enc.resize(_images(2, 16, 1).astype(np.float32))
    with pytest.raises(ValueError, match="call resize first"):
        encoders["vit", 1](_images(2, 12, 1))
    with pytest.raises(ValueError, match="autocast"):
        build_encoder("pixels", None, 64, 1, 16, autocast="fp8")


def test_inception_weights(models: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    from dedt_ray.encoders.inception import network

    pre = build_preprocessor("inception", str(models["inception"]), 3, 12)
    pth, _ = network(str(models["inception"]), pre, 64, 0)
    safe, _ = network(str(models["inception_safetensors"]), pre, 64, 0)
    for (k, a), (k2, b) in zip(pth.state_dict().items(), safe.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)

    checkpoints = tmp_path / "checkpoints"  # a bare file name is looked up in the torch hub cache
    checkpoints.mkdir()
    (checkpoints / "fid.pth").symlink_to(models["inception"])
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    assert network("fid.pth", pre, 64, 0)[1] == 2048

    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a pytorch-fid Inception-v3 state_dict"):
        network(str(tmp_path / "other.pth"), pre, 64, 0)


def test_incomplete_checkpoint_is_refused(models: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    tower = tmp_path / "tower"
    shutil.copytree(models["clip_tower"], tower)
    config = json.loads((tower / "config.json").read_text())
    config["architectures"] = ["CLIPVisionModelWithProjection"]  # but no projection weights
    (tower / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="visual_projection"):
        build_encoder("clip", str(tower), 64, 3, 32)


def test_autocast_bf16_on_cpu(encoders: dict, models: dict[str, Path]) -> None:
    images = encoders["dinov2", 3].resize(_images(2, 12, 3))
    enc = build_encoder("dinov2", str(models["dinov2"]), 64, 3, 12, autocast="bf16")
    out = enc(images)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, encoders["dinov2", 3](images), atol=0.1)


@pytest.mark.parametrize(
    ("family", "processor", "expected"),
    [
        (  # facebook/dinov2-*: shortest edge 256, centre crop 224, bicubic, ImageNet mean/std
            "dinov2",
            {
                "image_processor_type": "BitImageProcessor",
                "size": {"shortest_edge": 256},
                "crop_size": {"height": 224, "width": 224},
                "do_center_crop": True,
                "resample": 3,
                "image_mean": [0.485, 0.456, 0.406],
                "image_std": [0.229, 0.224, 0.225],
            },
            (224, 256, "bicubic", (0.485, 0.456, 0.406)),
        ),
        (  # google/vit-*: legacy integer size, bilinear, no crop, 0.5 mean/std
            "vit",
            {
                "feature_extractor_type": "ViTFeatureExtractor",
                "image_processor_type": "ViTImageProcessor",
                "size": 224,
                "resample": 2,
                "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.5, 0.5, 0.5],
            },
            (224, None, "bilinear", (0.5, 0.5, 0.5)),
        ),
    ],
)
def test_published_processor_configs(
    family: str, processor: dict, expected: tuple, models: dict[str, Path], tmp_path: Path
) -> None:
    (tmp_path / "config.json").write_bytes((models[family] / "config.json").read_bytes())
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(processor))
    pre = build_preprocessor(family, str(tmp_path), 1, 16)
    assert (pre.input_size, pre.resize_to, pre.mode, pre.mean) == expected
    assert pre.resize(_images(2, 16, 1)).shape == (2, 224, 224, 3)
