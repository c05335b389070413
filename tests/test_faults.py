"""Fault tolerance, one test per fault (scenarios shared with benchmarks/faults.py): a
killed training worker and a killed driver. Each checks what a user would: training resumes
at the last checkpoint written before the fault, and no step is done twice beyond the steps
since that checkpoint (less than one checkpoint interval). A node lost during embedding is
tested in test_multinode.py (one multi-node cluster), a crashing Tune trial in test_tune.py
(folded into the restored sweep)."""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import faults  # noqa: E402


def before_restart(reported: list[int]) -> list[int]:
    """The steps reported before training went back (the restart after the fault)."""
    for i in range(1, len(reported)):
        if reported[i] <= reported[i - 1]:
            return reported[:i]
    return reported


@pytest.mark.slow
def test_killed_worker_resumes_from_last_checkpoint(ray_cluster, tmp_path):
    run = tmp_path / "run"
    steps, every = 16, 5
    r = faults.worker_kill(str(run), steps=steps, every=every, kill_at=7)
    assert r["error"] is None and r["killed_pid"], r
    assert r["steps"] == steps
    first = before_restart(r["reported"])
    assert first[-1] >= 7 and first == list(range(1, first[-1] + 1)), r  # killed at step >= 7
    # the checkpoint of a step is registered with its report: the newest one reported
    checkpoint = max(s for s in first if s % every == 0)
    assert r["resumed_at"] == [checkpoint], r
    redone = r["reported"][len(first) :]
    assert redone == list(range(checkpoint + 1, steps + 1)), r  # every step after it, once
    assert len(first) - checkpoint < every  # redone: only the steps since that checkpoint
    history = pq.read_table(run / "train" / "metrics.parquet").column("step").to_pylist()
    assert history == list(range(1, steps + 1))  # each step once in the run's history


@pytest.mark.slow
def test_killed_driver_rerun_continues(ray_cluster, tmp_path):
    # the job drivers join the session's cluster (token auth, as any job would)
    env = {"RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token"}
    steps, every = 16, 5
    # training in the driver itself, as configs/default.yaml has it: the loop's own checkpoints
    r = faults.driver_kill(
        str(tmp_path / "run"), steps, every, kill_at=7, env=env, timeout=480,
        overrides=["train.num_workers=0"],
    )  # fmt: skip
    assert r["killed"] and r["error"] is None, r
    assert {"embed", "select"} <= set(r["stages_done_at_kill"])
    assert set(r["stages_done_at_kill"]) <= set(r["stages_skipped_on_rerun"])
    # resumed at the newest checkpoint on disk when the driver died
    assert r["checkpoints_at_kill"] and r["resumed_at"] == [r["checkpoints_at_kill"][-1]], r
    resumed = r["resumed_at"][0]
    # steps done twice: those the killed run logged after that checkpoint (a lower bound, as
    # logs lag), one interval at most (a step's log line precedes its checkpoint); the rerun
    # starts right after the checkpoint
    assert r["last_step_logged_before_kill"] - resumed <= every, r
    assert r["steps_logged_on_rerun"][0] == resumed + 1, r
    assert r["survived"] and r["steps"] == steps and r["report"]
