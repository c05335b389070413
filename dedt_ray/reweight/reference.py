"""Stage `reference`: the reference DM that the DRO proxy is measured against.

Either trained by the trainer library (Ray Train; uniform class weights; on the `select`
subset or the full data, `reference.data`; `reference.steps`, by default 3.5% of
`train.steps`) or
copied from a user's diffusers UNet2DModel folder (`reference.pretrained`). Either way the
artifact is `<run>/reference/model/` in the trainer's export layout (unet/, scheduler/,
dedt_model.json), which `load_export` reads.
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
from dedt_ray.reweight.checks import check_reweight, pretrained_unet_dir, stage_config
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
    inputs = read_inputs(store, ctx.inputs)  # the subset (reference.data=subset), latents
    if cfg.reference.pretrained:
        return copy_pretrained(cfg, store, inputs)
    rows, labels, classes, data = training_rows(cfg, store, inputs)
    weights = uniform_weights(labels, classes)
    if weights is None or len(weights) < 2:  # nothing to reweight: save the compute
        reason = "unlabelled data" if weights is None else "a single class"
        log.warning("reference: %s, nothing to reweight; no reference trained", reason)
        return {"skipped": reason, "steps": 0, "flops": 0, "summary": f"skipped: {reason}"}
    spec = model_spec(cfg, labels, classes, data)
    rcfg = stage_config(cfg, "reference")
    key = resume_key(rcfg, inputs.used, stage=OUT, data=cfg.reference.data)
    log.info(
        "reference: %d rows (%s), uniform class weights, %d steps of batch %d",
        len(labels), "subset" if inputs.selection is not None else "all rows",
        rcfg.train.steps, rcfg.train.batch_size,
    )  # fmt: skip
    job = make_job(rcfg, spec, labels, weights, key)
    metrics, state = fit(rcfg, store, job, rows, OUT)
    export = export_model(rcfg, store, state, spec, classes, OUT)
    write_history(store, state["history"], OUT)
    keep_checkpoints(store, OUT, key)
    done = run_summary(state, metrics)
    loss = metrics.get("loss", float("nan"))
    return {
        "source": "trained",
        "data": "subset" if inputs.selection is not None else "full",
        "rows": int(len(labels)),
        **done,
        "batch_size": rcfg.train.batch_size,
        "inputs": inputs.used,
        "model": store.uri(export),
        "spec": spec.to_dict(),
        "summary": f"reference: {done['steps']} steps on {len(labels)} rows, loss {loss:.4f}, "
        f"{done['flops']:.3g} FLOPs",
    }
