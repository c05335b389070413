"""`dedt-ray study`: named settings x seeds, each run a Ray Tune trial, compared by the
compute each needs to reach the full-data baseline's quality (docs/study.md).

Phases, each one Tune experiment under `<run>/study/tune/<phase>` (a rerun restores it):
1. `baseline`: the full-data, unweighted setting at every seed, trained with
   `train.until=converged` (`train.steps` is its ceiling): its budget is where its curve
   flattens.
2. `settings`: every other setting at every seed, trained up to `study.max_compute` of the
   baseline's mean images seen (`train.steps`; `train.epochs` for settings that use them).
3. `best` (with `study.best`): the setting with the highest speed-up again, with
   `study.best.overrides` (e.g. DRO reweighting).

The embedding, the feature classifier and the real-feature cache are computed once in the
run directory and copied into every trial (`<run>/study/runs/<setting>/seed<k>/`, an ordinary
run directory). Outputs: `<run>/study/curves.parquet`, `summary.json`, `curves.png` and the
"Study" section of `<run>/report.html`.
"""

from __future__ import annotations

import logging
import math
import posixpath
import time
from dataclasses import dataclass
from typing import Any

import yaml

from dedt_ray.config import Config, ConfigError, StudySetting, apply_overrides
from dedt_ray.store import RunStore, check_own_files

log = logging.getLogger("dedt_ray")

STUDY = "study"
BASELINE, SETTINGS, BEST = "baseline", "settings", "best"
# a setting may not change what every run is measured against or shares
FIXED_SECTIONS = ("seed", "data", "embed", "evaluate", "study", "tune", "report")
FIXED_KEYS = ("train.eval_samples", "train.eval_steps", "train.until")
FULL_DATA = {"select.enabled": False, "reweight.enabled": False}
INTERRUPTED = 130  # exit code: rerun the same command to continue


@dataclass(frozen=True)
class Setting:
    """One resolved setting: its overrides as `key=value` strings, its phase and budget."""

    name: str
    overrides: tuple[str, ...]
    phase: str
    max_compute: float = 1.0


# -- settings -----------------------------------------------------------------------------
def as_overrides(values: dict[str, Any]) -> tuple[str, ...]:
    """{dotted key: value} -> `key=value` strings (values as flow YAML, as on a command line)."""
    out = []
    for key, value in values.items():
        text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...")
        out.append(f"{key}={text}")
    return tuple(out)


def setting_config(cfg: Config, name: str, overrides: tuple[str, ...] | list[str]) -> Config:
    """The base config with a setting's overrides; a ConfigError names the setting and key."""
    for item in overrides:
        key = item.partition("=")[0]
        if key.split(".")[0] in FIXED_SECTIONS or key in FIXED_KEYS:
            raise ConfigError(
                f"study.settings {name!r}: {key}: a setting cannot change it (every setting "
                f"is measured against the same images, with the same curve, by the study)"
            )
    return with_overrides(cfg, name, overrides)


def with_overrides(cfg: Config, name: str, overrides: tuple[str, ...] | list[str]) -> Config:
    """`cfg` with dotted `key=value` overrides, validated; errors name the setting."""
    try:
        return apply_overrides(cfg.model_dump(mode="json"), list(overrides))
    except ConfigError as exc:
        detail = str(exc).removeprefix("invalid config:\n").strip()
        raise ConfigError(f"study.settings {name!r}: {detail}") from None


def resolve_settings(cfg: Config) -> list[Setting]:
    """The baseline first, then the other settings; every one validated against the base
    config (and, with `study.best`, every candidate with the best-phase overrides), so a bad
    key fails before any trial starts."""
    st = cfg.study
    if cfg.train.eval_every is None:
        raise ConfigError("study: train.eval_every must be set (every run's curve is scored)")
    given = {s.name: s for s in st.settings}
    base_setting = given.get(st.baseline) or StudySetting(name=st.baseline, overrides=FULL_DATA)
    out = [Setting(st.baseline, as_overrides(base_setting.overrides), BASELINE)]
    resolved = setting_config(cfg, st.baseline, out[0].overrides)
    if resolved.select.enabled or resolved.reweight.enabled:
        raise ConfigError(
            f"study.baseline {st.baseline!r} must train on the full data without reweighting "
            "(select.enabled=false, reweight.enabled=false)"
        )
    for s in st.settings:
        if s.name == st.baseline:
            continue
        setting = Setting(s.name, as_overrides(s.overrides), SETTINGS,
                          s.max_compute or st.max_compute)  # fmt: skip
        setting_config(cfg, s.name, setting.overrides)
        if st.best and (st.best.among is None or s.name in st.best.among):
            extra = (*setting.overrides, *as_overrides(st.best.overrides))
            setting_config(cfg, f"{st.best.name} (from {s.name})", extra)
        out.append(setting)
    if st.best and len(out) < 2:
        raise ConfigError("study.best needs at least one setting besides the baseline")
    return out


