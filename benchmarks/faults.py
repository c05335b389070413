"""Repeated fault injections: does the pipeline survive, and what does each fault cost?

    python benchmarks/faults.py [--repeats 2] [--kinds worker node driver tune] [--json F]

Kinds (each run `--repeats` times, tiny configs on the digits source):
- worker: SIGKILL of the Ray Train worker process mid-run (train.max_failures=1); steps
  redone = steps reported twice (every step is reported: train.log_every=1).
- node:   the worker node running the embed stage removed mid-stage and replaced by a
  fresh one (`ray.cluster_utils.Cluster`, head without CPUs); rows lost / duplicated =
  ids missing from / repeated in the output.
- driver: SIGKILL of the driver (`python jobs/full_pipeline.py ...`) once training has
  checkpointed and logged a step half an interval later; then the same command again: the
  finished stages must be skipped and training must resume from its last checkpoint;
  steps redone = last step the killed driver logged minus the step training resumed at
  (a lower bound: worker logs reach the driver with a lag).
- tune:   a sweep of one trial whose training raises once (train.fail_flag) with
  tune.max_failures=1: the trial must be retried and finish, training resumed.

Prints one table row per kind and, with --json, writes every run's details. The worker and
driver functions are also the scenarios of tests/test_faults.py, `node_loss` of
tests/test_multinode.py; tests/test_tune.py crashes a trial inside its restored sweep.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

from dedt_ray.smoke import SMOKE_EVALUATE as EVALUATE  # noqa: E402
from dedt_ray.smoke import SMOKE_MODEL as MODEL  # noqa: E402


def _run_stage_into(box: dict, name: str, cfg: Any, store: Any, callbacks: tuple = ()) -> None:
    from dedt_ray.pipeline import run_stage

    try:
        box["manifest"] = run_stage(name, cfg, store, train_callbacks=callbacks)
    except Exception as exc:  # noqa: BLE001 - reported, not raised: a fault run may fail
        box["error"] = f"{type(exc).__name__}: {exc}"[:500]


def kill_actor(class_name: str) -> int | None:
    """SIGKILL the process of one alive actor of `class_name` in the connected cluster."""
    from ray._private import state

    for actor in state.actors().values():
        if actor["ActorClassName"] == class_name and actor["State"] == "ALIVE" and actor["Pid"]:
            os.kill(actor["Pid"], signal.SIGKILL)
            return int(actor["Pid"])
    return None


# -- worker: a training worker process killed ---------------------------------------------
def worker_kill(run_dir: str, steps: int = 30, every: int = 10, kill_at: int = 15) -> dict:
    """Train on the connected cluster; SIGKILL the worker once step `kill_at` is reported."""
    import ray
    from ray.util.queue import Empty, Queue

    from dedt_ray.config import load_config
    from dedt_ray.store import RunStore
    from dedt_ray.tune import ForwardReports

    cfg = load_config(
        None,
        [
            *MODEL,
            "data.limit=64",
            f"train.steps={steps}",
            f"train.checkpoint_every={every}",
            "train.log_every=1",
            "train.max_failures=1",
        ],
    )
    store = RunStore(run_dir)
    queue = Queue(actor_options={"num_cpus": 0})
    box: dict[str, Any] = {}
    thread = threading.Thread(
        target=_run_stage_into, args=(box, "train", cfg, store, (ForwardReports(queue),))
    )
    reported: list[int] = []
    killed = killed_at = None
    thread.start()
    try:
        while thread.is_alive() or not queue.empty():
            try:
                reported.append(int(queue.get(timeout=0.2)["step"]))
            except Empty:
                continue
            if killed is None and reported[-1] >= kill_at:
                killed, killed_at = kill_actor("RayTrainWorker"), reported[-1]
        thread.join()
    finally:
        ray.kill(queue.actor)
    manifest = box.get("manifest", {})
    resumed = manifest.get("resumed_at", [])
    return {
        "kind": "worker",
        "survived": manifest.get("steps") == steps and killed is not None,
        "error": box.get("error"),
        "killed_pid": killed,
        "last_step_reported_before_kill": killed_at,
        "resumed_at": resumed,
        "steps": manifest.get("steps"),
        "steps_redone": len(reported) - len(set(reported)),
        "reported": reported,  # every train report's step, in the order the driver got them
        "checkpoint_every": every,
    }


# -- node: a worker node removed during embedding -----------------------------------------
def local_cluster(head_cpus: int = 2, **system: int) -> Any:
    """A `ray.cluster_utils.Cluster` of one head node (add worker nodes with `add_node`);
    the driver connects to it."""
    import ray
    import ray.data
    from ray.cluster_utils import Cluster

    head = {"num_cpus": head_cpus, "include_dashboard": False, "object_store_memory": 100 * 2**20}
    if system:
        head["_system_config"] = system
    cluster = Cluster(initialize_head=True, head_node_args=head)
    ray.init(address=cluster.address, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    return cluster


FAST_NODE_DEATH = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}
NODE = {"num_cpus": 2, "object_store_memory": 100 * 2**20}


def node_loss(run_dir: str, cluster: Any, rows: int = 600) -> dict:
    """Embed `rows` digits on a worker node (the head has no CPUs); once an encoder actor
    is alive there, remove that node and add a fresh one, as an autoscaler replaces a lost
    spot node. (Not "once the first output file is written": the files land within a few
    tenths of a second of the stage's end, too late to lose the node during the stage.)"""
    from ray._private import state

    from dedt_ray.config import load_config
    from dedt_ray.embed import read_embeddings
    from dedt_ray.store import RunStore

    node = cluster.add_node(**NODE)
    cluster.wait_for_nodes()
    cfg = load_config(
        None,
        [
            "data.image_size=8",
            f"data.limit={rows}",
            "embed.encoder=random_projection",
            "embed.dim=16",
            "embed.batch_size=8",
            "embed.actors=2",
            "embed.rows_per_file=32",
        ],
    )
    store = RunStore(run_dir)
    out = Path(store.path("embed", "embeddings.parquet"))
    box: dict[str, Any] = {}
    thread = threading.Thread(target=_run_stage_into, args=(box, "embed", cfg, store))
    thread.start()
    encoders, deadline = 0, time.time() + 300
    while thread.is_alive() and not encoders and time.time() < deadline:
        encoders = sum(
            a["State"] == "ALIVE" and "_Encode" in a["ActorClassName"]
            and a["Address"]["NodeID"] == node.node_id
            for a in state.actors().values()
        )  # fmt: skip
        time.sleep(0.05)
    files = len(list(out.glob("*.parquet"))) if out.is_dir() else 0
    during = thread.is_alive()
    cluster.remove_node(node, allow_graceful=False)
    replacement = cluster.add_node(**NODE)
    thread.join()
    cluster.remove_node(replacement)
    ids = read_embeddings(store)[0].tolist() if "manifest" in box else []
    return {
        "kind": "node",
        "survived": "manifest" in box,
        "error": box.get("error"),
        "removed_during_embedding": during,
        "encoders_on_removed_node": int(encoders),
        "files_before_removal": files,
        "rows_expected": rows,
        "rows_written": len(ids),
        "rows_lost": rows - len(set(ids)),
        "rows_duplicated": len(ids) - len(set(ids)),
    }


# -- driver: the job's driver killed mid-pipeline -----------------------------------------
def pipeline_command(
    run_dir: str, steps: int, every: int, overrides: Sequence[str] = ()
) -> list[str]:
    """`python jobs/full_pipeline.py` on the default config with tiny overrides."""
    return [
        sys.executable,
        str(ROOT / "jobs" / "full_pipeline.py"),
        "--config",
        str(ROOT / "configs" / "default.yaml"),
        "--run-dir",
        run_dir,
        *MODEL,
        *EVALUATE,
        "data.limit=150",
        f"train.steps={steps}",
        f"train.checkpoint_every={every}",
        "train.log_every=1",
        *overrides,
    ]


def _checkpoints(run_dir: str) -> list[int]:
    return sorted(
        int(p.name.split("_")[1]) for p in Path(run_dir).glob("_ray/train-*/checkpoint_0*")
    )


def _manifests(run_dir: str) -> dict[str, dict]:
    out = {}
    for path in Path(run_dir).glob("*/_manifest.json"):
        out[path.parent.name] = json.loads(path.read_text())
    return out


def driver_kill(
    run_dir: str,
    steps: int = 30,
    every: int = 10,
    kill_at: int = 15,
    env: dict | None = None,
    timeout: int = 900,
    overrides: Sequence[str] = (),
) -> dict:
    """Run the pipeline job; SIGKILL its driver once training has checkpointed and the
    driver has logged step `kill_at`; run the same command again. `overrides`: more config
    (`train.num_workers=0`: training in the driver itself, as `configs/default.yaml` has it)."""
    cmd = pipeline_command(run_dir, steps, every, overrides)
    env = {**os.environ, **(env or {})}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    logged: list[int] = []

    def read() -> None:
        for line in proc.stderr:
            m = re.search(r"train: step (\d+)/", line)
            if m:
                logged.append(int(m.group(1)))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if _checkpoints(run_dir) and max(logged, default=0) >= kill_at:
            break
        time.sleep(0.1)
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    reader.join(timeout=5)
    at_kill = {"checkpoints": _checkpoints(run_dir), "last_logged_step": max(logged, default=0)}
    before = _manifests(run_dir)
    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    relogged = [int(m) for m in re.findall(r"train: step (\d+)/", rerun.stderr)]
    after = _manifests(run_dir)
    train = after.get("train", {})
    resumed = train.get("resumed_at", [])
    skipped = sorted(s for s in before if after.get(s, {}).get("started") == before[s]["started"])
    return {
        "kind": "driver",
        "survived": rerun.returncode == 0 and killed and train.get("steps") == steps,
        "error": None if rerun.returncode == 0 else rerun.stderr[-1500:],
        "killed": killed,
        "stages_done_at_kill": sorted(before),
        "stages_skipped_on_rerun": skipped,
        "checkpoints_at_kill": at_kill["checkpoints"],
        "last_step_logged_before_kill": at_kill["last_logged_step"],
        "steps_logged_on_rerun": relogged,
        "resumed_at": resumed,
        "steps": train.get("steps"),
        "steps_redone": max(0, at_kill["last_logged_step"] - resumed[0]) if resumed else None,
        "report": (Path(run_dir) / "report.html").is_file(),
        "checkpoint_every": every,
    }


# -- tune: a crashing trial retried ---------------------------------------------------------
TUNE = [
    *MODEL,
    *EVALUATE,
    "data.limit=150",
    "embed.encoder=pixels",
    "tune.num_samples=1",
    "tune.max_concurrent=1",
    "tune.asha.enabled=false",
    "tune.max_failures=1",
]


def tune_crash(run_dir: str) -> dict:
    """One trial whose training raises at step 3 of 4 (checkpoint at 2), on the connected
    cluster: Tune must retry it and the retry must resume training at step 2."""
    from dedt_ray.config import load_config
    from dedt_ray.store import RunStore
    from dedt_ray.tune import run_sweep

    flag = Path(run_dir).with_name(Path(run_dir).name + ".fail.flag")
    flag.parent.mkdir(parents=True, exist_ok=True)
    flag.write_text("x")
    trial = (
        "tune.trial_overrides=[train.steps=4,train.log_every=1,train.checkpoint_every=2,"
        f"train.fail_at_step=3,train.fail_flag={flag}]"
    )
    out = run_sweep(load_config(None, [*TUNE, trial]), run_dir)
    store = RunStore(run_dir)
    trials = store.list("tune", "trials") if store.exists("tune", "trials") else []
    train = [RunStore(store.path("tune", "trials", t)).manifest("train") or {} for t in trials]
    rows = out.get("rows", [])
    return {
        "kind": "tune",
        "survived": out.get("evaluated") == 1 and not flag.exists(),
        "error": None,
        "failed_once": not flag.exists(),
        "trials": len(trials),
        "statuses": [r.get("status") for r in rows],
        "resumed_at": [t.get("resumed_at") for t in train],
        "steps": [t.get("steps") for t in train],
        "steps_redone": 0,  # the crash is raised before step 3 runs: nothing to redo
    }


# -- the benchmark --------------------------------------------------------------------------
def _summarise(kind: str, runs: list[dict]) -> str:
    survived = sum(bool(r["survived"]) for r in runs)
    lost = sum(r.get("rows_lost", 0) for r in runs)
    dup = sum(r.get("rows_duplicated", 0) for r in runs)
    redone = [r.get("steps_redone") for r in runs if r.get("steps_redone") is not None]
    redone_s = ", ".join(str(x) for x in redone) if redone else "-"
    rows_col = f"{lost} / {dup}" if kind == "node" else "-"
    return f"| {kind} | {survived}/{len(runs)} | {rows_col} | {redone_s} |"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=2, help="injections of each kind")
    p.add_argument("--kinds", nargs="+", default=["worker", "node", "driver", "tune"])
    p.add_argument("--json", help="write every run's details here")
    p.add_argument("--workdir", help="run directories here (default: a temporary folder)")
    args = p.parse_args(argv)
    import ray

    work = Path(args.workdir or tempfile.mkdtemp(prefix="dedt-faults-"))
    results: dict[str, list[dict]] = {}
    for kind in args.kinds:
        runs = results.setdefault(kind, [])
        started = time.time()
        if kind == "node":
            cluster = local_cluster(head_cpus=0, **FAST_NODE_DEATH)
            try:
                for i in range(args.repeats):
                    runs.append(node_loss(str(work / f"node{i}"), cluster))
            finally:
                ray.shutdown()
                cluster.shutdown()
        elif kind == "driver":  # every driver starts (and loses) its own local cluster
            for i in range(args.repeats):
                tmp = work / f"driver{i}-ray"
                runs.append(driver_kill(str(work / f"driver{i}"), env={"RAY_TMPDIR": str(tmp)}))
        else:
            from dedt_ray.runtime import init_ray

            init_ray(num_cpus=2, progress=False)
            try:
                for i in range(args.repeats):
                    run = str(work / f"{kind}{i}")
                    runs.append(worker_kill(run) if kind == "worker" else tune_crash(run))
            finally:
                ray.shutdown()
        for r in runs:
            r["seconds_per_kind"] = round(time.time() - started, 1)
        print(json.dumps(runs), flush=True)
    print("\n| fault | runs survived | rows lost / duplicated | steps redone (per run) |")
    print("|---|---|---|---|")
    for kind, runs in results.items():
        print(_summarise(kind, runs))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if all(r["survived"] for runs in results.values() for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
