"""Image sources as Ray Datasets with one schema: id, label, image (uint8 HxWxC)."""

from dedt_ray.data.sources import Source, fetch_images, open_source

__all__ = ["Source", "fetch_images", "open_source"]