def best_setting(
    cfg: Config, settings: list[Setting], summary: dict[str, Any]
) -> tuple[Setting, dict[str, Any]]:
    """The best-phase setting: the candidate with the highest speed-up (then the lowest final
    metric), with `study.best.overrides` added."""
    best = cfg.study.best
    assert best is not None
    among = [s for s in settings if s.phase == SETTINGS and (best.among is None
                                                             or s.name in best.among)]  # fmt: skip

    def rank(s: Setting) -> tuple[float, float]:
        row = summary["settings"].get(s.name, {})
        speed = row.get("speedup", {}).get("point")
        speed = -math.inf if speed is None else (math.inf if speed == "inf" else float(speed))
        final = row.get("final", {}).get("mean")
        return (-speed, math.inf if final is None else float(final))

    chosen = min(among, key=rank)
    setting = Setting(best.name, (*chosen.overrides, *as_overrides(best.overrides)), BEST,
                      chosen.max_compute)  # fmt: skip
    return setting, {"name": best.name, "from": chosen.name, "among": [s.name for s in among],
                     "by": "highest speed-up, then lowest final metric"}  # fmt: skip


# -- one trial ----------------------------------------------------------------------------
def run_path(base: RunStore, setting: str, seed: int) -> str:
    """A study run's own run directory."""
    return base.path(STUDY, "runs", setting, f"seed{seed}")


def budget_overrides(cfg: Config, setting: Setting, budget: dict | None, store: RunStore) -> list:
    """The baseline trains until its curve flattens; every other setting up to its share of
    the baseline's images seen, as steps, or as epochs over its rows when it uses epochs."""
    if setting.phase == BASELINE:
        return ["train.until=converged"]
    assert budget is not None, "the baseline's budget is needed first"
    images = setting.max_compute * budget["images_seen"]
    if cfg.train.epochs is not None or cfg.train.infobatch.enabled:
        from dedt_ray.tune import train_rows

        return ["train.until=steps", f"train.epochs={images / train_rows(cfg, store):.6g}"]
    return ["train.until=steps", f"train.steps={max(1, math.ceil(images / cfg.train.batch_size))}"]


def study_trial_pipeline(ctx: dict[str, Any], params: dict, trial_id: str, queue: Any) -> dict:
    """One (setting, seed): its config, budget and pipeline in its own run directory."""
    from dedt_ray.tune import copy_shared, pipeline_in_trial

    base = RunStore(ctx["run_dir"])
    setting = Setting(**{**ctx["settings"][params["setting"]]})
    seed = int(params["seed"])
    store = RunStore(run_path(base, setting.name, seed))
    copy_shared(base, store)
    cfg = Config.model_validate(ctx["base"])
    fixed = [*setting.overrides, f"seed={seed}", f"select.seed={seed}"]
    cfg = with_overrides(cfg, setting.name, fixed)
    cfg = with_overrides(cfg, setting.name, budget_overrides(cfg, setting, ctx["budget"], store))
    done = pipeline_in_trial(base, store, cfg, queue)
    train = done["train"]
    return {
        "study_done": 1,
        "setting": setting.name,
        "seed": seed,
        "steps": train["steps"],
        "train_flops": float(train["flops"]),
        "stopped": train.get("stopped") or "",
    }


