"""Class reweighting by Group DRO (DoReMi): the math, the proxy loss, the stages.

Imports are lazy so that `dedt_ray.reweight.checks` (used by the CLI before any Ray work)
does not pull in torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dedt_ray.reweight.doremi import GroupDRO, doremi_update
    from dedt_ray.reweight.dro import DROLoss

__all__ = ["DROLoss", "GroupDRO", "doremi_update"]
_HOME = {"GroupDRO": "doremi", "doremi_update": "doremi", "DROLoss": "dro"}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(import_module(f"dedt_ray.reweight.{_HOME[name]}"), name)
    raise AttributeError(f"module 'dedt_ray.reweight' has no attribute {name!r}")
