"""Training state on disk without pickle: tensors in safetensors, everything else in JSON.

`flatten` turns a nested state (dicts with str or int keys, lists, tuples, tensors, numbers,
strings, None) into a JSON-able structure plus a flat {name: tensor} map; `unflatten`
reverses it. Optimizer, LR scheduler, EMA and grad-scaler state dicts all fit this shape.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file

TENSORS = "state.safetensors"
STRUCTURE = "state.json"


def flatten(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "") -> Any:
    """A JSON-able copy of `obj`; tensors move into `tensors` under dotted names."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"__dict__": {k: flatten(v, tensors, f"{prefix}.{k}") for k, v in obj.items()}}
        if all(isinstance(k, int) and not isinstance(k, bool) for k in obj):
            return {
                "__intdict__": [[k, flatten(v, tensors, f"{prefix}.{k}")] for k, v in obj.items()]
            }
        raise TypeError(f"{prefix}: dict keys must be all str or all int")
    if isinstance(obj, list | tuple):
        items = [flatten(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"{prefix}: cannot store {type(obj).__name__} without pickle")


def unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `flatten`."""
    if isinstance(obj, list):
        return [unflatten(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__dict__" in obj:
        return {k: unflatten(v, tensors) for k, v in obj["__dict__"].items()}
    if "__intdict__" in obj:
        return {int(k): unflatten(v, tensors) for k, v in obj["__intdict__"]}
    if "__tuple__" in obj:
        return tuple(unflatten(v, tensors) for v in obj["__tuple__"])
    raise ValueError(f"unknown node in state structure: {sorted(obj)}")


def save_state(directory: str, state: dict[str, Any]) -> None:
    """Write `state` as state.safetensors + state.json into a local folder."""
    tensors: dict[str, torch.Tensor] = {}
    structure = flatten(state, tensors, "s")
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, TENSORS))
    with open(os.path.join(directory, STRUCTURE), "w") as f:
        json.dump(structure, f)


def load_state(directory: str, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a state written by `save_state` (safetensors + JSON; nothing is unpickled)."""
    tensors = load_file(os.path.join(directory, TENSORS), device=str(device))
    with open(os.path.join(directory, STRUCTURE)) as f:
        return unflatten(json.load(f), tensors)


def checkpoint_dirs(names: list[str]) -> list[str]:
    """The `checkpoint_<step>` folder names among `names`, oldest first."""
    found = [n for n in names if n.startswith("checkpoint_") and n[11:].isdigit()]
    return sorted(found, key=lambda n: int(n[11:]))


def damaged_reason(directory: str) -> str | None:
    """Why the checkpoint folder does not load (truncated, missing, not JSON), or None."""
    try:
        load_state(directory)
    except Exception as exc:  # safetensors, OSError, JSON, a missing tensor: all mean damaged
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None
