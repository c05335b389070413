"""Config loading, overrides and validation errors."""

import subprocess
import sys

import pytest

from dedt_ray.config import ConfigError, load_config, parse_overrides


def test_defaults_and_preset_load(tmp_path):
    cfg = load_config("configs/default.yaml")
    assert cfg.data.source == "digits" and cfg.data.image_size == 16
    for preset in ("configs/cifar10.yaml", "configs/imagenet.yaml"):
        assert load_config(preset).data.path


def test_cifar10_preset_is_the_ddpm_setup():
    from dedt_ray.diffusion.models import ModelSpec, build_unet

    cfg = load_config("configs/cifar10.yaml")
    unet = build_unet(cfg.model, ModelSpec(32, 3, 0))
    assert 35.6e6 < sum(p.numel() for p in unet.parameters()) < 35.9e6  # DDPM: 35.7M
    t = cfg.train
    assert (t.lr, t.warmup_steps, t.batch_size, t.ema_decay, t.hflip) == (
        2e-4,
        5000,
        128,
        0.9999,
        True,
    )
    assert cfg.model.dropout == 0.1 and cfg.evaluate.num_samples == 50_000
    assert cfg.embed.encoder != "inception"  # the selection space is not the FID space
    smoke = load_config("configs/cifar10-smoke.yaml")
    assert smoke.data.source == "cifar10" and smoke.train.steps <= 500 and smoke.train.hflip


def test_dotted_overrides_apply_with_yaml_types():
    cfg = load_config("configs/default.yaml", ["data.image_size=8", "select.keep_ratio=0.3"])
    assert cfg.data.image_size == 8
    assert cfg.select.keep_ratio == pytest.approx(0.3)
    assert parse_overrides(["a.b=[1, 2]", "c=null"]) == {"a": {"b": [1, 2]}, "c": None}


@pytest.mark.parametrize(
    "override, key, hint",
    [
        ("data.sorce=digits", "data.sorce", "allowed: source"),
        ("data.source=mnist", "data.source", "'image_folder'"),
        ("data.image_size=big", "data.image_size", "integer"),
        ("data.image_size=2", "data.image_size", "greater than or equal to 4"),
        ("select.keep_ratio=1.5", "select.keep_ratio", "less than or equal to 1"),
        ("bogus=1", "bogus", "allowed: seed"),
    ],
)
def test_invalid_values_name_the_key(override, key, hint):
    with pytest.raises(ConfigError) as err:
        load_config("configs/default.yaml", [override])
    assert key in str(err.value) and hint in str(err.value)


def test_source_without_path_is_rejected():
    with pytest.raises(ConfigError, match="data.path is required"):
        load_config(None, ["data.source=image_folder"])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(None, ["data.source"])


def test_cli_exits_2_before_any_ray_work(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dedt_ray.cli",
            "embed",
            "--config",
            "configs/default.yaml",
            "--run-dir",
            str(run_dir),
            "embed.encoder=nope",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "embed.encoder" in proc.stderr and "'pixels'" in proc.stderr
    assert not run_dir.exists()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dedt_ray.cli",
            "embed",
            "data.source=image_folder",
            f"data.path={tmp_path / 'nowhere'}",
            "--run-dir",
            str(run_dir),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "data.path" in proc.stderr
