"""Ray Tune + Optuna sweeps: the search space (pure) and tiny sweeps on the local cluster."""

from __future__ import annotations

import os

import optuna
import pyarrow.parquet as pq
import pytest
import yaml

from dedt_ray.config import load_config
from dedt_ray.smoke import SMOKE_EVALUATE, SMOKE_MODEL
from dedt_ray.store import RunStore
from dedt_ray.tune import (
    active_space,
    epoch_steps,
    max_reports,
    pareto_front,
    run_sweep,
    suggest,
    trial_overrides,
)

TINY = [
    "data.limit=150",
    "embed.encoder=pixels",
    *SMOKE_MODEL,
    *SMOKE_EVALUATE,
    "tune.num_samples=3",
    "tune.max_concurrent=1",
    "tune.asha.enabled=false",
    "tune.max_failures=1",
]
TRIAL = "train.steps=4,train.log_every=2,train.checkpoint_every=2"


def test_space_is_conditional_and_skips_missing_sections():
    cfg = load_config(None, ["tdc.rule=quantile"])
    cfg.tune.space = {
        **cfg.tune.space,
        "tdc.n_groups": {"type": "int", "low": 2, "high": 4},
        "tdc.boundaries": {
            "type": "cuts",
            "low": 0.05,
            "high": 0.95,
            "count_from": "tdc.n_groups",
            "scale": "model.num_train_timesteps",
            "also": {"tdc.rule": "explicit"},
        },  # fmt: skip
        "nosuch.eta": {"low": 1e-3, "high": 1.0, "log": True},
    }
    space, skipped = active_space(cfg)
    assert "nosuch.eta" not in space and "nosuch" in skipped[0]
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    for _ in range(5):
        params = suggest(study.ask(), space, cfg)
        cuts = params["tdc.boundaries"]
        assert len(cuts) == params["tdc.n_groups"] - 1 and cuts == sorted(set(cuts))
        assert all(1 <= c < 1000 for c in cuts) and 0.2 <= params["select.keep_ratio"] <= 1
        over = trial_overrides({k: v for k, v in params.items() if "[" not in k}, space)
        tuned = load_config(None, over)
        assert tuned.tdc.rule == "explicit" and tuned.tdc.boundaries == cuts


def test_pareto_front():
    pts = [(1.0, 10.0), (2.0, 5.0), (3.0, 6.0), (0.5, 20.0)]
    assert pareto_front(pts) == [0, 1, 3]


def trial_reports(steps: int, log_every: int, checkpoint_every: int) -> int:
    """Results a trial sends Tune: one per train report (a step that logs or checkpoints,
    and the last step: dedt_ray/diffusion/worker.py), then one with the objectives."""
    train = [s for s in range(1, steps + 1) if not s % log_every or not s % checkpoint_every]
    return len(set(train) | {steps}) + 1


@pytest.mark.parametrize(
    "trial,epochs",
    [
        ("train.steps=4,train.log_every=10", None),  # one train report: the last step
        ("train.steps=4,train.log_every=10", 2),  # 2 epochs of 1797 rows: 113 steps
        ("train.steps=12,train.log_every=2,train.checkpoint_every=3", None),  # both kinds
        ("train.steps=7,train.log_every=2,train.checkpoint_every=3", None),
    ],
)
def test_asha_horizon_covers_every_report_of_a_trial(trial, epochs):
    """ASHA stops a trial at result number max_t: every train report must come before it,
    so the objectives' report arrives (max_t >= reports); one spare report at most."""
    over = ["train.batch_size=32", f"tune.trial_overrides=[{trial}]"]
    cfg = load_config(None, [*over, *([f"tune.epochs={epochs}"] if epochs else [])])
    tc = load_config(None, trial.split(",")).train
    steps = epoch_steps(1797, epochs, 32) if epochs else tc.steps
    reports = trial_reports(steps, tc.log_every, tc.checkpoint_every)
    assert reports <= max_reports(cfg, 1797) <= reports + 1


def test_epoch_budget_follows_the_rows():
    assert epoch_steps(1797, 2, 32) == 113 and epoch_steps(180, 2, 32) == 12
    assert epoch_steps(10, 2, 32, min_steps=10) == 10


