"""The trainer library every training stage shares (train, reference, reweight, tdc): the driver.

    rows, labels, classes, data = training_rows(cfg, store, inputs)   # once, in the object store
    spec = model_spec(cfg, labels, classes, data)
    job = make_job(cfg, spec, labels, class_weights, key, source=..., loss=...)
    metrics, state = fit(cfg, store, job, rows, out, callbacks)   # Ray Train V2
    export_model(cfg, store, state, spec, classes, out)          # diffusers layout
    keep_checkpoints(store, out, key); write_history(store, state["history"], out)

The worker side is `dedt_ray.diffusion.worker.train_loop`; the job and its typed hooks (model
source, loss) are `dedt_ray.diffusion.job`. Checkpoints live under `<run>/_ray/<out>-<key>` while
a run is in progress, so rerunning a crashed stage with the same key resumes it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.fs as pafs  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402
import ray.data  # noqa: E402
import ray.train  # noqa: E402

from dedt_ray.artifacts import LATENTS, TrainingInputs, model_dir  # noqa: E402
from dedt_ray.config import Config, hash_json  # noqa: E402
from dedt_ray.diffusion.job import (  # noqa: E402
    CurveHook,
    LossSpec,
    ModelSource,
    PlainLoss,
    ScratchModel,
    TrainJob,
    hook_key,
)
from dedt_ray.diffusion.models import ModelSpec, build_noise_scheduler  # noqa: E402
from dedt_ray.diffusion.reports import TrainProgress  # noqa: E402
from dedt_ray.diffusion.rows import prepare_rows  # noqa: E402
from dedt_ray.diffusion.state import load_state  # noqa: E402
from dedt_ray.store import RAY_STATE, RunStore  # noqa: E402

log = logging.getLogger("dedt_ray")

# train.* fields that do not change what is trained (excluded from the resume key)
OPERATIONAL = {
    "num_workers", "use_gpu", "cpus_per_worker", "threads_per_worker", "checkpoint_every",
    "keep_checkpoints", "max_failures", "log_every", "fail_at_step", "fail_flag", "tracking",
    "tracking_uri",
}  # fmt: skip
MAX_WARMUP_FRACTION = 0.1  # warm-up is capped at this share of the steps (every trainer)


# -- rows ----------------------------------------------------------------------------------
def training_rows(
    cfg: Config, store: RunStore, inputs: TrainingInputs
) -> tuple[ray.data.Dataset, np.ndarray, list[str] | None, dict[str, Any]]:
    """(materialised rows: id, label, x [, weight]), labels, class names, data info.

    Source images (or the latents stage's latents), restricted to the selection if any."""
    from dedt_ray.data import open_source

    if cfg.model.latent:
        info = inputs.latent_info
        if info is None:
            raise RuntimeError("model.latent needs the latents stage first: `dedt-ray latents`")
        ds = ray.data.read_parquet(store.uri(store.path(*LATENTS)))
        column, shape, classes = "latent", tuple(info["shape"]), info.get("classes")
        data_info = {"latent_shape": info["shape"], "scaling_factor": info["scaling_factor"]}
    else:
        source = open_source(cfg.data)
        channels = 1 if cfg.data.mode == "L" else 3
        size = cfg.data.image_size
        ds, column, classes = source.dataset, "image", source.classes
        shape, data_info = (size, size, channels), {}
    keep = keep_weights = None
    selection = inputs.selection
    if selection is not None:
        order = np.argsort(np.asarray(selection.column("id").to_pylist(), dtype=str))
        keep = np.asarray(selection.column("id").to_pylist(), dtype=str)[order]
        if "weight" in selection.column_names:
            keep_weights = selection.column("weight").to_numpy()[order]
    kwargs = {"column": column, "shape": shape, "keep": keep, "keep_weights": keep_weights}
    if inputs.groups is not None:  # unlabelled rows: their clusters stand in for classes
        ids = np.asarray(inputs.groups.column("id").to_pylist(), dtype=str)
        order = np.argsort(ids)
        kwargs.update(group_ids=ids[order], groups=inputs.groups["group"].to_numpy()[order])
        data_info["grouped"] = True
    ds = ds.map_batches(prepare_rows, fn_kwargs=kwargs, batch_format="numpy").materialize()
    labels = np.concatenate(
        [b["label"] for b in ds.select_columns(["label"]).iter_batches(batch_format="numpy")]
        or [np.zeros(0, np.int64)]
    )
    if len(labels) == 0:
        raise ValueError("no training rows (empty source or empty selection)")
    return ds, labels, classes, {"shape": list(shape), **data_info}


def model_spec(cfg: Config, labels: np.ndarray, classes: list[str] | None, data: dict) -> ModelSpec:
    """The UNet's input shape and label space from the data and the config."""
    if cfg.model.latent:
        channels, size = data["latent_shape"][0], data["latent_shape"][1]
    else:
        size, channels = cfg.data.image_size, 1 if cfg.data.mode == "L" else 3
    if cfg.model.sample_size is not None and cfg.model.sample_size != size:
        raise ValueError(f"model.sample_size={cfg.model.sample_size} but the data are {size} px")
    num_classes = 0
    if data.get("grouped"):  # the labels are clusters of unlabelled data: no conditioning
        return ModelSpec(size, channels, 0, cfg.model.latent)
    if cfg.model.class_conditional:
        if labels.min() < 0:
            raise ValueError(
                "model.class_conditional needs labelled data (labels are -1); "
                "set model.class_conditional=false"
            )
        num_classes = len(classes) if classes else int(labels.max()) + 1
    return ModelSpec(size, channels, num_classes, cfg.model.latent)


# -- the job -------------------------------------------------------------------------------
def resume_key(
    cfg: Config,
    used: dict[str, str],
    source: ModelSource | None = None,
    loss: LossSpec | None = None,
    **extra: Any,
) -> str:
    """What a checkpoint must match to be resumed: everything but operational settings, the
    upstream outputs, the hooks (class and fields) and anything in `extra`."""
    train = cfg.train.model_dump(mode="json", exclude=OPERATIONAL)
    return hash_json(
        {
            "seed": cfg.seed,
            "data": cfg.data.model_dump(mode="json"),
            "model": cfg.model.model_dump(mode="json"),
            "train": train,
            "inputs": used,
            "source": hook_key(source or ScratchModel()),
            "loss": hook_key(loss or PlainLoss()),
            "extra": extra,
        }
    )


def make_job(
    cfg: Config,
    spec: ModelSpec,
    labels: np.ndarray,
    class_weights: np.ndarray | None,
    key: str,
    source: ModelSource | None = None,
    loss: LossSpec | None = None,
    t_range: tuple[int, int] | None = None,
    curve: CurveHook | None = None,
) -> TrainJob:
    """The worker's job: class weights as sampling probabilities or loss multipliers."""
    from dedt_ray.runtime import cluster_gpus

    tc = cfg.train
    if tc.infobatch.enabled:
        if loss is not None and not isinstance(loss, PlainLoss):
            raise ValueError("train.infobatch works with the plain denoising loss only")
        loss = PlainLoss(record=True)  # the per-sample losses are InfoBatch's scores
    train = tc.model_dump(mode="json")
    train["steps"] = budget_steps(cfg, len(labels))
    sampling = loss_weights = None
    if class_weights is not None:
        if tc.class_weighting == "sampling":
            sampling = class_weights.tolist()
        else:  # importance weights: same expected gradient as sampling by class weights
            share = np.bincount(labels, minlength=len(class_weights)) / len(labels)
            loss_weights = np.where(share > 0, class_weights / np.maximum(share, 1e-12), 0.0)
            loss_weights = loss_weights.tolist()
    train["warmup_steps"] = capped_warmup(tc.warmup_steps, train["steps"])
    return TrainJob(
        model=cfg.model.model_dump(mode="json"),
        train=train,
        spec=spec,
        seed=cfg.seed,
        fingerprint=key,
        source=source or ScratchModel(),
        loss=loss or PlainLoss(),
        sampling_weights=sampling,
        loss_class_weights=loss_weights,
        t_range=t_range,
        curve=curve,
        local=tc.num_workers == 0,
        use_gpu=tc.use_gpu if tc.use_gpu is not None else cluster_gpus() > 0,
    )


def capped_warmup(warmup_steps: int, steps: int) -> int:
    """Warm-up steps of a run: at most `MAX_WARMUP_FRACTION` of its steps, so a short run is
    not all warm-up (100 warm-up steps of 20 would never reach the peak learning rate)."""
    cap = int(steps * MAX_WARMUP_FRACTION)
    if warmup_steps > cap:
        log.warning(
            "train.warmup_steps=%d is more than %d%% of the %d steps; warming up for %d",
            warmup_steps, round(100 * MAX_WARMUP_FRACTION), steps, cap,
        )  # fmt: skip
        return cap
    return warmup_steps


def budget_steps(cfg: Config, rows: int) -> int:
    """`train.steps`, or for an epoch budget the steps of that many full passes over `rows`:
    `ceil(epochs x rows / batch_size)` (InfoBatch trains fewer: its epochs are shorter)."""
    tc = cfg.train
    return tc.steps if tc.epochs is None else max(1, math.ceil(tc.epochs * rows / tc.batch_size))


def step_flops(model: Any, cfg: Config, spec: ModelSpec) -> int:
    """FLOPs of one optimizer step of `model` on `train.batch_size` samples: forward +
    backward counted on one sample and scaled (every counted op is linear in the batch)."""
    import torch

    from dedt_ray.diffusion.core import count_step_flops

    x = torch.zeros(1, spec.channels, spec.sample_size, spec.sample_size)
    y = torch.zeros(1, dtype=torch.long) if spec.num_classes > 0 else None
    per_sample = count_step_flops(model, build_noise_scheduler(cfg.model), x, y)
    return per_sample * cfg.train.batch_size


def with_train(cfg: Config, **train: Any) -> Config:
    """`cfg` with `train.*` fields replaced (the warmup capped at a tenth of the steps)."""
    if "steps" in train:
        train.setdefault("warmup_steps", min(cfg.train.warmup_steps, train["steps"] // 10))
    return cfg.model_copy(update={"train": cfg.train.model_copy(update=train)})


def worker_env() -> dict[str, str]:
    """Environment of the train workers: OpenMP threads sleep instead of spinning while idle.

    Spinning (the default) collapses a CPU worker's throughput 10-40x when other processes
    share its cores (measured on a busy 2-core machine: 2 threads 5-8 img/s spinning, 214-232
    sleeping); set OMP_WAIT_POLICY in the driver's environment to choose otherwise.
    """
    return {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


# -- running it ----------------------------------------------------------------------------
def fit(
    cfg: Config,
    store: RunStore,
    job: TrainJob,
    rows: ray.data.Dataset,
    out: str,
    callbacks: Sequence[Any] = (),
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the TorchTrainer on `rows` as `<run>/_ray/<out>-<key>` (resumed when it exists);
    returns (final metrics, final checkpoint state). `callbacks`: ray.train UserCallbacks.

    The driver shows the run's progress and writes its metrics to the trackers in
    `train.tracking` (`diffusion.reports`); a damaged checkpoint is named in a warning and
    the workers resume from the newest one that loads."""
    from ray.train.torch import TorchTrainer

    from dedt_ray.diffusion.reports import local_reports, relay_reports
    from dedt_ray.diffusion.worker import train_loop
    from dedt_ray.runtime import chatty

    tc = cfg.train
    run_name = ray_run_name(out, job.fingerprint)
    resuming = store.exists(RAY_STATE, run_name)
    if resuming:
        warn_damaged_checkpoints(store, run_name)
    trackers = tracking_sinks(cfg, store, out, job, fresh=not resuming)
    sinks = [TrainProgress(job.train_cfg.steps, out), *trackers]
    resources = {"CPU": tc.cpus_per_worker, **({"GPU": 1} if job.use_gpu else {})}
    reporting = local_reports(sinks, callbacks) if job.local else relay_reports(sinks)
    with reporting as relay:
        if job.local:  # the loop writes its checkpoints where Ray Train's workers would, and
            # hands its reports to the sinks and callbacks itself (local mode calls none)
            checkpoints = store.uri(store.path(RAY_STATE, run_name))
            job = dataclasses.replace(job, checkpoints=checkpoints, on_report=relay)
            relay, callbacks = None, ()
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"job": job},
            datasets={"train": rows},
            scaling_config=ray.train.ScalingConfig(
                num_workers=tc.num_workers,
                use_gpu=job.use_gpu,
                resources_per_worker=resources if tc.num_workers else None,
            ),
            run_config=ray.train.RunConfig(
                name=run_name,
                storage_path=store.uri(store.path(RAY_STATE)),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=tc.keep_checkpoints),
                failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
                worker_runtime_env={"env_vars": worker_env()},
                callbacks=[*callbacks, *([relay] if relay else [])] or None,
                logging_config=ray.train.LoggingConfig("INFO" if chatty() else "WARNING"),
            ),
        )
        result = trainer.fit() if job.local else fit_off_main_thread(trainer)
    if result.checkpoint is None:
        raise RuntimeError("training ended without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        state = load_state(directory)
    if job.local:  # persisted by the loop already (`job.checkpoints`)
        shutil.rmtree(result.checkpoint.path, ignore_errors=True)
    return dict(result.metrics or {}), state


def fit_off_main_thread(trainer: Any) -> Any:
    """`trainer.fit()` in a thread, so Ctrl-C stays a KeyboardInterrupt in the main thread.

    On the main thread Ray Train V2's fit replaces the SIGINT handler with one that aborts the
    run and exits the process with status 1, printing nothing, and never puts the old one
    back; off it (as in Tune) it leaves signals alone. The CLI then reports the interrupt
    (exit 130, how to resume); the workers end with the driver, the checkpoints stay.
    """
    if threading.current_thread() is not threading.main_thread():
        return trainer.fit()
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # raised again in the main thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="dedt-ray-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)  # short waits: a SIGINT is raised between them
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def tracking_sinks(cfg: Config, store: RunStore, out: str, job: TrainJob, fresh: bool) -> list[Any]:
    """TensorBoard (`<run>/tensorboard/<out>`, emptied when the run starts `fresh`) and MLflow
    (experiment: the run directory's name, run: `out`) as `train.tracking` asks."""
    from dedt_ray.diffusion.reports import MLflowSink, TensorBoardSink, mlflow_uri

    tc, sinks = cfg.train, []
    if not tc.tracking:
        return sinks
    if not store.is_local and not tc.tracking_uri:
        log.warning("train.tracking: the run directory is not local; set train.tracking_uri")
    if "tensorboard" in tc.tracking and store.is_local:
        if fresh:
            store.delete("tensorboard", out)
        sinks.append(TensorBoardSink(store.local_path("tensorboard", out)))
    if "mlflow" in tc.tracking and (store.is_local or tc.tracking_uri):
        params = {f"train.{k}": v for k, v in job.train.items() if k not in OPERATIONAL}
        params.update({f"model.{k}": v for k, v in job.model.items()})
        uri = mlflow_uri(tc.tracking_uri, store.root)
        sinks.append(MLflowSink(uri, os.path.basename(store.root), out, params))
    return sinks


def warn_damaged_checkpoints(store: RunStore, run_name: str) -> None:
    """Name each checkpoint of an in-progress run that does not load (the workers skip them)."""
    from dedt_ray.diffusion.state import checkpoint_dirs, damaged_reason

    for name in reversed(checkpoint_dirs(store.list(RAY_STATE, run_name))):
        with tempfile.TemporaryDirectory() as tmp:
            folder = store.path(RAY_STATE, run_name, name)
            if not store.is_local:
                pafs.copy_files(folder, tmp, source_filesystem=store.fs)
                folder = tmp
            reason = damaged_reason(folder)
        if reason is None:
            return  # the newest checkpoint that loads is the one resumed
        log.warning(
            "%s: checkpoint %s is damaged (%s); resuming from an older one",
            run_name, store.uri(store.path(RAY_STATE, run_name, name)), reason,
        )  # fmt: skip


def ema_model(
    source: ModelSource | None, cfg: Config, spec: ModelSpec, state: dict[str, Any]
) -> Any:
    """The model of a checkpoint `state` (built by its `source`) with its EMA weights."""
    model = (source or ScratchModel()).build(cfg.model, spec)
    model.load_state_dict(state["model"])
    for param, shadow in zip(model.parameters(), state["ema"]["shadow_params"], strict=True):
        param.data.copy_(shadow)
    return model


def export_model(
    cfg: Config,
    store: RunStore,
    state: dict[str, Any],
    spec: ModelSpec,
    classes: list[str] | None,
    out: str,
) -> str:
    """The EMA weights of `state` in diffusers layout at `<run>/<out>/model`."""
    from dedt_ray.diffusion.export import load_vae, save_export

    info = {
        **spec.to_dict(),
        "class_conditional": spec.num_classes > 0,
        "classes": classes,
        "steps": state["step"],
        "images_seen": state["images_seen"],
        "flops": state["flops_per_step"] * state["step"],
        "ema_decay": cfg.train.ema_decay,
    }
    vae = load_vae(cfg.model.vae) if spec.latent else None
    dest = store.path(*model_dir(out))
    unet, scheduler = ema_model(None, cfg, spec, state), build_noise_scheduler(cfg.model)
    if store.is_local:
        save_export(dest, unet, scheduler, info, vae)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            save_export(tmp, unet, scheduler, info, vae)
            pafs.copy_files(tmp, dest, destination_filesystem=store.fs)
    return dest


def ray_run_name(out: str, key: str) -> str:
    """The Ray Train run folder of a stage's run while it is in progress: `<run>/_ray/<name>`."""
    return f"{out}-{key}"


def keep_checkpoints(store: RunStore, out: str, key: str) -> None:
    """Move a finished run's Ray folder to `<run>/<out>/checkpoints`."""
    run_name = ray_run_name(out, key)
    src, dst = store.path(RAY_STATE, run_name), store.path(out, "checkpoints")
    if not store.exists(RAY_STATE, run_name):
        return
    try:
        store.fs.move(src, dst)
    except (OSError, NotImplementedError):
        pafs.copy_files(src, dst, source_filesystem=store.fs, destination_filesystem=store.fs)
        store.fs.delete_dir(src)


def write_history(store: RunStore, history: list[dict[str, Any]], out: str) -> None:
    """The metrics history as `<run>/<out>/metrics.parquet` (one row per log step)."""
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(history), sink)
    store.write_bytes(sink.getvalue().to_pybytes(), out, "metrics.parquet")


def finish_curve(
    store: RunStore, curve: CurveHook | None, out: str, steps: list[int]
) -> dict[str, Any] | None:
    """Wait for the points of `steps` (the run's `curve_steps`), write
    `<run>/<out>/curve.parquet`, stop the actor."""
    if curve is None:
        return None
    started = time.perf_counter()
    points = ray.get(curve.scorer.finish.remote(steps))
    waited = time.perf_counter() - started
    status = ray.get(curve.scorer.status.remote())
    ray.kill(curve.scorer)
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(points), sink)
    store.write_bytes(sink.getvalue().to_pybytes(), out, "curve.parquet")
    metric = status["metric"] if points else None
    return {
        "points": len(points),
        "metric": metric,
        "final": points[-1][metric] if metric else None,
        "best": min(p[metric] for p in points) if metric else None,
        "noise": status["noise"],
        "noise_floor": points[0].get("noise_floor") if points else None,
        "eval_seconds": sum(p["eval_seconds"] for p in points),
        "wait_seconds": round(waited, 3),  # what the stage waited for the last points
    }


def run_summary(state: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """The manifest fields every training stage reports about its run."""
    steps, wall = state["step"], state["wall"]
    return {
        "steps": steps,
        "images_seen": state["images_seen"],
        "flops": state["flops_per_step"] * steps,
        "flops_per_step": state["flops_per_step"],
        "train_wall_seconds": round(wall, 3),
        "final_loss": metrics.get("loss"),
        "resumed_at": state["resumed_at"],
    }
