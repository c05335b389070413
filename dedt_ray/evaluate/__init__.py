"""Evaluation: feature spaces, streaming Frechet distances, k-NN manifold metrics (pure), and
the `evaluate` stage (`dedt_ray.evaluate.stage`, the Ray shell)."""

from dedt_ray.evaluate.classifier import SmallCNN, train_classifier
from dedt_ray.evaluate.features import (
    FeatureExtractor,
    FeatureSpace,
    classifier_name,
    conform_images,
    metric_name,
)
from dedt_ray.evaluate.fid import FeatureStats, frechet_distance, per_class_frechet
from dedt_ray.evaluate.generation import Share, ShareSampler, plan_shares, samples_grid
from dedt_ray.evaluate.manifold import density_coverage, precision_recall
from dedt_ray.evaluate.streaming import FeatureAccumulator, Reservoir, compute_metrics, id_keys

__all__ = [
    "FeatureAccumulator",
    "FeatureExtractor",
    "FeatureSpace",
    "FeatureStats",
    "Reservoir",
    "Share",
    "ShareSampler",
    "SmallCNN",
    "classifier_name",
    "compute_metrics",
    "conform_images",
    "density_coverage",
    "frechet_distance",
    "id_keys",
    "metric_name",
    "per_class_frechet",
    "plan_shares",
    "precision_recall",
    "samples_grid",
    "train_classifier",
]
