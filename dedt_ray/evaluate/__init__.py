"""Evaluation: feature spaces, streaming Frechet and kernel distances, k-NN manifold metrics
(pure), the `evaluate` stage (`dedt_ray.evaluate.stage`, the Ray shell) and `dedt-ray fid`
(`dedt_ray.evaluate.fid_cli`).

The names below load on first use, so `dedt-ray`'s argument parser (which registers
`fid_cli`) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "dedt_ray.evaluate.classifier": ("SmallCNN", "train_classifier"),
    "dedt_ray.evaluate.features": (
        "FeatureExtractor",
        "FeatureSpace",
        "classifier_name",
        "conform_images",
        "kernel_name",
        "metric_name",
    ),
    "dedt_ray.evaluate.fid": ("FeatureStats", "frechet_distance", "per_class_frechet"),
    "dedt_ray.evaluate.generation": ("Share", "ShareSampler", "plan_shares", "samples_grid"),
    "dedt_ray.evaluate.kid": ("kernel_distance", "mmd2_unbiased", "polynomial_kernel"),
    "dedt_ray.evaluate.manifold": ("density_coverage", "precision_recall"),
    "dedt_ray.evaluate.streaming": (
        "FeatureAccumulator",
        "MetricSettings",
        "Reservoir",
        "compute_metrics",
        "id_keys",
    ),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
