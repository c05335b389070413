"""The extra feature spaces of `evaluate.extra_spaces`, and the selection/evaluation confound.

Selecting the training subset in the very feature space a metric measures in lowers that
metric without better images (Kynkaanniemi et al., "The Role of ImageNet Classes in Frechet
Inception Distance", ICLR 2023). `confound_notes` names every metric whose network has the
same weights as the selection encoder.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from dedt_ray.evaluate.features import INCEPTION, FeatureSpace

CHUNK = 2**22


def extra_spaces(ev: Any, in_channels: int, image_size: int) -> list[FeatureSpace]:
    """`evaluate.extra_spaces` as feature spaces; a model that is not found locally fails
    here, naming its key, before any sampling."""
    from dedt_ray.encoders.base import resolve_hf_model

    spaces = []
    for i, extra in enumerate(ev.extra_spaces):
        try:
            resolve_hf_model(extra.model, extra.encoder)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"evaluate.extra_spaces[{i}].model: {err}") from err
        spaces.append(
            FeatureSpace(extra.encoder, extra.label, in_channels, image_size, weights=extra.model)
        )
    return spaces


def _local(kind: str, model: str) -> Path | None:
    """The file (Inception) or folder (transformers) the weights resolve to here, if any."""
    from dedt_ray.encoders.base import resolve_hf_model
    from dedt_ray.encoders.inception import weights_path

    try:
        path = weights_path(model) if kind == INCEPTION else resolve_hf_model(model, kind)
    except (FileNotFoundError, ValueError):
        return None
    return path.resolve()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def same_weights(kind_a: str, model_a: str | None, kind_b: str, model_b: str | None) -> bool:
    """Whether two (encoder, weights) pairs are one network: the same kind and the same
    resolved path, or files of identical content; names when either is not found here."""
    if kind_a != kind_b or not model_a or not model_b:
        return False
    a, b = _local(kind_a, model_a), _local(kind_b, model_b)
    if a is None or b is None:
        return Path(model_a.rstrip("/")).name == Path(model_b.rstrip("/")).name
    if a == b:
        return True
    if a.is_file() and b.is_file() and a.stat().st_size == b.stat().st_size:
        return _sha256(a) == _sha256(b)
    return False


def selection_encoder(
    cfg: Any, embed_manifest: dict[str, Any] | None
) -> tuple[str, str | None] | None:
    """(encoder, model) the training subset was selected with; None without selection.

    The embed stage's manifest says what actually ran; the config is the fallback.
    """
    if not cfg.select.enabled:
        return None
    manifest = embed_manifest or {}
    if manifest.get("encoder"):
        return manifest["encoder"], manifest.get("model")
    return cfg.embed.encoder, cfg.embed.model


def confound_notes(
    selection: tuple[str, str | None] | None, spaces: list[FeatureSpace]
) -> list[str]:
    """One warning per feature space whose network is the selection encoder."""
    if selection is None:
        return []
    encoder, model = selection
    notes = []
    for space in spaces:
        if not same_weights(encoder, model, space.kind, space.weights):
            continue
        notes.append(
            f"{space.metric} and {space.kernel} are measured with the selection encoder's "
            f"weights (embed.encoder={encoder}, embed.model={model}): selecting the training "
            "subset in the space a metric measures in lowers that metric without better images "
            "(Kynkaanniemi et al., ICLR 2023). Select with another network (CLIP, DINOv2) or "
            "compare in a second space (evaluate.extra_spaces)."
        )
    return notes
