"""The exported model: diffusers layout (unet/, scheduler/, vae/ in latent mode) + dedt_model.json.

A pixel-space export also has model_index.json, so `DDPMPipeline.from_pretrained(path)`
loads it whole (unconditional models sample with it directly; class-conditional ones need
`generate`). dedt_model.json records the label space: num_classes, null_class, class names.
"""

from __future__ import annotations

import json
import os
from typing import Any

import diffusers
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DModel

INFO = "dedt_model.json"


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
    if vae is not None:
        vae.save_pretrained(os.path.join(directory, "vae"), safe_serialization=True)
    else:
        index = {
            "_class_name": "DDPMPipeline",
            "_diffusers_version": diffusers.__version__,
            "scheduler": ["diffusers", "DDPMScheduler"],
            "unet": ["diffusers", "UNet2DModel"],
        }
        with open(os.path.join(directory, "model_index.json"), "w") as f:
            json.dump(index, f, indent=2)
    with open(os.path.join(directory, INFO), "w") as f:
        json.dump(info, f, indent=2)


def load_export(
    directory: str, device: str = "cpu"
) -> tuple[UNet2DModel, DDPMScheduler, AutoencoderKL | None, dict[str, Any]]:
    """(unet, scheduler, vae or None, info) from an exported model folder (local path).

    A TDC routed export (``routing.json``, stage `tdc`) loads as a ``RoutedUNet``, which has
    the UNet2DModel forward signature."""
    if os.path.isfile(os.path.join(directory, "routing.json")):
        from dedt_ray.tdc.routing import load_routed

        unet = load_routed(directory).to(device).eval()
    else:
        unet = UNet2DModel.from_pretrained(directory, subfolder="unet").to(device).eval()
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