# -- a phase: one Tune experiment ------------------------------------------------------------
def run_phase(
    cfg: Config, base: RunStore, ctx: dict[str, Any], settings: list[Setting], callbacks: list
) -> dict[tuple[str, int], dict[str, Any]]:
    """Run (or restore and continue) the phase's experiment; each (setting, seed)'s outcome:
    status `done`, `failed` (after its retries, with the error) or `unfinished` (interrupted)."""
    import ray.tune

    from dedt_ray.tune import concurrency, run_trial

    phase = settings[0].phase
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(run_trial, ctx=ctx, pipeline=study_trial_pipeline),
        {"CPU": cfg.tune.cpus_per_trial, "memory": 64 * 2**20},
    )
    storage = base.uri(base.path(STUDY, "tune"))
    path = posixpath.join(storage, phase)
    if ray.tune.Tuner.can_restore(path):
        if base.is_local:  # Tune unpickles the experiment's state: only the user's own
            why = "Ray Tune unpickles a phase's state when a study continues (docs/tune.md)"
            check_own_files(base.path(STUDY, "tune", phase), why)
        log.info("study: continuing phase %s in %s", phase, path)
        tuner = ray.tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    else:
        base.fs.create_dir(base.path(STUDY, "tune"), recursive=True)
        tuner = ray.tune.Tuner(
            trainable,
            param_space={
                "setting": ray.tune.grid_search([s.name for s in settings]),
                "seed": ray.tune.grid_search(list(cfg.study.seeds)),
            },  # fmt: skip
            tune_config=ray.tune.TuneConfig(
                max_concurrent_trials=cfg.study.max_concurrent or concurrency(cfg),
                trial_dirname_creator=lambda t: f"{t.config['setting']}-seed{t.config['seed']}",
            ),
            run_config=ray.tune.RunConfig(
                name=phase,
                storage_path=storage,
                callbacks=callbacks,
                verbose=1,
                failure_config=ray.tune.FailureConfig(max_failures=cfg.study.max_failures),
            ),  # fmt: skip
        )
    expected = [(s.name, seed) for s in settings for seed in cfg.study.seeds]
    return outcomes(tuner.fit(), expected)


def outcomes(grid: Any, expected: list[tuple[str, int]]) -> dict[tuple[str, int], dict]:
    """Each expected trial's status and error in a finished (or interrupted) experiment; an
    interrupted grid lacks the trials it had not created yet: `unfinished`."""
    out: dict[tuple[str, int], dict] = {key: {"status": "unfinished"} for key in expected}
    for result in grid:
        config = result.config or {}
        key = (str(config.get("setting")), int(config.get("seed", -1)))
        if (result.metrics or {}).get("study_done"):
            out[key] = {"status": "done"}
        elif result.error is not None:
            out[key] = {"status": "failed", "error": f"{type(result.error).__name__}: "
                        f"{str(result.error).strip().splitlines()[-1][:300]}"}  # fmt: skip
        else:
            out[key] = {"status": "unfinished"}
    return out


# -- reading the runs ---------------------------------------------------------------------
def read_seed_run(base: RunStore, setting: str, seed: int, metric: str | None) -> Any:
    """A finished run's curve (with the embedding's compute added when it selected), rows
    and evaluated metric, as `curves.SeedRun`."""
    import io

    import pyarrow.parquet as pq

    from dedt_ray.evaluate.curves import SeedRun

    run = RunStore(run_path(base, setting, seed))
    points: list[dict[str, Any]] = []
    for stage in ("train", "tdc"):  # TDC stage 2's routed model continues the curve
        if run.manifest(stage) and run.exists(stage, "curve.parquet"):
            table = pq.read_table(io.BytesIO(run.read_bytes(stage, "curve.parquet")))
            points += [{**p, "stage": stage} for p in table.to_pylist()]
    offset = float((run.manifest("embed") or {}).get("flops") or 0) if run.manifest("select") else 0
    for p in points:
        p["selection_flops"] = offset
        p["train_flops"] = float(p["train_flops"]) + offset
    train = run.manifest("train") or {}
    evaluate = run.read_json("evaluate", "metrics.json") if run.manifest("evaluate") else {}
    name = metric or (train.get("curve") or {}).get("metric")
    evaluated = (evaluate.get("metrics") or {}).get(name) if name else None
    return SeedRun(sorted(points, key=lambda p: p["train_flops"]), int(train.get("rows") or 0),
                   evaluated, int(train.get("images_seen") or 0))  # fmt: skip


