"""Time to quality on hand-made curves, and quality curves along real (tiny) training runs."""

from __future__ import annotations

import math
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy import stats

from dedt_ray.config import ConfigError, load_config
from dedt_ray.evaluate.curves import (
    SeedRun,
    bootstrap_speedup,
    compute_to_target,
    convergence,
    mean_interval,
    noise,
    summarize_study,
    value_at,
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


def test_value_at_interpolates_in_log_compute() -> None:
    assert value_at([1e2, 1e4], [8.0, 4.0], 1e3) == pytest.approx(6.0)  # halfway in log
    assert value_at([1e2, 1e4], [8.0, 4.0], 1e2) == 8.0
    assert value_at([1e2, 1e4], [8.0, 4.0], 1e5) is None  # beyond the run
    assert value_at([1e2, 1e4], [8.0, 4.0], 10.0) is None


def _run(flops: list[float], values: list[float], rows: int, batch: int = 10) -> SeedRun:
    """A hand-made run: one point per compute, images seen = compute / 1e3 (flops per image)."""
    points = [{"train_flops": c, "images_seen": c / 1e3, "m": v, "m_half_a": v - 0.1,
               "m_half_b": v + 0.1} for c, v in zip(flops, values, strict=True)]  # fmt: skip
    return SeedRun(points, rows, evaluated=values[-1] * 0.9, images_seen=int(flops[-1] / 1e3))


def test_study_summary_on_hand_made_curves() -> None:
    base = {0: _run([1e6, 1e7, 1e8], [8.0, 3.0, 2.0], 100),
            1: _run([1e6, 1e7, 1e8], [8.0, 4.0, 2.0], 100)}  # fmt: skip
    fast = {0: _run([1e5, 1e6, 1e7], [6.0, 2.1, 1.5], 30),
            1: _run([1e5, 1e6, 1e7], [6.0, 2.1, 1.8], 30)}  # fmt: skip
    slow = {0: _run([1e6, 1e7], [9.0, 5.0], 30)}  # never reaches the target
    out = summarize_study({"full": base, "fast": fast, "slow": slow}, "full", "m", 0.05,
                          draws=200)  # fmt: skip
    assert out["baseline_final"] == 2.0 and out["target"] == pytest.approx(2.1)
    # each baseline seed crosses 2.1 between 1e7 and 1e8 (log-linear); fast reaches it at 1e6
    b0 = 10 ** (7 + (3.0 - 2.1) / (3.0 - 2.0))
    b1 = 10 ** (7 + (4.0 - 2.1) / (4.0 - 2.0))
    row = out["settings"]["fast"]
    assert row["compute_to_target"] == {"0": pytest.approx(1e6), "1": pytest.approx(1e6)}
    assert row["speedup"]["point"] == pytest.approx((b0 + b1) / 2 / 1e6)
    assert row["speedup"]["low"] <= row["speedup"]["point"] <= row["speedup"]["high"]
    assert out["settings"]["full"]["speedup"]["point"] == pytest.approx(1.0)
    assert row["final"]["mean"] == pytest.approx(1.65) and row["final"]["low"] < 1.65
    assert row["evaluated"]["mean"] == pytest.approx(1.65 * 0.9)
    # the baseline's epochs: 1e5 images over 100 rows = 1000; fast at 30 rows: 3e4 images,
    # 3e7 FLOPs, beyond its last point (1e7): the equal-epochs point is not on its curve
    assert out["baseline_epochs"] == pytest.approx(1000.0)
    assert row["equal_epochs"]["values"] == {"0": "beyond the run", "1": "beyond the run"}
    assert out["settings"]["slow"]["compute_to_target"] == {"0": "not reached"}
    assert out["settings"]["slow"]["speedup"]["point"] == 0.0
    assert row["noise"] == pytest.approx(0.1)  # half of every split-half gap (0.2)
    half = summarize_study({"full": base, "fast": fast}, "full", "m", 0.05)
    at = half["settings"]["full"]["equal_epochs"]  # the baseline at its own epochs: its end
    assert at["mean"] == pytest.approx(2.0)


def test_noise_floor_draws_the_curves_class_counts() -> None:
    """The floor's real images have a curve point's class counts (classes in turn), not the
    data's proportions. 300 rows of class 0 and 100 of class 1 at 10 x one-hot: a balanced draw
    of 100 (share p = 1/2 of class 1) against the rest (q = 50/300) is 2 (10 (p - q))^2 apart in
    the means, plus the trace term of two rank-1 covariances with eigenvalues 2 * 100 p (1 - p)
    and the same for q; a random draw, ~0."""
    from dedt_ray.evaluate.scorer import noise_floor

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], [300, 100])
    rows = 10.0 * np.eye(2)[labels] + rng.normal(0, 0.1, (400, 2))
    p, q = 0.5, 50 / 300
    gap = (
        2 * (10 * (p - q)) ** 2 + (math.sqrt(200 * p * (1 - p)) - math.sqrt(200 * q * (1 - q))) ** 2
    )
    assert noise_floor(rows, labels, 100, [0, 1], seed=0) == pytest.approx(gap, rel=0.02)
    assert noise_floor(rows, labels, 100, None, seed=0) < 0.1 * gap
    balanced = np.arange(400) % 2
    rows_b = 10.0 * np.eye(2)[balanced] + rng.normal(0, 0.1, (400, 2))
    assert noise_floor(rows_b, balanced, 100, [0, 1], seed=0) < 0.1 * gap
    # too few rows of a class (100 for a draw of 150), or left on the other side: no floor
    assert math.isnan(noise_floor(rows, labels, 300, [0, 1], seed=0))
    assert math.isnan(noise_floor(rows, labels, 201, [0, 1], seed=0))  # 199 left
    assert math.isnan(noise_floor(rows, labels, 201, None, seed=0))
    # against the rest of every real image (the drawn rows taken out of the total's
    # statistics): with the rows as the total, the same as against the other rows
    total = (rows.mean(0), np.cov(rows, rowvar=False), len(rows))
    for classes in ([0, 1], None):
        assert noise_floor(rows, labels, 100, classes, 0, total) == pytest.approx(
            noise_floor(rows, labels, 100, classes, 0), rel=1e-6, abs=1e-9
        )


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


