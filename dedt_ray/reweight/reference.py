"""Stage `reference`: the reference DM that the DRO proxy is measured against.

Either trained by the trainer library as DoReMi trains its reference (the small model
`reweight.proxy_model`, uniform class weights, the full data by default, `reference.data`; as
many steps as the proxy within `reweight.budget`, `dedt_ray.reweight.plan`) or copied from a
user's diffusers UNet2DModel folder (`reference.pretrained`, compute counted as zero), checked
against the data first. Either way the artifact is `<run>/reference/model/` in the trainer's
export layout (unet/, scheduler/, dedt_model.json), which `load_export` reads.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from dedt_ray.artifacts import TrainingInputs, model_dir, read_inputs
from dedt_ray.config import Config, ConfigError
from dedt_ray.diffusion.trainer import (
    budget_steps,
    export_model,
    fit,
    keep_checkpoints,
    make_job,
    model_spec,
    resume_key,
    run_summary,
    training_rows,
    write_history,
)
from dedt_ray.reweight.checks import (
    check_reference_classes,
    check_reweight,
    pretrained_unet_dir,
    stage_config,
)
from dedt_ray.reweight.plan import plan_dro
from dedt_ray.stages import StageContext
from dedt_ray.store import RunStore

log = logging.getLogger("dedt_ray")
OUT = "reference"
MODEL = model_dir(OUT)


def uniform_weights(labels: np.ndarray, classes: list[str] | None) -> np.ndarray | None:
    """Uniform class sampling weights, or None for unlabelled data."""
    if len(labels) == 0 or labels.min() < 0:
        return None
    k = len(classes) if classes else int(labels.max()) + 1
    return np.full(k, 1.0 / k)


def _expected_shape(cfg: Config, inputs: TrainingInputs) -> tuple[int, int]:
    """(sample size, channels) the denoiser sees, from the config (and latents info)."""
    if cfg.model.latent:
        if inputs.latent_info is None:
            raise RuntimeError("model.latent needs the latents stage first: `dedt-ray latents`")
        shape = inputs.latent_info["shape"]
        return int(shape[1]), int(shape[0])
    return cfg.data.image_size, 1 if cfg.data.mode == "L" else 3


def check_scheduler(cfg: Config, folder: str) -> None:
    """A pretrained model's scheduler config (when it has one) must match model.*."""
    path = os.path.join(folder, "scheduler", "scheduler_config.json")
    if not os.path.isfile(path):
        log.warning("reference: %s has no scheduler/; assuming model.* noise schedule", folder)
        return
    with open(path) as f:
        sched = json.load(f)
    from dedt_ray.diffusion.models import BETA_SCHEDULES

    want = {
        "num_train_timesteps": cfg.model.num_train_timesteps,
        "beta_schedule": BETA_SCHEDULES[cfg.model.beta_schedule],
        "prediction_type": cfg.model.prediction_type,
    }
    bad = {k: (sched.get(k), v) for k, v in want.items() if k in sched and sched[k] != v}
    if bad:
        raise ConfigError(
            "reference.pretrained: its noise schedule differs from model.* "
            + ", ".join(f"{k}={a!r} (model: {b!r})" for k, (a, b) in bad.items())
        )


FLAT = 0.05  # a loss falling less than this over the last quarter of the run counts as flat


def loss_trend(history: list[dict[str, Any]]) -> float | None:
    """Relative change of the mean logged loss from the third to the last quarter of a run
    (negative: still falling); None with fewer than 4 log points."""
    losses = [h["loss"] for h in history]
    if len(losses) < 4:
        return None
    q = len(losses) // 4
    third, last = np.mean(losses[-2 * q : -q]), np.mean(losses[-q:])
    return float((last - third) / third)


def data_classes(cfg: Config, inputs: TrainingInputs) -> int:
    """The number of classes in the data (from the source's class list, else its labels)."""
    from dedt_ray.data import open_source

    classes = (inputs.latent_info or {}).get("classes") if cfg.model.latent else None
    if classes is None and not cfg.model.latent:
        source = open_source(cfg.data)
        classes = source.classes
        if classes is None:
            labels = source.dataset.select_columns(["label"]).max("label")
            return int(labels) + 1 if labels is not None and labels >= 0 else 0
    return len(classes or [])


