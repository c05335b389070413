"""Ray Tune + Optuna sweeps over a slice of the pipeline (`dedt-ray tune`).

The base run directory holds `embed/` (computed once, before the sweep). Each trial gets
`<run>/tune/trials/<trial_id>/` with a copy of `embed/` (manifest included, so the pipeline
skips it) and runs select -> (reweight / tdc when their stages exist and are enabled) ->
train -> evaluate. The train stage's TorchTrainer forwards its reports (training loss at
`train.log_every`) to Tune, so ASHA stops bad trials early; the trial ends with one
`ray.tune.report` carrying the evaluate metric ("quality") and the training FLOPs.

OptunaSearch (seeded TPE, define-by-run space, one or two objectives) keeps its study in
`<run>/tune/optuna.db` (SQLite; `optuna-dashboard sqlite:///<run>/tune/optuna.db`). The Tune
experiment lives in `<run>/tune/sweep`; rerunning the same command restores it.
"""

from __future__ import annotations

import logging
import math
import os
import posixpath
from typing import Any

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# intermediate (train) reports carry the ASHA metric only; the objectives come at the end
os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")

import signal  # noqa: E402

import pyarrow.fs as pafs  # noqa: E402
import yaml  # noqa: E402
from ray.train import UserCallback  # noqa: E402
from ray.tune import Callback  # noqa: E402

from dedt_ray.config import Config, ConfigError, TuneParam, apply_overrides, dump_config  # noqa: E402
from dedt_ray.store import RunStore  # noqa: E402

log = logging.getLogger("dedt_ray")

SWEEP = "sweep"
COMPUTE = "train_flops"  # the second objective (minimised) in multi-objective mode
ASHA_METRIC = "loss"  # the training loss the train loop reports at train.log_every
SHARED = ("embed", "classifier", "curve")  # base-run folders each trial reuses
MADE_IN_TRIALS = ("classifier", "curve")  # the first trial to make one hands it to the base
NOT_IN_TRIALS = ("embed", "report")


# -- the search space --------------------------------------------------------------------
def active_space(cfg: Config) -> tuple[dict[str, TuneParam], list[str]]:
    """The searchable parameters and a message per skipped one (its section does not exist)."""
    keep, skipped = {}, []
    for name, param in cfg.tune.space.items():
        section, _, key = name.partition(".")
        model = type(cfg).model_fields.get(section)
        if model is None or not hasattr(getattr(cfg, section, None), "model_fields"):
            skipped.append(
                f"tune.space.{name}: this build has no config section {section!r} "
                f"(its stage is not installed); parameter skipped"
            )
            continue
        if key not in type(getattr(cfg, section)).model_fields:
            raise ConfigError(f"tune.space.{name}: {section!r} has no key {key!r}")
        keep[name] = param
    for name, param in keep.items():
        if param.type == "cuts" and param.count_from not in keep:
            if _get(cfg, param.count_from) is None:
                raise ConfigError(f"tune.space.{name}: count_from {param.count_from} not found")
    return keep, skipped


def _get(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part, None)
    return node


def suggest(trial: Any, space: dict[str, TuneParam], cfg: Config) -> dict[str, Any]:
    """Define-by-run: sample `space` on an Optuna trial; returns {dotted key: value}."""
    out: dict[str, Any] = {}
    for name, p in space.items():
        if p.type == "float":
            out[name] = trial.suggest_float(name, p.low, p.high, log=p.log)
        elif p.type == "int":
            out[name] = trial.suggest_int(name, int(p.low), int(p.high), log=p.log)
        elif p.type == "categorical":
            out[name] = trial.suggest_categorical(name, p.choices)
    for name, p in space.items():  # conditional on their count parameter
        if p.type != "cuts":
            continue
        n = out.get(p.count_from, _get(cfg, p.count_from))
        cuts = sorted(trial.suggest_float(f"{name}[{i}]", p.low, p.high) for i in range(n - 1))
        if p.scale:
            total = int(_get(cfg, p.scale))
            ints: list[float] = []
            for c in cuts:  # strictly increasing timesteps in 1 .. total - 1
                ints.append(
                    min(total - 1, max(int(round(c * total)), int(ints[-1]) + 1 if ints else 1))
                )
            cuts = ints
        out[name] = cuts
    return out


