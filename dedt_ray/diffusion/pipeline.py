"""`DedtRayPipeline`: a diffusers pipeline for every dedt-ray export (class labels,
classifier-free guidance, DDPM or DDIM, latent exports with their VAE, routed TDC models).

    from dedt_ray.diffusion.pipeline import DedtRayPipeline
    pipe = DedtRayPipeline.from_pretrained("runs/default/train/model")
    images = pipe(class_labels=[0, 1, 2], guidance_scale=2.0, scheduler="ddim",
                  num_inference_steps=50).images          # PIL images

An export's folder also carries `pipeline_dedt_ray.py` (one import of this class) and names it
in model_index.json, the way diffusers finds custom pipelines, so
`DiffusionPipeline.from_pretrained(path, trust_remote_code=True)` loads it too, offline
(diffusers runs no code from a folder unless told to trust it). The denoiser is whatever
model_index.json names: a `UNet2DModel`, or a routed TDC model (`dedt_ray.tdc.routing`,
imported by diffusers from that entry; this module does not import it).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput

from dedt_ray.diffusion.models import sampling_scheduler
from dedt_ray.diffusion.sampling import generate

MODULE_FILE = "pipeline_dedt_ray.py"  # in every export; model_index.json names it
CLASS_NAME = "DedtRayPipeline"
SHIM = f'''"""diffusers custom pipeline of a dedt-ray export (needs `pip install dedt-ray`)."""

from dedt_ray.diffusion.pipeline import {CLASS_NAME}  # noqa: F401
'''


class DedtRayPipeline(DiffusionPipeline):
    """Class-conditional (or unconditional) sampling of a dedt-ray export."""

    model_cpu_offload_seq = "unet->vae"
    _optional_components = ["vae"]

    def __init__(self, unet: torch.nn.Module, scheduler, vae=None) -> None:  # noqa: ANN001
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, **kwargs: Any) -> Any:
        """Load an export (a local folder). Its `pipeline_dedt_ray.py` is run only when it is
        exactly the one-line import dedt-ray writes; any other content is refused."""
        shim = os.path.join(str(pretrained_model_name_or_path), MODULE_FILE)
        if os.path.isfile(shim):
            with open(shim) as f:
                if f.read() != SHIM:
                    raise ValueError(f"{shim} is not the file dedt-ray writes; not running it")
            kwargs.setdefault("trust_remote_code", True)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @property
    def num_classes(self) -> int:
        """Classes the denoiser is conditioned on (0: unconditional); the last class
        embedding is the "no class" one that guidance uses."""
        embeds = self.unet.config.get("num_class_embeds")
        return int(embeds) - 1 if embeds else 0

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Sequence[int] | torch.Tensor | None = None,
        batch_size: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        scheduler: str | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Generate one image per class label (class-conditional) or `batch_size` images.

        `guidance_scale` != 1: classifier-free guidance against the null class. `scheduler`
        "ddpm" or "ddim" samples with a fresh scheduler of that kind on the export's noise
        schedule (None: `self.scheduler` as it is). `output_type`: "pil", "np" (float in
        [0, 1], NHWC) or "uint8"."""
        labels = self._labels(class_labels, batch_size)
        sampler = self.scheduler
        if scheduler is not None:
            sampler = sampling_scheduler(self.scheduler, scheduler)
        with self.progress_bar(total=num_inference_steps) as bar:
            images = generate(
                self.unet, sampler, labels, num_inference_steps, guidance_scale, generator,
                vae=self.vae, num_samples=batch_size, on_step=bar.update,
            )  # fmt: skip
        if output_type == "pil":
            out = self.numpy_to_pil(images.astype(np.float32) / 255.0)
        elif output_type == "np":
            out = images.astype(np.float32) / 255.0
        elif output_type == "uint8":
            out = images
        else:
            raise ValueError(f"output_type must be 'pil', 'np' or 'uint8', got {output_type!r}")
        return ImagePipelineOutput(images=out) if return_dict else (out,)

    def _labels(
        self, class_labels: Sequence[int] | torch.Tensor | None, batch_size: int | None
    ) -> list[int] | None:
        """The class of each image: given, or cycling through every class for `batch_size`."""
        k = self.num_classes
        if k == 0:
            if class_labels is not None:
                raise ValueError("this model is unconditional: pass batch_size, not class_labels")
            if not batch_size:
                raise ValueError("pass batch_size: how many images to generate")
            return None
        if class_labels is None:
            if not batch_size:
                raise ValueError(f"pass class_labels (0..{k - 1}) or batch_size")
            return [i % k for i in range(batch_size)]
        labels = [int(y) for y in torch.as_tensor(class_labels).reshape(-1).tolist()]
        bad = [y for y in labels if not 0 <= y < k]
        if bad:
            raise ValueError(f"class_labels {bad} are not classes of this model (0..{k - 1})")
        return labels
