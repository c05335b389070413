"""Stage `latents` (latent mode): every source image through a diffusers AutoencoderKL, once.

source (read + decode, CPU tasks) -> VAE encoder (actor pool, GPUs when the cluster has
them) -> latents/latents.parquet (id, label, latent: fixed_size_list<float32> of C*h*w,
the posterior mean times vae.config.scaling_factor) + latents/info.json (shape, scaling).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import ray.data

from dedt_ray.artifacts import LATENT_INFO, LATENTS, vector_table
from dedt_ray.config import Config
from dedt_ray.data import open_source
from dedt_ray.runtime import cluster_gpus
from dedt_ray.stages import StageContext
from dedt_ray.store import RunStore


def latent_table(ids, labels, latents: np.ndarray) -> pa.Table:
    """The latents schema: id, label, latent as fixed_size_list<float32> (flattened CHW)."""
    return vector_table(ids, labels, "latent", latents)


def encode_images(vae, images: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> scaled posterior means float32 NCHW (grey images repeat to RGB VAEs)."""
    import torch

    from dedt_ray.diffusion.sampling import from_uint8

    x = from_uint8(images)
    want = vae.config.in_channels
    if x.shape[1] == 1 and want == 3:
        x = x.repeat(1, 3, 1, 1)
    elif x.shape[1] != want:
        raise ValueError(f"images have {x.shape[1]} channels, the VAE expects {want}")
    with torch.no_grad():
        mean = vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mean
    return (mean.float() * vae.config.scaling_factor).cpu().numpy()


class _Encode:
    """One VAE replica on an actor; uses the GPU Ray assigned to it, if any."""

    def __init__(self, vae_path: str, use_gpu: bool):
        import torch

        from dedt_ray.diffusion.export import load_vae

        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.vae = load_vae(vae_path).to(device).eval()

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        latents = encode_images(self.vae, batch["image"])
        return latent_table(batch["id"], batch["label"], latents)


def run(cfg: Config, store: RunStore, ctx: StageContext) -> dict[str, Any]:
    from dedt_ray.diffusion.export import load_vae

    source = open_source(cfg.data)
    vae_path = cfg.model.vae
    vae = load_vae(vae_path)  # fail early, and read its config
    scaling = float(vae.config.scaling_factor)
    gpus = min(1.0, cluster_gpus())
    ds = source.dataset.map_batches(
        _Encode,
        fn_constructor_kwargs={"vae_path": vae_path, "use_gpu": gpus > 0},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=1 if gpus == 0 else 8),
        num_gpus=gpus,
        batch_size=cfg.model.vae_batch_size,
        batch_format="numpy",
    )
    out = store.path(*LATENTS)
    ds.write_parquet(store.uri(out), mode="overwrite")
    written = pads.dataset(store.uri(out), format="parquet")
    rows = written.count_rows()
    first = written.head(1, columns=["latent"]).column("latent")[0].values.to_numpy()
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    size = cfg.data.image_size // factor
    channels = int(vae.config.latent_channels)
    if first.size != channels * size * size:
        raise RuntimeError(f"latent of {first.size} values, expected {channels}x{size}x{size}")
    info = {
        "shape": [channels, size, size],
        "scaling_factor": scaling,
        "vae": vae_path,
        "classes": source.classes,
        "image_size": cfg.data.image_size,
    }
    store.write_json(info, *LATENT_INFO)
    skipped = source.skipped()
    return {
        "rows": rows,
        "skipped": len(skipped),
        "shape": info["shape"],
        "classes": source.classes,
        "summary": f"{rows} images encoded to {channels}x{size}x{size} latents "
        f"(scaling {scaling:g}), {len(skipped)} skipped",
    }
