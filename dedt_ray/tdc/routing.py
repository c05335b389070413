"""Sampling with one denoiser per timestep group (TDC step 6).

``RoutedUNet`` has ``UNet2DModel``'s forward signature and sends every sample of a batch to the
model of its timestep's group. diffusers' DDPM and DDIM schedulers already pass original-scale
timesteps after respacing (``DDIMScheduler.set_timesteps(50)`` yields 980, 960, ..., 0 out of
1000), so routing looks ``t`` up in the training-timestep groups directly.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch
from diffusers import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn

from dedt_ray.tdc.budget import model_flops
from dedt_ray.tdc.grouping import Group, group_of, validate_groups
from dedt_ray.tdc.pruning import load_pruned, save_pruned

FORMAT = "dedt_ray.tdc.routed/1"


class RoutedUNet(ModelMixin):
    """Per-group UNets behind one UNet2DModel-like forward.

    A diffusers `ModelMixin` (its own `from_pretrained` / `save_pretrained`), so diffusers'
    pipeline loading accepts it as the `unet` component an export's model_index.json names."""

    def __init__(
        self,
        models: Sequence[nn.Module],
        groups: Sequence[Group],
        scheduler_config: dict[str, Any] | None = None,
    ) -> None:
        """``models[i]`` denoises the timesteps of ``groups[i]``; ``scheduler_config`` is
        ``{"class": name, "config": {...}}`` of the training scheduler, kept for saving."""
        super().__init__()
        if len(models) != len(groups):
            raise ValueError(f"{len(models)} models for {len(groups)} groups")
        self.groups = validate_groups(groups, groups[-1][1] if groups else 0)
        self.models = nn.ModuleList(models)
        self.scheduler_config = scheduler_config

    @property
    def config(self) -> Any:
        """The first group's config (all groups share sample size and image channels)."""
        return self.models[0].config

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> UNet2DOutput | tuple[torch.Tensor]:
        """Denoise ``sample``; a batch with mixed timesteps is split by group."""
        batch = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.reshape(-1).expand(batch) if t.numel() == 1 else t
        if t.shape != (batch,):
            raise ValueError(f"timestep must be a scalar or have shape ({batch},), got {t.shape}")
        which = np.asarray(group_of(t.detach().cpu().numpy(), self.groups)).reshape(-1)
        out: torch.Tensor | None = None
        for g in np.unique(which):
            idx = torch.from_numpy(np.nonzero(which == g)[0]).to(sample.device)
            labels = None if class_labels is None else class_labels[idx]
            pred = self.models[g](sample[idx], t[idx], class_labels=labels).sample
            if out is None:
                out = pred.new_empty((batch, *pred.shape[1:]))
            out[idx] = pred
        return UNet2DOutput(sample=out) if return_dict else (out,)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> RoutedUNet:
        """Load a ``save_pretrained`` folder (diffusers' loading calls this for an export's
        ``unet/`` when its model_index.json names this class; loader options are ignored)."""
        return load_routed(path)

    def save_pretrained(self, path: str | Path, **kwargs: Any) -> None:
        """``save_routed`` (weights are always safetensors)."""
        save_routed(self, path)

    def make_scheduler(self) -> Any:
        """A fresh scheduler from the stored ``scheduler_config``."""
        if self.scheduler_config is None:
            raise ValueError("this RoutedUNet has no scheduler config")
        cls = getattr(diffusers, self.scheduler_config["class"])
        return cls.from_config(self.scheduler_config["config"])


def scheduler_config(scheduler: Any) -> dict[str, Any]:
    """``{"class", "config"}`` of a diffusers scheduler, JSON-ready."""
    config = {k: v for k, v in scheduler.config.items() if not k.startswith("_")}
    return {"class": type(scheduler).__name__, "config": config}


def save_routed(routed: RoutedUNet, path: str | Path) -> None:
    """One ``save_pruned`` folder per group, ``routing.json`` (groups, scheduler config) and a
    diffusers-style ``config.json`` (class name and the groups' shared UNet config, so readers
    of an export find the sample size and label space where a UNet2DModel has them)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    folders = [f"group_{i:02d}" for i in range(len(routed.models))]
    for folder, model in zip(folders, routed.models, strict=True):
        save_pruned(model, path / folder)
    routing = {
        "format": FORMAT,
        "groups": [list(g) for g in routed.groups],
        "models": folders,
        "scheduler": routed.scheduler_config,
    }
    (path / "routing.json").write_text(json.dumps(routing, indent=1))
    config = {k: v for k, v in routed.config.items() if not k.startswith("_")}
    config = {"_class_name": type(routed).__name__, **config, "groups": routing["groups"]}
    (path / "config.json").write_text(json.dumps(config, indent=1))


def load_routed(path: str | Path, device: str | torch.device = "cpu") -> RoutedUNet:
    """Load a ``save_routed`` folder."""
    path = Path(path)
    routing = json.loads((path / "routing.json").read_text())
    if routing.get("format") != FORMAT:
        raise ValueError(f"{path}/routing.json is not a {FORMAT} description")
    models = [load_pruned(path / folder, device) for folder in routing["models"]]
    groups = [tuple(g) for g in routing["groups"]]
    return RoutedUNet(models, groups, routing["scheduler"])


def sampling_flops(routed: RoutedUNet, scheduler: Any, num_inference_steps: int) -> int:
    """FLOPs of one sample's denoising loop: the routed model's forward FLOPs (batch 1) summed
    over the scheduler's inference timesteps (``scheduler`` itself is not modified)."""
    steps = type(scheduler).from_config(scheduler.config)
    steps.set_timesteps(num_inference_steps)
    per_model = [model_flops(m) for m in routed.models]
    which = np.asarray(group_of(steps.timesteps.numpy(), routed.groups)).reshape(-1)
    return int(sum(per_model[g] for g in which))