class SpaceFn:
    """The define-by-run function OptunaSearch calls (picklable, for experiment state)."""

    def __init__(self, space: dict[str, TuneParam], cfg: Config) -> None:
        self.space, self.cfg = space, cfg

    def __call__(self, trial: Any) -> dict[str, Any]:
        return {k: v for k, v in suggest(trial, self.space, self.cfg).items() if "[" not in k}


def trial_overrides(params: dict[str, Any], space: dict[str, TuneParam]) -> list[str]:
    """A trial's sampled values as dotted `key=value` overrides (plus each `also`)."""
    out = []
    for name, value in params.items():
        if "[" in name or name not in space:
            continue
        out.append(f"{name}={yaml.safe_dump(value, default_flow_style=True).strip()}")
        out += [f"{k}={v}" for k, v in space[name].also.items()]
    return [o.removesuffix("\n...") for o in out]


def trial_config(base: dict[str, Any], fixed: list[str], params: dict, space: dict) -> Config:
    """The base config with the sweep's fixed overrides and a trial's sampled values."""
    return apply_overrides(base, [*fixed, *trial_overrides(params, space)])


# -- one trial ---------------------------------------------------------------------------
def copy_shared(base: RunStore, trial: RunStore) -> None:
    """The base run's embedding, classifier and real-feature cache into a trial's folder."""
    for folder in SHARED:
        if base.exists(folder) and not trial.exists(folder):
            _copy_shared_folder(base, trial, folder)


class ForwardReports(UserCallback):
    """A Train callback that puts each report's scalar metrics on a queue the trial drains."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def after_report(self, run_context: Any, metrics: list[dict], checkpoint: Any) -> None:
        scalars = {k: v for k, v in metrics[0].items() if isinstance(v, int | float)}
        self.queue.put(scalars)


def run_trial_pipeline(ctx: dict[str, Any], params: dict, trial_id: str, queue: Any) -> dict:
    """The pipeline after embed in the trial's run directory (a Ray task outside the trial's
    placement group, so stages schedule their own tasks, actors and trainers)."""
    base = RunStore(ctx["run_dir"])
    store = RunStore(posixpath.join(ctx["run_dir"], "tune", "trials", trial_id))
    copy_shared(base, store)
    space = {k: TuneParam.model_validate(v) for k, v in ctx["space"].items()}
    cfg = trial_config(ctx["base"], ctx["fixed"], params, space)
    if cfg.tune.epochs:  # the budget follows the rows the trial trains on
        steps = epoch_steps(train_rows(cfg, store), cfg.tune.epochs, cfg.train.batch_size,
                            cfg.tune.min_steps)  # fmt: skip
        cfg = trial_config(ctx["base"], [*ctx["fixed"], f"train.steps={steps}"], params, space)
    done = pipeline_in_trial(base, store, cfg, queue)
    evaluate = store.read_json("evaluate", "metrics.json")
    key = evaluate["metric"] if cfg.tune.metric == "quality" else cfg.tune.metric
    quality = evaluate["metrics"].get(key)
    tr = done["train"]
    return {
        "quality": float("nan") if quality is None else float(quality),
        "metric_name": key,
        ASHA_METRIC: float(tr.get("final_loss") or float("nan")),
        COMPUTE: float(tr["flops"]),
        "train_rows": int(tr["rows"]),
        "train_seconds": float(tr.get("train_wall_seconds", 0.0)),
        "trial_dir": store.uri(store.root),
        "evaluated": 1,
    }


def pipeline_in_trial(base: RunStore, store: RunStore, cfg: Config, queue: Any) -> dict:
    """Every stage after embed in the trial's run directory `store`, reusing the base run's
    embedding, classifier and real-feature cache (copied in first, when not yet there); the
    train stage's reports go to `queue`. Returns the stages' manifests."""
    from dedt_ray.pipeline import STAGES, run_pipeline

    copy_shared(base, store)
    stages = [s for s in STAGES if s not in NOT_IN_TRIALS]
    done = run_pipeline(cfg, store, only=stages, train_callbacks=[ForwardReports(queue)])
    if store.manifest("embed")["output_id"] != base.manifest("embed")["output_id"]:
        raise RuntimeError("the trial did not reuse the base run's embeddings")
    for folder in MADE_IN_TRIALS:
        if store.exists(folder) and not base.exists(folder):
            _copy_shared_folder(store, base, folder)  # serves the following trials
    return done


def epoch_steps(n_rows: int, epochs: float, batch: int, min_steps: int = 1) -> int:
    """The epoch budget: equal passes over the rows trained on, at least `min_steps`."""
    return max(min_steps, math.ceil(epochs * n_rows / batch))


def train_rows(cfg: Config, store: RunStore) -> int:
    """Rows the trial trains on: the selection's kept rows (running select), else all rows."""
    from dedt_ray.pipeline import run_stage

    if cfg.select.enabled:
        return int(run_stage("select", cfg, store)["kept"])
    return int(store.manifest("embed")["rows"])


