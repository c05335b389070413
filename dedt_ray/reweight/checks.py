"""Settings of the `reference` and `reweight` stages derived from the config, and their checks.

Config only (no torch, no Ray): the CLI calls `check_reweight` before any cluster work, so a
bad `reference.pretrained` folder or batch size exits with code 2.
"""

from __future__ import annotations

import json
import os
from typing import Literal

from pydantic import ValidationError

from dedt_ray.config import Config, ConfigError, TrainConfig

# Default steps as a share of train.steps, equal for reference and proxy as in DoReMi. The
# reference costs one training step per step, the proxy one plus a reference forward (~1/3):
# 0.035 + 0.035 * 4/3 ~ 8.2% of the final training at the same batch size (DoReMi: ~8%).
# See docs/reweight.md.
REFERENCE_SHARE = 0.035
PROXY_SHARE = 0.035
WEIGHTS_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.safetensors.index.json",
)

Which = Literal["reference", "reweight"]


def stage_steps(cfg: Config, which: Which) -> int:
    """Optimizer steps of the reference (trained) or the proxy."""
    if which == "reference":
        return cfg.reference.steps or max(1, round(REFERENCE_SHARE * cfg.train.steps))
    return cfg.reweight.steps or max(1, round(PROXY_SHARE * cfg.train.steps))


def stage_train_config(cfg: Config, which: Which) -> TrainConfig:
    """`train.*` with the stage's steps and batch size, a warmup of at most 10% of the steps,
    and class-weighted sampling (uniform class weights). Raises ConfigError."""
    steps = stage_steps(cfg, which)
    section = cfg.reference if which == "reference" else cfg.reweight
    batch = section.batch_size or cfg.train.batch_size
    values = cfg.train.model_dump()
    values.update(
        steps=steps,
        batch_size=batch,
        warmup_steps=min(cfg.train.warmup_steps, steps // 10),
        class_weighting="sampling",
    )
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as exc:
        msgs = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
        raise ConfigError(
            f"{which}: steps={steps}, batch_size={batch} (with train.* settings): {msgs}"
        ) from None


def stage_config(cfg: Config, which: Which) -> Config:
    """The config the trainer runs with for the reference or the proxy."""
    return cfg.model_copy(update={"train": stage_train_config(cfg, which)})


def pretrained_unet_dir(path: str) -> str:
    """The folder holding the UNet's config.json: `path` itself or `path/unet`.

    Raises ConfigError unless `path` is a local diffusers UNet2DModel folder (config.json with
    `"_class_name": "UNet2DModel"` and its weights) or a pipeline folder with such a unet/.
    """
    where = f"reference.pretrained: {path}"
    if "://" in path:
        raise ConfigError(f"{where}: must be a local folder (copy the model to this machine)")
    if not os.path.isdir(path):
        raise ConfigError(f"{where} does not exist or is not a folder")
    for folder in (path, os.path.join(path, "unet")):
        config = os.path.join(folder, "config.json")
        if not os.path.isfile(config):
            continue
        try:
            with open(config) as f:
                name = json.load(f).get("_class_name")
        except (OSError, ValueError, AttributeError):
            raise ConfigError(f"{where}: {config} is not a JSON object") from None
        if name != "UNet2DModel":
            continue
        if not any(os.path.isfile(os.path.join(folder, w)) for w in WEIGHTS_FILES):
            raise ConfigError(f"{where}: {folder} has config.json but no weights file")
        return folder
    raise ConfigError(
        f"{where} is not a diffusers UNet2DModel folder: expected config.json with "
        f'"_class_name": "UNet2DModel" (UNet2DModel.save_pretrained), or a pipeline folder '
        f"with such a unet/ sub-folder"
    )


def check_reweight(cfg: Config) -> None:
    """Fail fast (ConfigError) on settings the reference / reweight stages cannot run with."""
    if not cfg.reweight.enabled:
        return
    if cfg.reference.pretrained:
        pretrained_unet_dir(cfg.reference.pretrained)
    else:
        stage_train_config(cfg, "reference")
    stage_train_config(cfg, "reweight")
