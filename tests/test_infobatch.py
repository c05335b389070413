"""InfoBatch: the pruning rule against a hand computation, the per-rank stream, the trainer."""

from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from dedt_ray.config import ConfigError, load_config
from dedt_ray.diffusion.infobatch import InfoBatchStream, plan_epoch
from dedt_ray.pipeline import run_stage
from dedt_ray.smoke import SMOKE_MODEL
from dedt_ray.store import RunStore


def test_plan_epoch_by_hand() -> None:
    scores = np.array([0.1, 0.2, 0.9, np.nan, 0.5, 0.05])
    plan = plan_epoch(scores, ratio=0.5, prune=True, seed=0, epoch=3)
    # mean of the recorded 0.35: rows 0, 1, 5 are well learnt; int(0.5 x 3) = 1 of them stays
    assert plan.keep[[2, 3, 4]].all()  # above the mean, or never scored
    kept_low = np.flatnonzero(plan.keep[[0, 1, 5]])
    assert len(kept_low) == 1 and plan.kept == 4
    weights = np.ones(6)
    weights[[0, 1, 5][kept_low[0]]] = 2.0  # 1 / (1 - 0.5)
    np.testing.assert_array_equal(plan.weights, weights)
    assert np.array_equal(plan_epoch(scores, 0.5, True, 0, 3).keep, plan.keep)  # seeded
    assert plan_epoch(scores, 0.5, False, 0, 3).kept == 6  # annealed: nothing pruned
    assert plan_epoch(np.full(6, np.nan), 0.5, True, 0, 0).kept == 6  # nothing scored yet
    with pytest.raises(ValueError):
        plan_epoch(scores, 1.0, True, 0, 0)


def _streams(n: int = 40, world: int = 2, epochs: float = 4.0, per_rank: int = 4):
    labels = np.arange(n) % 4
    half = n // world
    return [
        InfoBatchStream(
            labels[r * half : (r + 1) * half],
            r * half,
            n,
            per_rank,
            world,
            0.5,
            0.75,
            epochs,
            seed=1,
            rank=r,
        )  # fmt: skip
        for r in range(world)
    ]


def _run_epoch(streams, losses) -> list[int]:
    """One epoch on every rank; each step's rows are recorded on every rank, as the trainer
    does after its all-gather. Returns the global rows trained."""
    seen, steps = [], streams[0].steps_per_epoch
    for _ in range(steps):
        rows = []
        for s in streams:
            idx, _ = s.next()
            rows.extend(idx + s.offset)
        for s in streams:
            s.record(np.asarray(rows), losses[rows])
        seen += rows
    return seen


def test_stream_prunes_later_epochs_consistently_across_ranks() -> None:
    streams, n = _streams(), 40
    losses = np.linspace(0.1, 1.0, n)
    first = _run_epoch(streams, losses)
    assert streams[0].epoch == 1 and len(first) == 5 * 8  # epoch 0: ceil(40 / 8) steps, all
    draws = [s.next() for s in streams]  # epoch 1 is planned at its first draw
    assert np.array_equal(streams[0].plan.keep, streams[1].plan.keep)  # one global decision
    plan = streams[0].plan
    below = losses < losses.mean()  # every row was scored in epoch 0
    assert plan.kept == n - below.sum() + int(0.5 * below.sum()) < n
    assert streams[0].steps_per_epoch == math.ceil(plan.kept / 8) < 5  # a shorter epoch
    for s, (idx, weights) in zip(streams, draws, strict=True):  # each rank: its own kept rows
        assert plan.keep[idx + s.offset].all() and set(weights) <= {1.0, 2.0}
        s.record(idx + s.offset, losses[idx + s.offset])
    for _ in range(streams[0].steps_per_epoch - 1):
        for s in streams:
            s.next()
    # annealing: epochs >= 0.75 x 4 = 3 are full again; the budget ends after 4 epochs
    while streams[0].epoch < 3:
        _run_epoch([streams[0]], losses)
    streams[0].next()
    assert streams[0].plan.kept == n and not streams[0].done
    for _ in range(streams[0].steps_per_epoch - 1):
        streams[0].next()
    assert streams[0].done and streams[0].progress == 1.0


def test_stream_state_round_trip() -> None:
    a = _streams(world=1)[0]
    losses = np.linspace(0.1, 1.0, 40)
    _run_epoch([a], losses)
    a.next()
    b = _streams(world=1)[0]
    b.load_state_dict(a.state_dict())
    for _ in range(7):
        (ia, wa), (ib, wb) = a.next(), b.next()
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(wa, wb)
        a.record(ia, losses[ia])
        b.record(ib, losses[ib])
    assert (a.epoch, a.step_in_epoch) == (b.epoch, b.step_in_epoch)


def test_infobatch_needs_an_epoch_budget() -> None:
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(None, ["train.infobatch.enabled=true"])


IB = [
    *SMOKE_MODEL,
    "data.limit=96",
    "select.enabled=false",
    "reweight.enabled=false",
    "train.num_workers=0",
    "train.epochs=6",
    "train.log_every=2",
    "train.checkpoint_every=4",
]


CURVE = [  # a curve point every 8 steps, scored by a one-epoch classifier
    "train.eval_every=8",
    "train.eval_samples=16",
    "train.eval_steps=2",
    "evaluate.feature_space=classifier",
    "evaluate.classifier_epochs=1",
    "evaluate.classifier_max_images=96",
    "evaluate.manifold_samples=48",
]


@pytest.mark.slow
def test_infobatch_trains_fewer_steps_and_resumes_exactly(ray_cluster, tmp_path):
    full = run_stage("train", load_config(None, IB), RunStore(str(tmp_path / "full")))
    assert full["steps"] == math.ceil(6 * 96 / 8) and full["infobatch"] is None
    on = [*IB, "train.infobatch.enabled=true", "train.min_snr_gamma=5"]
    store = RunStore(str(tmp_path / "ib"))
    pruned = run_stage("train", load_config(None, [*on, *CURVE]), store)
    ib = pruned["infobatch"]
    assert pruned["steps"] < full["steps"] and ib["pruned_samples"] > 0
    assert pruned["images_seen"] == pruned["steps"] * 8
    assert pruned["flops"] == pruned["steps"] * pruned["flops_per_step"] < full["flops"]
    # the curve ends where the epochs did (not at the step ceiling the budget started from)
    points = pq.read_table(store.path("train", "curve.parquet")).to_pylist()
    assert points[-1]["step"] == pruned["steps"]
    assert points[-1]["train_flops"] == pruned["flops"]
    # a crash mid-run, rerun, resumes from the checkpoint: the same steps and loss as
    # uninterrupted (in-process: the pruning state travels in the loop's own checkpoints)
    flag = tmp_path / "fail.flag"
    flag.write_text("x")
    crash = load_config(None, [*on, "train.fail_at_step=6", f"train.fail_flag={flag}"])
    crashed = RunStore(str(tmp_path / "crash"))
    with pytest.raises(Exception, match="injected failure"):
        run_stage("train", crash, crashed)
    resumed = run_stage("train", crash, crashed)
    again = run_stage("train", load_config(None, on), RunStore(str(tmp_path / "again")))
    assert resumed["resumed_at"] == [4] and not flag.exists()
    assert resumed["steps"] == again["steps"]
    assert resumed["final_loss"] == pytest.approx(again["final_loss"], rel=1e-5)