def _copy_shared_folder(src: RunStore, dst: RunStore, folder: str) -> None:
    dst.fs.create_dir(dst.path(folder), recursive=True)  # copy_files makes only sub-folders
    pafs.copy_files(
        src.path(folder), dst.path(folder), source_filesystem=src.fs, destination_filesystem=dst.fs
    )


def run_trial(
    params: dict[str, Any], ctx: dict[str, Any], pipeline: Any = run_trial_pipeline
) -> None:
    """Tune function trainable: runs the trial's `pipeline(ctx, params, trial_id, queue)` as a
    task and reports to Tune — the train loss at each train report (ASHA's signal), then
    what the pipeline returns (the objectives)."""
    import ray
    import ray.tune
    from ray.util.queue import Empty, Queue

    trial_id = ray.tune.get_context().get_trial_id()
    queue = Queue(actor_options={"num_cpus": 0})
    task = ray.remote(pipeline).options(num_cpus=0, scheduling_strategy="DEFAULT")
    ref = task.remote(ctx, params, trial_id, queue)
    try:
        while True:
            ready, _ = ray.wait([ref], timeout=0.5)
            while True:
                try:
                    ray.tune.report(queue.get_nowait())
                except Empty:
                    break
            if ready:
                break
        ray.tune.report(ray.get(ref))
    finally:
        ray.cancel(ref, force=True)  # a trial stopped by ASHA stops its pipeline too
        ray.kill(queue.actor)


# -- the sweep ---------------------------------------------------------------------------
def _searcher_class() -> type:
    from ray.tune.search.optuna import OptunaSearch

    class StudySearch(OptunaSearch):
        """OptunaSearch that ignores intermediate (training-loss) results: only the final
        result carries the objectives, and the study uses no pruner."""

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            return None

        def _setup_study(self, mode: str | list) -> None:
            """Name the study's objectives (optuna-dashboard shows them by name)."""
            super()._setup_study(mode)
            metric = self._metric if isinstance(self._metric, list) else [self._metric]
            if self._ot_study is not None and all(metric):
                self._ot_study.set_metric_names(list(metric))

    return StudySearch


