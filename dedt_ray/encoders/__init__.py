"""Surrogate encoders by name: images -> embeddings for the selection criteria.

Two halves, so the resize can run in its own CPU map without loading any weights:

    pre = build_preprocessor(name, model, in_channels, image_size)  # no weights, JSON at most
    pre.resize(uint8 [N, H, W, C]) -> uint8 [N, pre.input_size, pre.input_size, C']
    enc = build_encoder(name, model, dim, in_channels, image_size, device="cpu", seed=0)
    enc(enc.resize(images)) -> float32 [N, enc.dim]

C' is 3 for RGB networks (grey images are repeated) and C otherwise. `dim` is the width for
`random_projection`, a budget for `pixels` (C * s * s <= dim) and ignored by the pretrained
networks, whose width is their own (`enc.dim`). `model` is a local path or a Hugging Face
hub-cache name (for `inception`, a weights file path or a name in the torch hub cache); nothing
is ever downloaded.
"""

from __future__ import annotations

from dedt_ray.encoders.base import Encoder, EncoderSpec, Preprocessor
from dedt_ray.registry import ENCODERS as ENTRIES

__all__ = [
    "ENCODERS",
    "Encoder",
    "EncoderSpec",
    "Preprocessor",
    "build_encoder",
    "build_preprocessor",
    "locate_model",
]

ENCODERS: dict[str, EncoderSpec] = {name: entry.load() for name, entry in ENTRIES.items()}


def _spec(name: str, model: str | None) -> EncoderSpec:
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; choose one of: {', '.join(ENCODERS)}")
    spec = ENCODERS[name]
    if ENTRIES[name].needs_model and not model:
        raise ValueError(f"encoder {name!r} needs a model: a local path or a hub-cache name")
    return spec


def locate_model(name: str, model: str | None) -> str:
    """Where encoder `name`'s weights are (a file or folder), without loading them; raises
    FileNotFoundError naming `model` when they are not on this machine."""
    _spec(name, model)  # a known name; a model when it needs one
    if not ENTRIES[name].needs_model:
        return ""
    if name == "inception":
        from dedt_ray.encoders.inception import weights_path

        return str(weights_path(model))
    from dedt_ray.encoders.base import resolve_hf_model

    return str(resolve_hf_model(model, name))


def build_preprocessor(
    name: str, model: str | None, in_channels: int, image_size: int
) -> Preprocessor:
    """The encoder's resize and normalisation constants, without loading weights."""
    return _spec(name, model).preprocessor(model, in_channels, image_size)


def build_encoder(
    name: str,
    model: str | None,
    dim: int,
    in_channels: int,
    image_size: int,
    device: str = "cpu",
    seed: int = 0,
    autocast: str | None = None,
) -> Encoder:
    """Load encoder `name` onto `device`; `autocast` ("bf16"/"fp16") runs it in mixed precision."""
    spec = _spec(name, model)
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    pre = spec.preprocessor(model, in_channels, image_size)
    network, width = spec.network(model, pre, dim, seed)
    return Encoder(pre, network, width, device=device, autocast=autocast)
