"""Real runs the stage tests build on (built once per session by fixtures in conftest.py).

A test of a stage reads the artifacts its upstream stages really wrote, so a change in what
a stage writes (a column, a manifest field, a file name) fails the tests of its readers.

- `upstream`: embed -> select on 150 digits at 8 px (pixel embeddings, gaussian criterion).
- `trained`: the same run continued: reference (on the subset) -> reweight -> train, a tiny
  class-conditional UNet trained in-process (`train.num_workers=0`).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from dedt_ray.store import RunStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.degraded_class import MODEL  # noqa: E402

ROWS = 150  # digits in every upstream run
UPSTREAM = [
    "data.image_size=8",
    f"data.limit={ROWS}",
    "embed.encoder=pixels",
    "select.criterion=gaussian",
    "select.keep_ratio=0.67",
]
TRAINED = [
    *UPSTREAM,
    *MODEL,
    "train.steps=40",
    "train.batch_size=10",
    "train.log_every=2",
    "train.checkpoint_every=3",
    "reference.steps=6",
    "reweight.steps=8",
    "reference.data=subset",
]


def copy_run(src: RunStore, dest: Path, *stages: str) -> RunStore:
    """A new run directory holding copies of `stages` of `src` (their manifests included)."""
    for stage in stages:
        shutil.copytree(src.path(stage), dest / stage)
    return RunStore(str(dest))
