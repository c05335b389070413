"""Settings of the `reference` and `reweight` stages derived from the config, and their checks.

Config only (no torch, no Ray): the CLI calls `check_reweight` before any cluster work, so a
bad `reference.pretrained` folder or batch size exits with code 2.
"""

from __future__ import annotations

import json
import os
from typing import Literal

from pydantic import ValidationError

from dedt_ray.config import Config, ConfigError, ModelConfig, TrainConfig

WEIGHTS_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.safetensors.index.json",
)

Which = Literal["reference", "reweight"]


def proxy_model(cfg: Config) -> ModelConfig:
    """The small architecture reference and proxy share: `model.*` with `reweight.proxy_model`
    applied, by default half the widths (each a multiple of `model.norm_num_groups`, as
    DoReMi's proxies are small models of the final model's family). Raises ConfigError."""
    overrides = cfg.reweight.proxy_model
    if overrides is None:
        groups = cfg.model.norm_num_groups
        widths = [max(groups, c // 2 // groups * groups) for c in cfg.model.block_out_channels]
        overrides = {"block_out_channels": widths}
    try:
        return ModelConfig.model_validate({**cfg.model.model_dump(), **overrides})
    except ValidationError as exc:
        msgs = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'model'}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        )
        raise ConfigError(f"reweight.proxy_model {overrides}: {msgs}") from None


def stage_train_config(cfg: Config, which: Which, steps: int) -> TrainConfig:
    """`train.*` with the stage's steps and batch size, a warmup of at most 10% of the steps,
    and class-weighted sampling (uniform class weights). Raises ConfigError."""
    section = cfg.reference if which == "reference" else cfg.reweight
    batch = section.batch_size or cfg.train.batch_size
    values = cfg.train.model_dump()
    values.update(
        steps=steps,
        batch_size=batch,
        warmup_steps=min(cfg.train.warmup_steps, steps // 10),
        log_every=max(1, min(cfg.train.log_every, steps // 20)),  # a curve to judge it by
        epochs=None,  # the reference and proxy run for their planned steps
        infobatch={"enabled": False},
        eval_every=None,
        until="steps",
        class_weighting="sampling",
    )
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as exc:
        msgs = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
        raise ConfigError(
            f"{which}: steps={steps}, batch_size={batch} (with train.* settings): {msgs}"
        ) from None


def stage_config(cfg: Config, which: Which, steps: int) -> Config:
    """The config the trainer runs with for the reference or the proxy: the small model."""
    return cfg.model_copy(
        update={"model": proxy_model(cfg), "train": stage_train_config(cfg, which, steps)}
    )


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


def check_reference_classes(embeds: int | None, k: int, conditional: bool) -> None:
    """The reference must see what the proxy sees: with K classes, a class-conditional proxy
    needs a reference with K (or K + 1, with a null class) class embeddings, an unconditional
    proxy one without (or with a null class, which the reference is then given). ConfigError
    names both sides otherwise."""
    if conditional and embeds in (k, k + 1):
        return
    if not conditional and embeds in (None, k + 1):
        return
    proxy = f"class-conditional over {k} classes" if conditional else "unconditional"
    raise ConfigError(
        f"reference: the reference model has {embeds} class embeddings but the proxy is {proxy} "
        f"(model.class_conditional={conditional}, {k} classes in the data): "
        f"{'K or K + 1' if conditional else 'none or K + 1'} embeddings are needed"
    )


def check_reweight(cfg: Config) -> None:
    """Fail fast (ConfigError) on settings the reference / reweight stages cannot run with."""
    if not cfg.reweight.enabled:
        return
    proxy_model(cfg)
    if cfg.reference.pretrained:
        pretrained_unet_dir(cfg.reference.pretrained)
    else:
        stage_train_config(cfg, "reference", cfg.reference.steps or 10)
    stage_train_config(cfg, "reweight", cfg.reweight.steps or 10)
