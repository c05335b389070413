"""The Ray Data transform that turns source rows into training rows (numpy only).

Apart from the trainer so that the Ray Data workers running it import numpy, not the trainer
(diffusers and torch: seconds of CPU in every worker process).
"""

from __future__ import annotations

import numpy as np


def prepare_rows(
    batch: dict[str, np.ndarray],
    column: str,
    shape: tuple[int, ...],
    keep: np.ndarray | None,
    keep_weights: np.ndarray | None,
    group_ids: np.ndarray | None = None,
    groups: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Keep the selected ids; bring the training column to `x` of `shape` per row; with
    `groups` (sorted by `group_ids`), the rows' group is their label."""
    ids = np.asarray(batch["id"]).astype(str)
    mask = np.ones(len(ids), bool) if keep is None else np.isin(ids, keep)
    x = np.asarray(batch[column])
    if x.dtype == object:
        x = np.stack(list(x))
    x = x[mask].reshape((-1, *shape))
    out = {"id": ids[mask], "label": np.asarray(batch["label"], np.int64)[mask], "x": x}
    if keep_weights is not None:
        out["weight"] = keep_weights[np.searchsorted(keep, out["id"])].astype(np.float32)
    if groups is not None:
        at = np.minimum(np.searchsorted(group_ids, out["id"]), len(group_ids) - 1)
        if len(out["id"]) and not np.array_equal(group_ids[at], out["id"]):
            raise ValueError("rows without a group in select/scores.parquet: rerun `select`")
        out["label"] = groups[at].astype(np.int64)
    return out
