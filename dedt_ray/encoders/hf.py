"""Hugging Face transformers image towers: CLIP, DINOv2, ViT.

Preprocessing comes from the checkpoint's image processor (`AutoImageProcessor`, read from its
preprocessor_config.json): resize side, centre crop, resampling filter, mean/std. A checkpoint
without one falls back to its config's `image_size` (no crop, bicubic) and the family's usual
mean/std (CLIP: OpenAI CLIP; DINOv2: ImageNet; ViT: 0.5/0.5, as ViTImageProcessor). The resize
itself is done with torch (antialiased, like PIL), not by the processor.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from dedt_ray.encoders.base import EncoderSpec, Preprocessor, resolve_hf_model

# family -> (fallback mean, fallback std); values as in transformers.image_utils
FALLBACK_NORM = {
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "dinov2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "vit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
RESAMPLE_MODES = {2: "bilinear", 3: "bicubic"}  # PIL filter ids


def _config(family: str, path: Path) -> Any:
    import transformers

    cls = {
        "clip": transformers.CLIPVisionConfig,  # also reads a full CLIPConfig's vision part
        "dinov2": transformers.Dinov2Config,
        "vit": transformers.ViTConfig,
    }[family]
    return cls.from_pretrained(path)


def preprocessor(family: str, model: str | None, in_channels: int, image_size: int) -> Preprocessor:
    """The checkpoint's own resize/crop/normalisation; reads JSON only, no weights."""
    from transformers import AutoImageProcessor

    path = resolve_hf_model(model, family)
    try:
        proc = AutoImageProcessor.from_pretrained(path)
    except OSError:  # no preprocessor_config.json
        mean, std = FALLBACK_NORM[family]
        size = _config(family, path).image_size
        return Preprocessor(in_channels, size, 3, mean=mean, std=std)
    side = proc.size.get("shortest_edge") or proc.size.get("height")
    crop = proc.crop_size.get("height") if getattr(proc, "do_center_crop", False) else None
    return Preprocessor(
        in_channels,
        input_size=crop or side,
        channels=3,
        mode=RESAMPLE_MODES.get(int(proc.resample), "bicubic"),
        resize_to=side if crop else None,
        mean=tuple(proc.image_mean) if proc.do_normalize else (0.0, 0.0, 0.0),
        std=tuple(proc.image_std) if proc.do_normalize else (1.0, 1.0, 1.0),
    )


class VisionEmbedding(nn.Module):
    """Normalised images -> a transformers vision model -> one vector per image.

    `output` is an attribute of the model's output (`image_embeds`, `pooler_output`) or `cls`:
    the first token of `last_hidden_state` (after the final layer norm).
    """

    def __init__(self, model: nn.Module, output: str) -> None:
        super().__init__()
        self.model = model
        self.output = output

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(pixel_values=x)
        if self.output == "cls":
            return out.last_hidden_state[:, 0]
        return getattr(out, self.output)


def load_pretrained(cls: Any, path: Path, **kwargs: Any) -> Any:
    """`cls.from_pretrained(path)` that refuses checkpoints missing some of the weights."""
    model, info = cls.from_pretrained(path, output_loading_info=True, **kwargs)
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ValueError(
            f"{path} is not a complete {cls.__name__} checkpoint: no weights for "
            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
        )
    return model


def network(
    family: str, model: str | None, pre: Preprocessor, dim: int, seed: int
) -> tuple[nn.Module, int]:
    """CLIP: projected image embeds (pooled output for a tower saved without projection);
    DINOv2, ViT: the CLS token. Returns (module, width)."""
    import transformers

    path = resolve_hf_model(model, family)
    if family == "clip":
        config = _config(family, path)
        if "CLIPVisionModel" in (config.architectures or []):  # a tower without projection
            tower = load_pretrained(transformers.CLIPVisionModel, path)
            return VisionEmbedding(tower, "pooler_output"), config.hidden_size
        tower = load_pretrained(transformers.CLIPVisionModelWithProjection, path)
        return VisionEmbedding(tower, "image_embeds"), tower.config.projection_dim
    if family == "dinov2":
        backbone = load_pretrained(transformers.Dinov2Model, path)
    else:
        backbone = load_pretrained(transformers.ViTModel, path, add_pooling_layer=False)
    return VisionEmbedding(backbone, "cls"), backbone.config.hidden_size


CLIP = EncoderSpec(partial(preprocessor, "clip"), partial(network, "clip"))
DINOV2 = EncoderSpec(partial(preprocessor, "dinov2"), partial(network, "dinov2"))
VIT = EncoderSpec(partial(preprocessor, "vit"), partial(network, "vit"))