def toy_scorer(classes: list[int], parts: int = 1, in_turn: bool = False):
    """A CurveScorer over a toy classifier space, 8-px grey images of 2 classes, tiny UNet."""
    from dedt_ray.config import ModelConfig
    from dedt_ray.diffusion.models import ModelSpec
    from dedt_ray.evaluate.classifier import to_bytes, train_classifier
    from dedt_ray.evaluate.features import FeatureSpace
    from dedt_ray.evaluate.scorer import CurveScorer, CurveSettings, RealSide
    from dedt_ray.smoke import SMOKE_UNET

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 8, 8, 1), dtype=np.uint8)
    labels = np.arange(40) % 2
    net, net_cfg = train_classifier(images, labels, 2, epochs=1, feature_dim=8, width=8)
    space = FeatureSpace("classifier", "toy", 1, 8, classifier=(to_bytes(net), net_cfg))
    real_rows = rng.normal(size=(40, 8))
    real = RealSide(real_rows.mean(0), np.cov(real_rows, rowvar=False), real_rows, 40, 0.0)
    model_cfg = ModelConfig.model_validate({**SMOKE_UNET, "mid_attention": False,
                                            "attention_levels": [False, False]})  # fmt: skip
    spec = ModelSpec(8, 1, 2)
    scorer = CurveScorer(
        space, real, CurveSettings(samples=8, steps=2, patience=2), "FD_toy", "KD_toy",
        model_cfg.model_dump(mode="json"), spec.to_dict(), classes, parts=parts,
        assemble=lambda models: models[0], in_turn=in_turn,
    )  # fmt: skip
    return scorer, model_cfg, spec


def test_scorer_that_cannot_sample_fails_at_start(one_thread):
    """The scorer samples and scores a scratch model when it starts (before training): a class
    the model has no embedding for fails there, not at the first point mid-training."""
    with pytest.raises(IndexError):
        toy_scorer(classes=[0, 7])


def test_points_are_scored_in_turn_only_when_the_trainer_fills_the_cores():
    import os

    from dedt_ray.evaluate.scorer import scoring_threads

    cores = len(os.sched_getaffinity(0))
    local = ["train.num_workers=0"]
    assert scoring_threads(load_config(None, local), 0.0) == (True, cores)  # all threads
    assert scoring_threads(load_config(None, [*local, f"train.threads_per_worker={cores}"]),
                           0.0) == (True, cores)  # fmt: skip
    assert scoring_threads(load_config(None, local), 0.5) == (False, 1)  # a GPU of its own
    assert scoring_threads(load_config(None, ["train.num_workers=1"]), 0.0) == (False, 1)
    if cores > 1:  # a trainer of one thread leaves the other cores to the scorer
        one = load_config(None, [*local, "train.threads_per_worker=1"])
        assert scoring_threads(one, 0.0) == (False, cores - 1)


def test_scorer_in_turn_returns_once_the_point_is_scored(one_thread):
    """In turn (an in-process CPU trainer sharing the scorer's cores), `submit` returns only
    when the point is scored, or held for a composite model's other parts."""
    from dedt_ray.diffusion.job import ScratchModel
    from dedt_ray.diffusion.models import build_unet

    scorer, model_cfg, spec = toy_scorer(classes=[0, 1], parts=2, in_turn=True)
    weights = build_unet(model_cfg, spec).state_dict()
    point = {"step": 4, "images_seen": 32, "flops": 40.0, "wall_s": 1.0}
    scorer.submit(point, weights, ScratchModel(), 0)
    held = scorer.status()
    assert held["in_turn"] and held["points"] == 0  # step 4 waits for part 1
    scorer.submit(point, weights, ScratchModel(), 1)
    assert scorer.status()["points"] == 1


def test_composite_point_a_part_never_reached_is_scored_with_its_final_weights(one_thread):
    """A routed model's parts end at different steps (InfoBatch epochs): part 1 stops after
    step 4, part 0 goes on to 8. At `finish` the step-8 point is scored with part 1's final
    (step-4) weights, and its compute is what both parts really spent."""
    import torch

    from dedt_ray.diffusion.job import ScratchModel
    from dedt_ray.diffusion.models import build_unet

    scorer, model_cfg, spec = toy_scorer(classes=[0, 1], parts=2)
    torch.manual_seed(0)
    weights = build_unet(model_cfg, spec).state_dict()

    def submit(key: int, step: int) -> None:
        point = {"step": step, "images_seen": 8 * step, "flops": 10.0 * step, "wall_s": step}
        scorer.submit(point, weights, ScratchModel(), key)

    submit(0, 4)
    submit(1, 4)
    submit(0, 8)  # part 1 never reaches step 8
    deadline = time.monotonic() + 60
    while scorer.status()["points"] < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert scorer.status()["points"] == 1  # step 8 is held for part 1
    points = scorer.finish([4, 8], timeout=60)
    assert [p["step"] for p in points] == [4, 8]
    assert [p["train_flops"] for p in points] == [40.0 + 40.0, 80.0 + 40.0]
    assert points[1]["images_seen"] == 64 and math.isfinite(points[1]["FD_toy"])
