"""Fault tolerance, one test per fault (scenarios shared with benchmarks/faults.py):
a killed training worker, a node lost during embedding, a killed driver, a crashing Tune
trial. Each checks what survives and what the fault costs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import faults  # noqa: E402


@pytest.mark.slow
def test_killed_worker_resumes_from_last_checkpoint(ray_cluster, tmp_path):
    run = tmp_path / "run"
    r = faults.worker_kill(str(run), steps=16, every=5, kill_at=7)
    assert r["error"] is None and r["killed_pid"], r
    assert r["survived"] and r["steps"] == 16
    # SIGKILLed after step 7 was reported: resumed from the checkpoint of step 5 (or 10 when
    # the worker got there before the signal), so at most one interval was lost
    assert len(r["resumed_at"]) == 1 and r["resumed_at"][0] in (5, 10)
    assert r["steps_redone"] <= 5
    history = pq.read_table(run / "train" / "metrics.parquet").column("step").to_pylist()
    assert history == list(range(1, 17))  # each step once in the run's history


@pytest.mark.slow
def test_node_removed_during_embedding_keeps_every_id_once(tmp_path):
    out = tmp_path / "node.json"
    cmd = [sys.executable, "benchmarks/faults.py", "--kinds", "node", "--repeats", "1"]
    done = subprocess.run(
        [*cmd, "--workdir", str(tmp_path / "w"), "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.exists(), done.stderr[-3000:]
    (r,) = json.loads(out.read_text())["node"]
    assert r["survived"], r
    assert r["removed_during_embedding"] and r["encoders_on_removed_node"] >= 1, r
    assert r["rows_written"] == r["rows_expected"] == 600
    assert r["rows_lost"] == 0 and r["rows_duplicated"] == 0


@pytest.mark.slow
def test_killed_driver_rerun_continues(ray_cluster, tmp_path):
    # the job drivers join the session's cluster (token auth, as any job would)
    env = {"RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token"}
    r = faults.driver_kill(str(tmp_path / "run"), 16, 5, kill_at=7, env=env, timeout=480)
    assert r["killed"] and r["error"] is None, r
    assert {"embed", "select"} <= set(r["stages_done_at_kill"])
    assert set(r["stages_done_at_kill"]) <= set(r["stages_skipped_on_rerun"])
    assert r["checkpoints_at_kill"] and r["resumed_at"] == [r["checkpoints_at_kill"][-1]]
    assert 0 <= r["steps_redone"] <= 5  # at most one checkpoint interval
    assert r["survived"] and r["steps"] == 16 and r["report"]


@pytest.mark.slow
def test_crashing_tune_trial_is_retried(ray_cluster, tmp_path):
    r = faults.tune_crash(str(tmp_path / "run"))
    assert r["failed_once"] and r["survived"], r
    assert r["trials"] == 1 and r["statuses"] == ["done"]
    assert r["resumed_at"] == [[2]] and r["steps"] == [4]  # the retry resumed training
