"""Time to quality on hand-made curves, and quality curves along real (tiny) training runs."""

from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy import stats

from dedt_ray.config import ConfigError, load_config
from dedt_ray.evaluate.curves import (
    bootstrap_speedup,
    compute_to_target,
    convergence,
    mean_interval,
    noise,
)
from dedt_ray.pipeline import run_stage
from dedt_ray.smoke import SMOKE_MODEL
from dedt_ray.store import RunStore


def test_noise_is_half_the_median_half_gap() -> None:
    assert noise([1.0, 2.0, 3.0], [1.4, 2.2, 4.0]) == pytest.approx(0.2)  # gaps .4 .2 1
    assert math.isnan(noise([float("nan")], [1.0]))


def test_convergence_rule() -> None:
    falling = [10, 8, 6, 4, 3, 2]
    assert not convergence(falling, sigma=0.5, patience=2)[0]
    flat = [10, 5, 4.9, 5.1, 4.95]  # after 5: within the noise 0.2 for 3 evaluations
    stop, why = convergence(flat, sigma=0.2, patience=3)
    assert stop and "3 evaluations" in why and "4.9" in why
    assert not convergence(flat, sigma=0.2, patience=4)[0]
    assert not convergence(flat, sigma=0.05, patience=3)[0]  # 4.9 improved on 5 by > 0.05
    with pytest.raises(ValueError):
        convergence(flat, 0.1, 0)


def test_compute_to_target_interpolates_in_log_compute() -> None:
    compute, values = [1e10, 1e11, 1e12], [9.0, 5.0, 1.0]
    # 3.0 is halfway from 5 to 1: halfway between log 1e11 and log 1e12
    assert compute_to_target(compute, values, 3.0) == pytest.approx(math.sqrt(1e11 * 1e12))
    assert compute_to_target(compute, values, 9.0) == 1e10  # first point already there
    assert compute_to_target(compute, values, 0.5) is None  # never reached
    assert compute_to_target([3, 1, 2], [1.0, 9.0, 5.0], 5.0) == 2  # points sorted first


def test_mean_interval_is_student_t() -> None:
    x = [1.0, 2.0, 4.0]
    mean, lo, hi = mean_interval(x)
    half = stats.t.ppf(0.975, 2) * np.std(x, ddof=1) / math.sqrt(3)
    assert mean == pytest.approx(7 / 3) and hi - mean == pytest.approx(half)
    assert mean_interval([2.0]) == (2.0, 2.0, 2.0)


def test_bootstrap_speedup() -> None:
    point, lo, hi = bootstrap_speedup([10.0, 10.0, 10.0], [5.0, 5.0, 5.0])
    assert point == lo == hi == 2.0
    point, lo, hi = bootstrap_speedup([9.0, 10.0, 11.0], [4.0, 5.0, 6.0], seed=1)
    assert point == pytest.approx(2.0) and lo < 2.0 < hi
    point, lo, hi = bootstrap_speedup([10.0, 10.0], [5.0, None])  # one seed never reached it
    assert point == 0.0 and lo == 0.0 and hi == 2.0
    assert bootstrap_speedup([None], [5.0])[0] == math.inf


def test_converged_needs_a_curve() -> None:
    with pytest.raises(ConfigError, match="eval_every"):
        load_config(None, ["train.until=converged"])


CURVE = [
    *SMOKE_MODEL,
    "data.limit=120",
    "select.enabled=false",
    "reweight.enabled=false",
    "train.num_workers=0",
    "train.batch_size=8",
    "train.log_every=4",
    "train.eval_every=4",
    "train.eval_samples=16",
    "train.eval_steps=2",
    "evaluate.feature_space=classifier",
    "evaluate.classifier_epochs=1",
    "evaluate.classifier_max_images=120",
    "evaluate.manifold_samples=64",
]


@pytest.mark.slow
def test_curve_points_along_training_and_converged_stop(ray_cluster, tmp_path):
    store = RunStore(str(tmp_path / "run"))
    manifest = run_stage("train", load_config(None, [*CURVE, "train.steps=10"]), store)
    points = pq.read_table(store.path("train", "curve.parquet")).to_pylist()
    assert [p["step"] for p in points] == [4, 8, 10]  # every 4 steps and the last step
    for key in ("train_flops", "images_seen", "wall_s"):
        values = [p[key] for p in points]
        assert values == sorted(values) and values[0] > 0
    assert points[-1]["train_flops"] == manifest["flops"]
    metric = manifest["curve"]["metric"]
    assert metric.startswith("FD_") and all(math.isfinite(p[metric]) for p in points)
    assert all(p["KD_digits-cnn_mean"] is not None and p["eval_seconds"] > 0 for p in points)
    assert manifest["stopped"] is None and manifest["curve"]["points"] == 3
    assert math.isfinite(manifest["curve"]["noise_floor"])
    assert store.exists("curve")  # the real features, cached for the run

    # a model that does not move (lr ~ 0) has a flat curve: training stops at an evaluation
    flat = [*CURVE, "train.steps=200", "train.lr=1e-12", "train.until=converged",
            "train.patience=2"]  # fmt: skip
    stopped = run_stage("train", load_config(None, flat), RunStore(str(tmp_path / "flat")))
    assert stopped["stopped"] and "converged" in stopped["stopped"]
    assert stopped["steps"] < 200 and stopped["steps"] % 4 == 0
    assert "stopped early" in stopped["summary"] and stopped["curve"]["points"] >= 3
