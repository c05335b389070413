"""Class reweighting by Group DRO (DoReMi)."""

from dedt_ray.reweight.doremi import GroupDRO, doremi_update

__all__ = ["GroupDRO", "doremi_update"]
