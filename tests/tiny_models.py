"""Tiny random-weight checkpoints saved the way the real ones are (shared by the tests)."""

from __future__ import annotations

from pathlib import Path

import torch


def vision_config(**extra: int) -> dict[str, int]:
    """A 2-layer, 32-wide ViT-style tower on 32 px images (patches of 8)."""
    return dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        **extra,
    )


def save_clip(folder: Path, seed: int = 0) -> Path:
    """CLIPVisionModelWithProjection (16-d image embeds) + an image processor (40 -> crop 32)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPVisionConfig(**vision_config(intermediate_size=37, projection_dim=16))
    CLIPVisionModelWithProjection(config).save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(folder)
    return folder


def save_dinov2(folder: Path, seed: int = 0) -> Path:
    """Dinov2Model (32-d CLS token), no image processor (the config's 32 px, ImageNet norm)."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    Dinov2Model(Dinov2Config(**vision_config(mlp_ratio=2))).save_pretrained(folder)
    return folder


def random_inception(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict of pytorch-fid's FID Inception with random weights (Kaiming convs, so
    activations do not vanish over its 90-odd layers)."""
    from dedt_ray.encoders.inception import FIDInceptionV3

    torch.manual_seed(seed)
    net = FIDInceptionV3()
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return net.state_dict()


def save_inception(path: Path, seed: int = 0) -> Path:
    """`random_inception` saved with torch.save, as pytorch-fid's weights file is."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(random_inception(seed), path)
    return path
