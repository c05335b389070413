"""What a config can name: surrogate encoders and selection criteria, declared once, here.

Each entry points at its implementation as "module:attribute", imported only when used, so the
config (which builds its choices from these tables) stays free of torch and of the packages
that implement them. A new encoder or criterion is one entry here plus its implementation.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class Entry:
    """One choice: where it is implemented and what it is."""

    target: str  # "module:attribute"
    description: str
    needs_model: bool = False  # an encoder that needs `embed.model` (weights)

    def load(self) -> Any:
        module, attribute = self.target.split(":")
        return getattr(importlib.import_module(module), attribute)


ENCODERS: dict[str, Entry] = {
    "pixels": Entry(
        "dedt_ray.encoders.pixels:PIXELS", "pixels in [0, 1], area-pooled to fit dim, flattened"
    ),
    "random_projection": Entry(
        "dedt_ray.encoders.pixels:RANDOM_PROJECTION",
        "seeded Gaussian (Johnson-Lindenstrauss) projection of the pixels to dim",
    ),
    "clip": Entry("dedt_ray.encoders.hf:CLIP", "CLIP image tower: projected image embeds", True),
    "dinov2": Entry("dedt_ray.encoders.hf:DINOV2", "DINOv2: CLS token", True),
    "vit": Entry("dedt_ray.encoders.hf:VIT", "ViT: CLS token", True),
    "inception": Entry(
        "dedt_ray.encoders.inception:INCEPTION",
        "Inception-v3 pool3 (2048-d): pytorch-fid's network and weights file",
        True,
    ),
    "vae": Entry("dedt_ray.encoders.vae:VAE", "AutoencoderKL latent mean, flattened", True),
}

CRITERIA: dict[str, Entry] = {
    "gaussian": Entry(
        "dedt_ray.selection.criteria:gaussian_scores", "Gaussian log-density within the class"
    ),
    "ppca": Entry("dedt_ray.selection.criteria:ppca_scores", "probabilistic PCA log-density"),
    "knn": Entry("dedt_ray.selection.neighbors:knn_scores", "minus the k-th neighbour distance"),
    "moderate": Entry(
        "dedt_ray.selection.criteria:moderate_scores", "middle band of distances to the median"
    ),
    "kcenter": Entry("dedt_ray.selection.greedy:kcenter_scores", "greedy k-center order"),
    "herding": Entry("dedt_ray.selection.greedy:herding_scores", "greedy herding order"),
    "random": Entry("dedt_ray.selection.criteria:random_scores", "uniform, seeded"),
}


def choice(table: dict[str, Entry]) -> Any:
    """A `Literal[...]` type of a table's names, for a config field."""
    return Literal[tuple(table)]  # type: ignore[valid-type]
