"""Pure evaluation metrics: Frechet distance, streaming feature stats, k-NN manifold metrics."""

from dedt_ray.evaluate.fid import FeatureStats, frechet_distance, per_class_frechet
from dedt_ray.evaluate.manifold import density_coverage, precision_recall

__all__ = [
    "FeatureStats",
    "density_coverage",
    "frechet_distance",
    "per_class_frechet",
    "precision_recall",
]
