"""Streaming accumulation of feature sets and the metrics computed from them (pure numpy).

A `FeatureAccumulator` folds feature batches into float64 mean/covariance statistics
(overall, per class, and two random halves for a real-vs-real reference) plus a bounded,
seeded random subset for the k-NN metrics, so 50k samples at 2048-d take memory in D^2,
not N x D. `compute_metrics` turns a real and a generated accumulator into named metrics.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np

from dedt_ray.evaluate.fid import FeatureStats, frechet_distance
from dedt_ray.evaluate.manifold import density_coverage, precision_recall


def id_keys(ids: Any, seed: int) -> np.ndarray:
    """A uniform [0, 1) key per id, fixed by (seed, id) whatever the order rows arrive in."""
    out = np.empty(len(ids), dtype=np.float64)
    for i, rid in enumerate(ids):
        digest = hashlib.blake2b(f"{seed}:{rid}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "little") / 2.0**64
    return out


class Reservoir:
    """The `capacity` rows with the smallest keys seen so far.

    With uniform random keys that is a uniform random subset, and it does not depend on
    the order in which batches arrive.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.keys = np.zeros(0, dtype=np.float64)
        self.rows: np.ndarray | None = None
        self.labels = np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, keys: Any, rows: Any, labels: Any) -> Reservoir:
        keys = np.asarray(keys, dtype=np.float64)
        rows, labels = np.asarray(rows), np.asarray(labels, dtype=np.int64)
        if not len(keys) == len(rows) == len(labels):
            raise ValueError(f"{len(keys)} keys, {len(rows)} rows, {len(labels)} labels")
        if not len(keys):
            return self
        all_keys = np.concatenate([self.keys, keys])
        all_rows = rows if self.rows is None else np.concatenate([self.rows, rows])
        all_labels = np.concatenate([self.labels, labels])
        order = np.argsort(all_keys, kind="stable")[: self.capacity]
        self.keys, self.rows, self.labels = all_keys[order], all_rows[order], all_labels[order]
        return self


class FeatureAccumulator:
    """Statistics of one side (real or generated) of an evaluation, batch by batch."""

    def __init__(self, subset_size: int, per_class: bool = True, halves: bool = False) -> None:
        self.total = FeatureStats()
        self.per_class: dict[int, FeatureStats] | None = {} if per_class else None
        self.halves = (FeatureStats(), FeatureStats()) if halves else None
        self.subset = Reservoir(subset_size)
        self.class_counts: dict[int, int] = {}

    @property
    def count(self) -> int:
        return self.total.count

    def add(self, features: Any, labels: Any, keys: Any) -> FeatureAccumulator:
        """Fold in features [N, D] with their labels [N] and uniform [0, 1) keys [N]."""
        x = np.asarray(features)
        y = np.asarray(labels, dtype=np.int64)
        k = np.asarray(keys, dtype=np.float64)
        if x.ndim != 2 or y.shape != (len(x),) or k.shape != (len(x),):
            raise ValueError(f"features {x.shape}, labels {y.shape}, keys {k.shape} disagree")
        if not len(x):
            return self
        self.total.update(x)
        for c, n in zip(*np.unique(y[y >= 0], return_counts=True), strict=True):
            self.class_counts[int(c)] = self.class_counts.get(int(c), 0) + int(n)
        if self.per_class is not None:
            for c in np.unique(y[y >= 0]).tolist():
                self.per_class.setdefault(int(c), FeatureStats()).update(x[y == c])
        if self.halves is not None:
            # a hash bit of the key, not key < 0.5: independent of the subset's smallest keys
            second = (np.floor(k * 2.0**20).astype(np.int64) & 1).astype(bool)
            self.halves[0].update(x[~second])
            self.halves[1].update(x[second])
        self.subset.add(k, x.astype(np.float32, copy=False), y)
        return self


def _fd(a: FeatureStats, b: FeatureStats) -> float | None:
    if a.count < 2 or b.count < 2:
        return None
    return frechet_distance(a.mean, a.cov, b.mean, b.cov)


def compute_metrics(
    real: FeatureAccumulator, fake: FeatureAccumulator, metric: str, k: int = 5
) -> tuple[dict[str, float | None], list[dict[str, Any]], list[str]]:
    """(metrics, per-class rows, notes) of generated vs real features.

    metrics: `<metric>` (Frechet distance of the whole sets), `<metric>_class_mean` (mean over
    classes with a value), `<metric>_real_halves` (two random halves of the real set: the
    floor sampling noise alone gives), precision / recall (k-NN, Kynkaanniemi et al.),
    density / coverage (Naeem et al.). A metric that cannot be computed is None, with a note.
    """
    notes: list[str] = []
    metrics: dict[str, float | None] = {metric: _fd(real.total, fake.total)}
    if metrics[metric] is None:
        notes.append(f"{metric}: needs at least 2 real and 2 generated samples")
    rows: list[dict[str, Any]] = []
    if real.per_class is not None and fake.per_class is not None and fake.per_class:
        for c in sorted(set(real.per_class) | set(fake.per_class)):
            r, f = real.per_class.get(c, FeatureStats()), fake.per_class.get(c, FeatureStats())
            rows.append({"label": c, "value": _fd(r, f), "real": r.count, "generated": f.count})
        values = [row["value"] for row in rows if row["value"] is not None]
        metrics[f"{metric}_class_mean"] = float(np.mean(values)) if values else None
    if real.halves is not None:
        metrics[f"{metric}_real_halves"] = _fd(*real.halves)
    rs, fs = real.subset, fake.subset
    if len(rs) > k and len(fs) > k:
        metrics["precision"], metrics["recall"] = precision_recall(rs.rows, fs.rows, k=k)
        metrics["density"], metrics["coverage"] = density_coverage(rs.rows, fs.rows, k=k)
    else:
        notes.append(f"k-NN metrics need more than k={k} samples per side")
        metrics.update(precision=None, recall=None, density=None, coverage=None)
    return metrics, rows, notes


def json_number(value: Any) -> Any:
    """NaN / inf -> None so the JSON stays standard; numpy scalars -> Python numbers."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
