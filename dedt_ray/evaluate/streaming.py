"""Streaming accumulation of feature sets and the metrics computed from them (pure numpy).

A `FeatureAccumulator` folds feature batches into float64 mean/covariance statistics
(overall, per class, and two random halves for a real-vs-real reference) plus a bounded,
seeded random subset for the k-NN metrics and KID, so 50k samples at 2048-d take memory in
D^2, not N x D. `compute_metrics` turns a real and a generated accumulator into named metrics.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from dedt_ray.evaluate.fid import FeatureStats, frechet_distance
from dedt_ray.evaluate.kid import kernel_distance
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


@dataclass(frozen=True)
class MetricSettings:
    """How the metrics are computed (the `evaluate.*` keys of the same names)."""

    nearest_k: int = 3  # precision/recall
    coverage_k: int = 5  # density/coverage
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    seed: int = 0  # KID's subset draws
    frechet: Literal["svd", "sqrtm"] = "svd"  # sqrtm: pytorch-fid's formula (`dedt-ray fid`)

    @classmethod
    def from_config(cls, ev: Any, frechet: Literal["svd", "sqrtm"] = "svd") -> MetricSettings:
        return cls(ev.nearest_k, ev.coverage_k, ev.kid_subsets, ev.kid_subset_size, ev.seed,
                   frechet)  # fmt: skip


def _fd(a: FeatureStats, b: FeatureStats, method: str = "svd") -> float | None:
    if a.count < 2 or b.count < 2:
        return None
    return frechet_distance(a.mean, a.cov, b.mean, b.cov, method=method)


def _kid(real: Any, fake: Any, settings: MetricSettings, subsets: int) -> float | None:
    if len(real) < 2 or len(fake) < 2:
        return None
    mean, _, _ = kernel_distance(real, fake, subsets, settings.kid_subset_size, settings.seed)
    return mean


def _class_rows(
    real: FeatureAccumulator, fake: FeatureAccumulator, settings: MetricSettings
) -> list[dict[str, Any]]:
    """Per class: the Frechet distance of its statistics and one KID estimate on its
    reservoir rows (min(n_real, n_generated, kid_subset_size) per side)."""
    rows = []
    rs, fs = real.subset, fake.subset
    for c in sorted(set(real.per_class) | set(fake.per_class)):
        r, f = real.per_class.get(c, FeatureStats()), fake.per_class.get(c, FeatureStats())
        kid = None
        if rs.rows is not None and fs.rows is not None:
            kid = _kid(rs.rows[rs.labels == c], fs.rows[fs.labels == c], settings, subsets=1)
        rows.append({"label": c, "value": _fd(r, f, settings.frechet), "kid": kid,
                     "real": r.count, "generated": f.count})  # fmt: skip
    return rows


def _mean_of(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(known)) if known else None


def compute_metrics(
    real: FeatureAccumulator,
    fake: FeatureAccumulator,
    metric: str,
    kernel: str,
    settings: MetricSettings | None = None,
    manifold: bool = True,
) -> tuple[dict[str, float | None], list[dict[str, Any]], list[str]]:
    """(metrics, per-class rows, notes) of generated vs real features.

    metrics: `<metric>` (Frechet distance of the whole sets), `<kernel>_mean` / `_std` (KID
    on the reservoir subsets), `<metric>_class_mean` / `<kernel>_class_mean` (means over the
    classes with a value), `<metric>_real_halves` (two random halves of the real set: the
    floor sampling noise alone gives), and with `manifold` precision / recall (k-NN,
    Kynkaanniemi et al.) and density / coverage (Naeem et al.). A metric that cannot be
    computed is None, with a note.
    """
    settings = settings or MetricSettings()
    notes: list[str] = []
    metrics: dict[str, float | None] = {metric: _fd(real.total, fake.total, settings.frechet)}
    if metrics[metric] is None:
        notes.append(f"{metric}: needs at least 2 real and 2 generated samples")
    rs, fs = real.subset, fake.subset
    metrics[f"{kernel}_mean"] = metrics[f"{kernel}_std"] = None
    if len(rs) >= 2 and len(fs) >= 2:
        metrics[f"{kernel}_mean"], metrics[f"{kernel}_std"], _ = kernel_distance(
            rs.rows, fs.rows, settings.kid_subsets, settings.kid_subset_size, settings.seed
        )
    else:
        notes.append(f"{kernel}: needs at least 2 real and 2 generated samples")
    rows: list[dict[str, Any]] = []
    if real.per_class is not None and fake.per_class is not None and fake.per_class:
        rows = _class_rows(real, fake, settings)
        metrics[f"{metric}_class_mean"] = _mean_of([row["value"] for row in rows])
        metrics[f"{kernel}_class_mean"] = _mean_of([row["kid"] for row in rows])
    if real.halves is not None:
        metrics[f"{metric}_real_halves"] = _fd(*real.halves, settings.frechet)
    if manifold:
        metrics.update(_manifold_metrics(rs, fs, settings, notes))
    return metrics, rows, notes


def _manifold_metrics(
    rs: Reservoir, fs: Reservoir, settings: MetricSettings, notes: list[str]
) -> dict[str, float | None]:
    out: dict[str, float | None] = dict.fromkeys(("precision", "recall", "density", "coverage"))
    k, ck = settings.nearest_k, settings.coverage_k
    if len(rs) > k and len(fs) > k:
        out["precision"], out["recall"] = precision_recall(rs.rows, fs.rows, k=k)
    else:
        notes.append(f"precision/recall need more than k={k} samples per side")
    if len(rs) > ck and len(fs) > ck:
        out["density"], out["coverage"] = density_coverage(rs.rows, fs.rows, k=ck)
    else:
        notes.append(f"density/coverage need more than k={ck} samples per side")
    return out


def json_number(value: Any) -> Any:
    """NaN / inf -> None so the JSON stays standard; numpy scalars -> Python numbers."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