def baseline_budget(runs: dict[int, Any]) -> dict[str, float]:
    """The baseline's mean steps and images seen over its finished seeds."""
    images = [r.images_seen for r in runs.values()]
    steps = [max(p["step"] for p in r.points) for r in runs.values() if r.points]
    return {"images_seen": sum(images) / len(images), "steps": sum(steps) / max(1, len(steps)),
            "seeds": sorted(runs)}  # fmt: skip


# -- the study ----------------------------------------------------------------------------
def prepare_shared(cfg: Config, base: RunStore) -> None:
    """Embed once; train the feature classifier and cache the real features once."""
    from dedt_ray.evaluate.scorer import real_side
    from dedt_ray.evaluate.stage import resolve_feature_space
    from dedt_ray.pipeline import run_stage
    from dedt_ray.runtime import cluster_gpus

    embed = run_stage("embed", cfg, base)
    log.info("study: embeddings %s", "reused" if embed.get("skipped_stage") else "computed")
    ev = cfg.evaluate
    gpus = ev.gpus_per_actor if ev.gpus_per_actor is not None else min(1.0, cluster_gpus())
    space, how = resolve_feature_space(cfg, base, gpus)
    real_side(cfg, base, space, gpus)
    log.info("study: feature space %s (%s); real features cached", space.metric, how)


def run_study(cfg: Config, run_dir: str, interrupt_after: int | None = None) -> dict[str, Any]:
    """Every phase (continuing an earlier, interrupted study), then the outputs.

    `interrupt_after` (testing): SIGINT after that many trials of a phase complete, as Ctrl+C
    would. Returns the summary, or {"interrupted": True} when a phase did not finish."""
    from dedt_ray.config import dump_config
    from dedt_ray.runtime import init_ray
    from dedt_ray.tune import Interrupt

    started = time.time()
    settings = resolve_settings(cfg)
    init_ray()
    base = RunStore(run_dir)
    base.write_text(dump_config(cfg), "config.yaml")
    prepare_shared(cfg, base)
    callbacks = [Interrupt(interrupt_after, base.local_path(STUDY, ".interrupted"))] \
        if interrupt_after else []  # fmt: skip
    ctx: dict[str, Any] = {
        "run_dir": base.uri(base.root),
        "base": cfg.model_dump(mode="json"),
        "settings": {s.name: vars(s) for s in settings},
        "budget": None,
    }
    status: dict[tuple[str, int], dict[str, Any]] = {}
    for group in ([settings[0]], settings[1:]):
        if not group:
            continue
        status.update(run_phase(cfg, base, ctx, group, callbacks))
        if any(o["status"] == "unfinished" for o in status.values()):
            return {"interrupted": True}
        if ctx["budget"] is None:  # after the baseline: the other settings' budget
            ctx["budget"] = baseline_budget(finished_runs(base, status, group)[group[0].name])
    summary = write_outputs(cfg, base, settings, status, ctx["budget"], started)
    if cfg.study.best:
        best, why = best_setting(cfg, settings, summary)
        log.info("study: best setting %s; phase %s adds %s", why["from"], BEST, best.overrides)
        ctx["settings"][best.name] = vars(best)
        status.update(run_phase(cfg, base, ctx, [best], callbacks))
        if any(o["status"] == "unfinished" for o in status.values()):
            return {"interrupted": True}
        summary = write_outputs(cfg, base, [*settings, best], status, ctx["budget"], started, why)
    return summary


def finished_runs(
    base: RunStore, status: dict[tuple[str, int], dict], settings: list[Setting]
) -> dict[str, dict[int, Any]]:
    """{setting: {seed: SeedRun}} of the runs that finished."""
    out: dict[str, dict[int, Any]] = {}
    for s in settings:
        done = sorted(seed for (name, seed), o in status.items()
                      if name == s.name and o["status"] == "done")  # fmt: skip
        out[s.name] = {seed: read_seed_run(base, s.name, seed, None) for seed in done}
    if not out[settings[0].name] and settings[0].phase == BASELINE:
        raise RuntimeError(
            f"study: the baseline {settings[0].name!r} failed at every seed: "
            + "; ".join(o.get("error", "") for (n, _), o in status.items() if n == settings[0].name)
        )
    return out


