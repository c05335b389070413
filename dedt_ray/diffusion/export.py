"""The exported model: diffusers layout (unet/, scheduler/, vae/ in latent mode) + dedt_model.json.

model_index.json names each component as diffusers does (`[library, class]`). An unconditional
pixel-space export names `DDPMPipeline` (`DDPMPipeline.from_pretrained(path)` samples it); a
class-conditional or latent one names this package's `DedtRayPipeline` through the folder's
`pipeline_dedt_ray.py` (diffusers' custom-pipeline mechanism; docs/export.md).
dedt_model.json records the label space (num_classes, null_class, class names), compute, and
the sha256 of every other file of the export, checked whenever `load_export` reads it. The
model card `README.md` (`diffusion.card`) is the one file outside the checksums.

The denoiser need not be a UNet2DModel: any class with `save_pretrained` / `from_pretrained`
and the UNet2DModel forward (a TDC routed model is one) is saved and loaded through its
model_index.json entry, the way diffusers loads custom components; only `diffusers` and
`dedt_ray.*` modules are imported from that entry.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from typing import Any

import diffusers
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DModel
from torch import nn

INFO = "dedt_model.json"
INDEX = "model_index.json"
UNCHECKED = {INFO, "README.md"}  # every other file of an export has its sha256 in INFO


class ExportDamaged(ValueError):
    """An export file whose bytes differ from the sha256 recorded when it was written."""


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
    """Write the model folder (local path) in diffusers layout; weights as safetensors; the
    pipeline file, model card and checksums."""
    from dedt_ray.diffusion.card import CARD, initial_sections, render
    from dedt_ray.diffusion.pipeline import CLASS_NAME, MODULE_FILE, SHIM

    os.makedirs(directory, exist_ok=True)
    unet.save_pretrained(os.path.join(directory, "unet"), safe_serialization=True)
    scheduler.save_pretrained(os.path.join(directory, "scheduler"))
    index: dict[str, Any] = {"_diffusers_version": diffusers.__version__}
    conditional = bool(info.get("num_classes"))
    if vae is not None:
        vae.save_pretrained(os.path.join(directory, "vae"), safe_serialization=True)
        index["vae"] = component_entry(vae)
    if vae is None and not conditional:
        index["_class_name"] = "DDPMPipeline"
    else:  # DDPMPipeline passes no class labels and has no VAE
        index["_class_name"] = [MODULE_FILE.removesuffix(".py"), CLASS_NAME]
    index.update(scheduler=component_entry(scheduler), unet=component_entry(unet))
    _write(directory, MODULE_FILE, SHIM)
    _write(directory, INDEX, json.dumps(index, indent=2))
    info = {**info, "sha256": file_checksums(directory)}
    _write(directory, INFO, json.dumps(info, indent=2))
    _write(directory, CARD, render(info, initial_sections(info)))


def _write(directory: str, name: str, text: str) -> None:
    with open(os.path.join(directory, name), "w") as f:
        f.write(text)


def file_checksums(directory: str) -> dict[str, str]:
    """{relative path: sha256} of every file under `directory` but dedt_model.json and the card."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), directory).replace(os.sep, "/")
            if rel not in UNCHECKED:
                out[rel] = sha256_file(os.path.join(root, name))
    return dict(sorted(out.items()))


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_export(directory: str, info: dict[str, Any]) -> None:
    """Raise ExportDamaged naming the first file whose sha256 differs from `info["sha256"]`
    (exports written before checksums have none: nothing to check)."""
    for rel, expected in (info.get("sha256") or {}).items():
        path = os.path.join(directory, rel)
        if not os.path.isfile(path):
            raise ExportDamaged(f"{path} is missing from the export (listed in {INFO})")
        if sha256_file(path) != expected:
            raise ExportDamaged(
                f"{path} is damaged: its sha256 differs from the one recorded in {INFO} when "
                "it was written; rerun the stage that exported it with --force"
            )


def load_export(
    directory: str, device: str = "cpu"
) -> tuple[UNet2DModel, DDPMScheduler, AutoencoderKL | None, dict[str, Any]]:
    """(denoiser, scheduler, vae or None, info) from an exported model folder (local path),
    after checking every file against the sha256 recorded in dedt_model.json.

    The denoiser is a UNet2DModel or the class its model_index.json entry names."""
    info_path = os.path.join(directory, INFO)
    info: dict[str, Any] = {}
    if os.path.isfile(info_path):
        with open(info_path) as f:
            info = json.load(f)
    verify_export(directory, info)
    unet = load_denoiser(directory).to(device).eval()
    scheduler = DDPMScheduler.from_pretrained(directory, subfolder="scheduler")
    vae = None
    if os.path.isdir(os.path.join(directory, "vae")):
        vae = AutoencoderKL.from_pretrained(directory, subfolder="vae").to(device).eval()
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