@pytest.mark.slow
def test_sweep_interrupted_and_restored(ray_cluster, tmp_path):
    """Three trials, one at a time, training in-process (`train.num_workers=0`); the first
    one's training raises once at step 3 (after the checkpoint of step 2) and Tune retries it;
    the sweep is interrupted after the first trial completes, then restored."""
    run = str(tmp_path / "run")
    flag = tmp_path / "fail.flag"
    flag.write_text("x")
    crash = f"train.fail_at_step=3,train.fail_flag={flag}"
    trial = f"{TRIAL},train.num_workers=0,{crash}"
    cfg = load_config(None, [*TINY, f"tune.trial_overrides=[{trial}]"])
    first = run_sweep(cfg, run, interrupt_after=1)
    store = RunStore(run)
    embed = store.manifest("embed")
    assert first["evaluated"] >= 1 and first["evaluated"] < 3
    assert not flag.exists()  # the first trial raised (it removes the flag first)
    trials = store.list("tune", "trials")
    retried = RunStore(store.path("tune", "trials", trials[0])).manifest("train")
    assert retried["resumed_at"] == [2] and retried["steps"] == 4  # the retry resumed
    finished = {r["trial_id"] for r in first["rows"] if r["status"] == "done"}
    started = {t: evaluate_started(store, t) for t in finished}

    out = run_sweep(cfg, run)  # resumes the same experiment
    assert out["evaluated"] == 3 and out["trials"] == 3
    assert [r["status"] for r in out["rows"]] == ["done"] * 3
    # in-process training hands Tune every train report (ASHA's signal) and then the
    # objectives: a trial that was not retried reported once per report of its 4 steps
    iterations = {r["trial_id"]: r["iterations"] for r in out["rows"]}
    once = [t for t in iterations if not RunStore(store.path("tune", "trials", t)).manifest("train")
            ["resumed_at"]]  # fmt: skip
    assert len(once) == 2 and all(
        iterations[t] == trial_reports(4, log_every=2, checkpoint_every=2) for t in once
    )
    assert {r["trial_id"] for r in out["rows"]} >= finished
    # finished trials were not rerun: their evaluate manifests are untouched
    assert {t: evaluate_started(store, t) for t in finished} == started
    # embeddings computed once: the base manifest is unchanged, every trial reused it
    assert store.manifest("embed") == embed
    for trial in store.list("tune", "trials"):
        t = RunStore(store.path("tune", "trials", trial))
        if t.manifest("evaluate"):
            assert t.manifest("embed")["output_id"] == embed["output_id"]
    assert os.path.getsize(store.path("tune", "optuna.db")) > 0
    db = f"sqlite:///{store.path('tune', 'optuna.db')}"
    study = optuna.load_study(study_name="sweep", storage=db)
    assert sum(t.state.name == "COMPLETE" for t in study.trials) == 3
    table = pq.read_table(store.path("tune", "results.parquet"))
    assert table.num_rows == 3 and store.exists("tune", "results.csv")
    assert store.exists("tune", "pareto.png")
    best = yaml.safe_load(store.read_bytes("tune", "best.yaml"))
    assert load_config(store.path("tune", "best.yaml")).train.steps == 4
    assert best["select"]["keep_ratio"] in table.column("param.select.keep_ratio").to_pylist()


def evaluate_started(store: RunStore, trial: str) -> str:
    return RunStore(store.path("tune", "trials", trial)).manifest("evaluate")["started"]


@pytest.mark.parametrize("multi", [False, True])
def test_study_names_its_objectives_and_opens_by_absolute_path(tmp_path, multi):
    """Issue 18 item 13: optuna-dashboard shows the objectives by name; the documented
    `sqlite:////absolute/path` URL (docs/tune.md) opens the study `sweep`."""
    from dedt_ray.tune import SWEEP, SpaceFn, _objectives, _searcher_class

    cfg = load_config(None, [*TINY, f"tune.multi_objective={str(multi).lower()}"])
    space, _ = active_space(cfg)
    metric, mode = _objectives(cfg)
    path = tmp_path / "optuna.db"
    _searcher_class()(
        space=SpaceFn(space, cfg), metric=metric, mode=mode, study_name=SWEEP,
        storage=optuna.storages.RDBStorage(f"sqlite:///{path}"),
    )  # fmt: skip
    assert str(path).startswith("/")  # so the URL below has four slashes
    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{path.resolve()}")
    assert study.metric_names == (["quality", "train_flops"] if multi else ["quality"])