# -- outputs ------------------------------------------------------------------------------
def json_safe(obj: Any) -> Any:
    """Infinite floats as the string "inf" / "-inf", NaN as null (strict JSON)."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    return obj


def curves_table(runs: dict[str, dict[int, Any]]) -> Any:
    """Every point of every finished run, with its setting and seed (pyarrow table)."""
    import pyarrow as pa

    rows = [
        {"setting": name, "seed": seed, **p}
        for name, seeds in runs.items()
        for seed, run in seeds.items()
        for p in run.points
    ]
    first = ["setting", "seed", "stage", "step", "images_seen", "train_flops", "selection_flops",
             "wall_s"]  # fmt: skip
    cols = list(dict.fromkeys([*first, *(k for r in rows for k in r)]))
    return pa.Table.from_pylist([{k: r.get(k) for k in cols} for r in rows])


def write_outputs(
    cfg: Config,
    base: RunStore,
    settings: list[Setting],
    status: dict[tuple[str, int], dict[str, Any]],
    budget: dict[str, Any],
    started: float,
    best: dict[str, str] | None = None,
) -> dict[str, Any]:
    """curves.parquet, summary.json and curves.png under `<run>/study`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dedt_ray.evaluate.curves import summarize_study
    from dedt_ray.plots import spread_png

    runs = finished_runs(base, status, settings)
    first = RunStore(run_path(base, settings[0].name, min(runs[settings[0].name])))
    metric_name = str(first.manifest("train")["curve"]["metric"])
    st = cfg.study
    summary = summarize_study(runs, settings[0].name, metric_name, st.tolerance,
                              st.bootstrap_draws, st.level)  # fmt: skip
    for s in settings:
        row = summary["settings"].setdefault(s.name, {"seeds": []})
        failed = {str(seed): o.get("error") for (n, seed), o in status.items()
                  if n == s.name and o["status"] == "failed"}  # fmt: skip
        row.update(
            phase=s.phase,
            overrides=list(s.overrides),
            failed=failed,
            status="failed" if not row["seeds"] else ("partial" if failed else "done"),
        )
    floor = [p.get("noise_floor") for r in runs[settings[0].name].values() for p in r.points]
    summary.update(noise_floor=next((f for f in floor if f is not None), None), budget=budget,
                   max_compute=st.max_compute, seeds=list(st.seeds), best=best,
                   wall_s=round(time.time() - started, 1))  # fmt: skip
    summary = json_safe(summary)
    sink = pa.BufferOutputStream()
    pq.write_table(curves_table(runs), sink)
    base.write_bytes(sink.getvalue().to_pybytes(), STUDY, "curves.parquet")
    base.write_json(summary, STUDY, "summary.json")
    curves = {name: {seed: r.points for seed, r in seeds.items()} for name, seeds in runs.items()}
    png = spread_png(curves, metric_name, summary["noise_floor"], summary["target"])
    base.write_bytes(png, STUDY, "curves.png")
    return summary


# -- the command --------------------------------------------------------------------------
def main(cfg: Config, run_dir: str) -> int:
    """`dedt-ray study`: run or continue the study, print the table, write the report."""
    from dedt_ray.pipeline import run_stage

    summary = run_study(cfg, run_dir)
    if summary.get("interrupted"):
        print(f"\nstudy interrupted; rerun the same command to continue ({run_dir})")
        return INTERRUPTED
    report = run_stage("report", cfg, RunStore(run_dir))  # its "Study" section
    print(f"\ntarget: {summary['metric']} <= {summary['target']:.4g} (baseline "
          f"{summary['baseline']} final {summary['baseline_final']:.4g} x "
          f"{1 + summary['tolerance']:g}); noise floor {summary['noise_floor']}")  # fmt: skip
    from dedt_ray.evaluate.curves import SUMMARY_HEADER, summary_rows

    print("  ".join(SUMMARY_HEADER))
    for row in summary_rows(summary):
        print("  ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row))
    study = RunStore(run_dir).path(STUDY)
    print(f"\n{study}/summary.json, {study}/curves.parquet; report: {report['summary']}")
    return 0
