"""Model factory: a diffusers UNet2DModel and DDPMScheduler from the config (pure, no Ray).

Class conditioning uses `num_class_embeds = num_classes + 1`: the extra index
`null_class = num_classes` is the "no label" embedding that label dropout trains for
classifier-free guidance.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from dedt_ray.config import ModelConfig

BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


@dataclass(frozen=True)
class ModelSpec:
    """What the denoiser sees: tensor shape and label space (derived from data + config)."""

    sample_size: int
    channels: int
    num_classes: int  # 0: unconditional
    latent: bool = False

    @property
    def null_class(self) -> int | None:
        """The label index meaning "no class" (classifier-free guidance), or None."""
        return self.num_classes if self.num_classes > 0 else None

    def to_dict(self) -> dict:
        return {**asdict(self), "null_class": self.null_class}


def block_types(cfg: ModelConfig) -> tuple[list[str], list[str]]:
    """Down/up block types with attention where `cfg.attention_levels` says (default: last)."""
    n = len(cfg.block_out_channels)
    levels = cfg.attention_levels or [i == n - 1 for i in range(n)]
    down = ["AttnDownBlock2D" if a else "DownBlock2D" for a in levels]
    up = ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(levels)]
    return down, up


def build_unet(cfg: ModelConfig, spec: ModelSpec) -> UNet2DModel:
    """A freshly initialised UNet2DModel for `spec` (seed torch before calling for determinism)."""
    down, up = block_types(cfg)
    return UNet2DModel(
        sample_size=spec.sample_size,
        in_channels=spec.channels,
        out_channels=spec.channels,
        block_out_channels=tuple(cfg.block_out_channels),
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_num_groups,
        attention_head_dim=cfg.attention_head_dim,
        add_attention=cfg.mid_attention,
        dropout=cfg.dropout,
        num_class_embeds=spec.num_classes + 1 if spec.num_classes > 0 else None,
    )


def build_noise_scheduler(cfg: ModelConfig) -> DDPMScheduler:
    """The noise schedule (linear or cosine betas; epsilon or v prediction).

    Pixel models clip the predicted x0 to [-1, 1] while sampling (the data range); latent
    models do not (latents are unbounded).
    """
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=BETA_SCHEDULES[cfg.beta_schedule],
        prediction_type=cfg.prediction_type,
        clip_sample=not cfg.latent,
    )


def sampling_scheduler(
    noise_scheduler: DDPMScheduler | DDIMScheduler, kind: str
) -> DDPMScheduler | DDIMScheduler:
    """A fresh DDPM or DDIM sampler with the training schedule's config."""
    if kind == "ddpm":
        return DDPMScheduler.from_config(noise_scheduler.config)
    if kind == "ddim":
        return DDIMScheduler.from_config(noise_scheduler.config)
    raise ValueError(f"scheduler must be 'ddpm' or 'ddim', got {kind!r}")
