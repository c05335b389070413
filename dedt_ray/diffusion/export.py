"""The exported model: diffusers layout (unet/, scheduler/, vae/ in latent mode) + dedt_model.json.

model_index.json names each component as diffusers does (`[library, class]`), and a pixel-space
export names `DDPMPipeline`, so `DDPMPipeline.from_pretrained(path)` loads it whole
(unconditional models sample with it directly; class-conditional ones need `generate`).
dedt_model.json records the label space: num_classes, null_class, class names.

The denoiser need not be a UNet2DModel: any class with `save_pretrained` / `from_pretrained`
and the UNet2DModel forward (a TDC routed model is one) is saved and loaded through its
model_index.json entry, the way diffusers loads custom components; only `diffusers` and
`dedt_ray.*` modules are imported from that entry.
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Any

import diffusers
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DModel
from torch import nn

INFO = "dedt_model.json"
INDEX = "model_index.json"


def component_entry(module: Any) -> list[str]:
    """model_index.json's `[library, class]` of a component."""
    library = type(module).__module__
    return ["diffusers" if library.split(".")[0] == "diffusers" else library, type(module).__name__]


def save_export(
    directory: str,
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    info: dict[str, Any],
    vae: AutoencoderKL | None = None,
) -> None:
    """Write the model folder (local path) in diffusers layout; weights as safetensors."""
    os.makedirs(directory, exist_ok=True)
    unet.save_pretrained(os.path.join(directory, "unet"), safe_serialization=True)
    scheduler.save_pretrained(os.path.join(directory, "scheduler"))
    index: dict[str, Any] = {"_diffusers_version": diffusers.__version__}
    if vae is not None:
        vae.save_pretrained(os.path.join(directory, "vae"), safe_serialization=True)
        index["vae"] = component_entry(vae)
    else:
        index["_class_name"] = "DDPMPipeline"
    index.update(scheduler=component_entry(scheduler), unet=component_entry(unet))
    if vae is None or not isinstance(unet, UNet2DModel):  # latent + UNet2DModel: no pipeline
        with open(os.path.join(directory, INDEX), "w") as f:
            json.dump(index, f, indent=2)
    with open(os.path.join(directory, INFO), "w") as f:
        json.dump(info, f, indent=2)


def load_export(
    directory: str, device: str = "cpu"
) -> tuple[UNet2DModel, DDPMScheduler, AutoencoderKL | None, dict[str, Any]]:
    """(denoiser, scheduler, vae or None, info) from an exported model folder (local path).

    The denoiser is a UNet2DModel or the class its model_index.json entry names."""
    unet = load_denoiser(directory).to(device).eval()
    scheduler = DDPMScheduler.from_pretrained(directory, subfolder="scheduler")
    vae = None
    if os.path.isdir(os.path.join(directory, "vae")):
        vae = AutoencoderKL.from_pretrained(directory, subfolder="vae").to(device).eval()
    info_path = os.path.join(directory, INFO)
    info: dict[str, Any] = {}
    if os.path.isfile(info_path):
        with open(info_path) as f:
            info = json.load(f)
    return unet, scheduler, vae, info


def load_denoiser(directory: str) -> nn.Module:
    """`<export>/unet` as the class model_index.json names (UNet2DModel when it names none)."""
    library, name = "diffusers", "UNet2DModel"
    index_path = os.path.join(directory, INDEX)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            library, name = json.load(f).get("unet", [library, name])
    if library != "diffusers" and not library.startswith("dedt_ray."):  # import nothing else
        raise ValueError(f"{index_path}: unet library {library!r} is not diffusers nor dedt_ray")
    if library == "diffusers" and name == "UNet2DModel":
        return UNet2DModel.from_pretrained(directory, subfolder="unet")
    cls = getattr(importlib.import_module(library), name)
    return cls.from_pretrained(os.path.join(directory, "unet"))


def load_vae(path: str) -> AutoencoderKL:
    """An AutoencoderKL from a folder holding config.json, or a pipeline folder with vae/."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return AutoencoderKL.from_pretrained(path)
    if os.path.isdir(os.path.join(path, "vae")):
        return AutoencoderKL.from_pretrained(path, subfolder="vae")
    if os.path.exists(path):
        raise FileNotFoundError(f"model.vae: {path} holds neither config.json nor vae/")
    try:  # a hub name, resolved from the local cache only
        return AutoencoderKL.from_pretrained(path, local_files_only=True)
    except OSError as exc:
        raise FileNotFoundError(f"model.vae: {path} is no local folder nor cached model") from exc