def copy_pretrained(cfg: Config, store: RunStore, inputs: TrainingInputs) -> dict[str, Any]:
    """Validate the user's UNet against the data and write it in the export layout."""
    from diffusers import UNet2DModel

    from dedt_ray.diffusion.export import save_export
    from dedt_ray.diffusion.models import build_noise_scheduler

    path = cfg.reference.pretrained
    assert path is not None
    folder = pretrained_unet_dir(path)
    check_scheduler(cfg, path)
    size, channels = _expected_shape(cfg, inputs)
    unet = UNet2DModel.from_pretrained(folder)
    got = (unet.config.sample_size, unet.config.in_channels, unet.config.out_channels)
    if got != (size, channels, channels):
        raise ConfigError(
            f"reference.pretrained: UNet (sample_size, in, out channels) = {got}, but the "
            f"data need ({size}, {channels}, {channels})"
        )
    embeds = unet.config.num_class_embeds
    check_reference_classes(embeds, data_classes(cfg, inputs), cfg.model.class_conditional)
    info = {
        "source": "pretrained",
        "pretrained": os.path.abspath(path),
        "sample_size": size,
        "channels": channels,
        "num_class_embeds": embeds,
        "steps": 0,
        "flops": 0,
    }
    with tempfile.TemporaryDirectory() as tmp:
        save_export(tmp, unet, build_noise_scheduler(cfg.model), info)
        dest = store.path(*MODEL)
        pafs.copy_files(tmp, dest, destination_filesystem=store.fs)
    params = sum(p.numel() for p in unet.parameters())
    return {
        "source": "pretrained",
        "pretrained": os.path.abspath(path),
        "model": store.uri(store.path(*MODEL)),
        "num_class_embeds": embeds,
        "parameters": params,
        "steps": 0,
        "flops": 0,
        "summary": f"pretrained reference from {path} ({params / 1e6:.2f} M parameters)",
    }


def run(cfg: Config, store: RunStore, ctx: StageContext) -> dict[str, Any]:
    """Stage entry point: train (or copy) the reference model into `<run>/reference/model`."""
    check_reweight(cfg)
    inputs = read_inputs(store, ctx.inputs)  # select (its subset, or its groups), latents
    final_rows = inputs.selection.num_rows if inputs.selection is not None else None
    if cfg.reference.data == "full":  # every row; the selection only lends its groups
        inputs.selection = None
    if cfg.reference.pretrained:
        return copy_pretrained(cfg, store, inputs)
    rows, labels, classes, data = training_rows(cfg, store, inputs)
    weights = uniform_weights(labels, classes)
    if weights is None or len(weights) < 2:  # nothing to reweight: save the compute
        reason = "unlabelled data" if weights is None else "a single class"
        log.warning("reference: %s, nothing to reweight; no reference trained", reason)
        return {"skipped": reason, "steps": 0, "flops": 0, "summary": f"skipped: {reason}"}
    spec = model_spec(cfg, labels, classes, data)
    plan = plan_dro(cfg, spec, budget_steps(cfg, final_rows or len(labels)))  # the train stage's
    rcfg = stage_config(cfg, "reference", plan.reference_steps)
    key = resume_key(rcfg, inputs.used, stage=OUT, data=cfg.reference.data)
    log.info(
        "reference: %d rows (%s), uniform class weights, %d steps of batch %d, model %s; "
        "reference + proxy planned at %.1f%% of the final training's FLOPs",
        len(labels), "subset" if inputs.selection is not None else "all rows",
        rcfg.train.steps, rcfg.train.batch_size, rcfg.model.block_out_channels,
        100 * plan.planned_fraction,
    )  # fmt: skip
    job = make_job(rcfg, spec, labels, weights, key)
    metrics, state = fit(rcfg, store, job, rows, OUT)
    export = export_model(rcfg, store, state, spec, classes, OUT)
    write_history(store, state["history"], OUT)
    keep_checkpoints(store, OUT, key)
    done = run_summary(state, metrics)
    loss = metrics.get("loss", float("nan"))
    trend = loss_trend(state["history"])
    if trend is not None and trend < -FLAT:
        log.warning(
            "reference: the loss still fell %.1f%% over the last quarter of its run; a longer "
            "reference (reweight.budget, reference.steps) measures the excess more faithfully",
            -100 * trend,
        )
    return {
        "source": "trained",
        "data": "subset" if inputs.selection is not None else "full",
        "rows": int(len(labels)),
        **done,
        "loss_trend_last_quarter": trend,
        "dro_plan": plan.to_dict(),
        "model_config": rcfg.model.model_dump(mode="json"),
        "batch_size": rcfg.train.batch_size,
        "inputs": inputs.used,
        "model": store.uri(export),
        "spec": spec.to_dict(),
        "summary": f"reference: {done['steps']} steps on {len(labels)} rows, loss {loss:.4f}, "
        f"{done['flops']:.3g} FLOPs",
    }