def concurrency(cfg: Config) -> int:
    """Trials at once: tune.max_concurrent, else what the cluster's CPUs (GPUs) hold."""
    import ray

    if cfg.tune.max_concurrent:
        return cfg.tune.max_concurrent
    res = ray.cluster_resources()
    tc = cfg.train
    # stages run one after another: the train workers, or an evaluate actor + its read tasks
    cpus = cfg.tune.cpus_per_trial + max(max(0, tc.num_workers) * tc.cpus_per_worker, 2.0)
    n = int(res.get("CPU", 1) // cpus)
    gpus = res.get("GPU", 0)
    if gpus and tc.num_workers:
        n = min(n, int(gpus // tc.num_workers))
    return max(1, n)


def _objectives(cfg: Config) -> tuple[str | list[str], str | list[str]]:
    if cfg.tune.multi_objective:
        return ["quality", COMPUTE], [cfg.tune.mode, "min"]
    return "quality", cfg.tune.mode


def run_sweep(cfg: Config, run_dir: str, interrupt_after: int | None = None) -> dict[str, Any]:
    """Embed once in `run_dir`, run (or resume) the sweep, write results and best.yaml.

    `interrupt_after` (testing): send SIGINT after that many trials complete, as Ctrl+C
    would; rerunning continues the sweep.
    """
    import ray.tune

    from dedt_ray.pipeline import run_stage
    from dedt_ray.runtime import init_ray

    init_ray()
    space, skipped = active_space(cfg)
    for msg in skipped:
        log.warning(msg)
    if not space:
        raise ConfigError("tune.space has no parameter this build can search")
    base = RunStore(run_dir)
    base.write_text(dump_config(cfg), "config.yaml")
    embed = run_stage("embed", cfg, base)  # once; every trial reuses it
    log.info("tune: embeddings %s", "reused" if embed.get("skipped_stage") else "computed")

    storage_path = base.uri(base.path("tune"))
    base.fs.create_dir(base.path("tune"), recursive=True)
    ctx = {
        "run_dir": base.uri(base.root),
        "base": cfg.model_dump(mode="json"),
        "fixed": list(cfg.tune.trial_overrides),
        "space": {k: v.model_dump(mode="json") for k, v in space.items()},
    }
    # the trial function only waits on its pipeline task: a token reservation by default
    resources = {"CPU": cfg.tune.cpus_per_trial, "memory": 64 * 2**20}
    trainable = ray.tune.with_resources(ray.tune.with_parameters(run_trial, ctx=ctx), resources)
    path = posixpath.join(storage_path, SWEEP)
    if ray.tune.Tuner.can_restore(path):
        check_sweep_state(base)
        log.info("tune: resuming the sweep in %s", path)
        tuner = ray.tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    else:
        callbacks = (
            [Interrupt(interrupt_after, base.local_path("tune", ".interrupted"))]
            if interrupt_after
            else []
        )
        tuner = new_tuner(cfg, base, space, trainable, int(embed["rows"]), callbacks)
    grid = tuner.fit()
    return write_results(cfg, base, grid, space)


def check_sweep_state(base: RunStore) -> None:
    """`Tuner.restore` unpickles `<run>/tune/sweep/` (tuner.pkl, the experiment and searcher
    state): refuse it unless this user wrote it and nobody else can change it. An object-store
    run directory is trusted as far as its bucket's write permissions (docs/tune.md)."""
    from dedt_ray.store import check_own_files

    if base.is_local:
        why = "Ray Tune unpickles the sweep's state when it restores a sweep (docs/tune.md)"
        check_own_files(base.path("tune", SWEEP), why)


def new_tuner(
    cfg: Config,
    base: RunStore,
    space: dict[str, TuneParam],
    trainable: Any,
    rows: int,
    callbacks: list[Any],
) -> Any:
    """A fresh Tuner: OptunaSearch (study in tune/optuna.db) under a concurrency limit, ASHA."""
    import optuna
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter

    metric, mode = _objectives(cfg)
    searcher = _searcher_class()(
        space=SpaceFn(space, cfg),
        metric=metric,
        mode=mode,
        sampler=optuna.samplers.TPESampler(seed=cfg.tune.seed),
        study_name=SWEEP,
        storage=optuna_storage(base),
    )
    asha = cfg.tune.asha
    scheduler = (
        ASHAScheduler(
            time_attr="training_iteration",
            metric=ASHA_METRIC,
            mode="min",
            max_t=max_reports(cfg, rows),
            grace_period=asha.grace_period,
            reduction_factor=asha.reduction_factor,
        )
        if asha.enabled
        else FIFOScheduler()
    )
    return ray.tune.Tuner(
        trainable,
        tune_config=ray.tune.TuneConfig(
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=concurrency(cfg)),
            scheduler=scheduler,
            num_samples=cfg.tune.num_samples,
        ),
        run_config=ray.tune.RunConfig(
            name=SWEEP,
            storage_path=base.uri(base.path("tune")),
            callbacks=callbacks,
            verbose=1,
            # a retried trial reruns its pipeline: finished stages are skipped by their
            # manifests and training resumes from its last checkpoint
            failure_config=ray.tune.FailureConfig(max_failures=cfg.tune.max_failures),
        ),
    )


def max_reports(cfg: Config, rows: int) -> int:
    """ASHA's max_t: the train reports of one trial (every log or checkpoint step, and the
    last step; with an epoch budget, for a trial that keeps all `rows`), plus its objectives'
    report, plus one spare. ASHA stops a trial at a result numbered max_t or more, so a
    smaller value would stop a trial before its objectives arrive."""
    tc = trial_config(cfg.model_dump(mode="json"), cfg.tune.trial_overrides, {}, {}).train
    steps = tc.steps
    if cfg.tune.epochs:
        steps = epoch_steps(rows, cfg.tune.epochs, tc.batch_size, cfg.tune.min_steps)
    log, ckpt = tc.log_every, tc.checkpoint_every
    train = steps // log + steps // ckpt - steps // math.lcm(log, ckpt)  # either multiple
    train += steps % log != 0 and steps % ckpt != 0  # the last step reports too
    return train + 2


def optuna_storage(base: RunStore) -> Any:
    """SQLite RDB storage at `<run>/tune/optuna.db` (local run directories only)."""
    import optuna

    if not base.is_local:
        log.warning("tune: the run directory is not local; the Optuna study stays in memory")
        return None
    url = f"sqlite:///{base.local_path('tune', 'optuna.db')}"
    return optuna.storages.RDBStorage(url)


class Interrupt(Callback):
    """Stands in for Ctrl+C after `n` trials complete (tests of resume). Fires once: the
    restored experiment carries this callback too, so a marker file disarms it."""

    def __init__(self, n: int, marker: str) -> None:
        self.n, self.marker, self.completed = n, marker, 0

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.completed += 1
        if self.completed == self.n and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.kill(os.getpid(), signal.SIGINT)


# -- outputs -----------------------------------------------------------------------------
def pareto_front(points: list[tuple[float, float]], mode: str = "min") -> list[int]:
    """Indices of the points not dominated in (quality by `mode`, compute min)."""
    sign = 1.0 if mode == "min" else -1.0
    front = []
    for i, (q, c) in enumerate(points):
        if any(
            (sign * q2 <= sign * q and c2 <= c) and (sign * q2 < sign * q or c2 < c)
            for j, (q2, c2) in enumerate(points)
            if j != i
        ):
            continue
        front.append(i)
    return front


def write_results(cfg: Config, base: RunStore, grid: Any, space: dict) -> dict[str, Any]:
    """results.csv/.parquet, best.yaml, pareto.png under `<run>/tune`."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    rows = []
    for result in grid:
        m = result.metrics or {}
        params = {k: v for k, v in (result.config or {}).items() if "[" not in k}
        rows.append(
            {
                "trial_id": m.get("trial_id"),
                "status": "error"
                if result.error
                else ("done" if m.get("evaluated") else "stopped"),
                "quality": m.get("quality") if m.get("evaluated") else None,
                "metric_name": m.get("metric_name"),
                "loss": m.get(ASHA_METRIC),
                COMPUTE: m.get(COMPUTE) if m.get("evaluated") else m.get("flops"),
                "train_rows": m.get("train_rows"),
                "iterations": m.get("training_iteration"),
                **{f"param.{k}": (str(v) if isinstance(v, list) else v) for k, v in params.items()},
                "_params": params,
            }
        )
    rows.sort(key=lambda r: str(r["trial_id"]))
    done = [r for r in rows if r["quality"] is not None and not math.isnan(r["quality"])]
    front = pareto_front([(r["quality"], r[COMPUTE]) for r in done], cfg.tune.mode)
    for i, r in enumerate(done):
        r["pareto"] = i in front
    # every row with every column (from_pylist takes the columns of the first row only)
    cols = list(dict.fromkeys(k for r in rows for k in r if k != "_params"))
    table = pa.Table.from_pylist([{k: r.get(k) for k in cols} for r in rows])
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    base.write_bytes(sink.getvalue().to_pybytes(), "tune", "results.parquet")
    csv = pa.BufferOutputStream()
    pacsv.write_csv(table, csv)
    base.write_bytes(csv.getvalue().to_pybytes(), "tune", "results.csv")
    out: dict[str, Any] = {"trials": len(rows), "evaluated": len(done), "rows": rows}
    if not done:
        log.warning("tune: no trial was evaluated; no best.yaml")
        return out
    sign = 1 if cfg.tune.mode == "min" else -1
    best = min(done, key=lambda r: sign * r["quality"])
    best_cfg = trial_config(cfg.model_dump(mode="json"), cfg.tune.trial_overrides,
                            best["_params"], space)  # fmt: skip
    header = (
        f"# best of {len(done)} evaluated trials: trial {best['trial_id']}, "
        f"{best['metric_name']} {best['quality']:.4g}, {best[COMPUTE]:.3g} train FLOPs\n"
    )
    base.write_text(header + dump_config(best_cfg), "tune", "best.yaml")
    base.write_bytes(pareto_png(done, cfg.tune.mode), "tune", "pareto.png")
    out.update(best=best, best_yaml=base.uri(base.path("tune", "best.yaml")))
    return out


def pareto_png(done: list[dict[str, Any]], mode: str) -> bytes:
    """Quality vs training compute, the Pareto front highlighted."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    xs = [r[COMPUTE] for r in done]
    ys = [r["quality"] for r in done]
    ax.scatter(xs, ys, c="tab:gray", label="trials")
    front = sorted((r for r in done if r.get("pareto")), key=lambda r: r[COMPUTE])
    ax.plot([r[COMPUTE] for r in front], [r["quality"] for r in front], "o-", c="tab:red",
            label="Pareto front")  # fmt: skip
    ax.set_xlabel("training compute (FLOPs)")
    better = "lower" if mode == "min" else "higher"
    ax.set_ylabel(f"{done[0].get('metric_name') or 'quality'} ({better} is better)")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def main(cfg: Config, run_dir: str) -> int:
    """`dedt-ray tune`: run or resume the sweep, print the results table, write the report."""
    from dedt_ray.pipeline import run_stage

    out = run_sweep(cfg, run_dir)
    report = run_stage("report", cfg, RunStore(run_dir))  # its "Sweep" section
    cols = ["trial_id", "status", "quality", "loss", COMPUTE, "train_rows"]
    params = sorted({k for r in out["rows"] for k in r if k.startswith("param.")})
    print("\n" + "  ".join([*cols, *params]))
    for r in out["rows"]:
        print("  ".join(_fmt(r.get(c)) for c in [*cols, *params]))
    if "best" in out:
        print(f"\nbest config: {out['best_yaml']}  (dedt-ray run --config {out['best_yaml']})")
    print(f"report: {report['summary']}")
    return 0


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
