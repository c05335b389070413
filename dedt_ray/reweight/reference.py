"""Stage `reference`: the reference DM that the DRO proxy is measured against.

Either trained by the trainer (Ray Train; uniform class weights; on the `select` subset or
the full data, `reference.data`; `reference.steps`, by default 3.5% of `train.steps`) or
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
import pyarrow as pa
import pyarrow.fs as pafs

from dedt_ray.config import Config, ConfigError
from dedt_ray.diffusion.train import (
    LATENT_INFO,
    SCORES,
    _keep_checkpoints,
    export,
    fit,
    model_spec,
    read_selection,
    resume_key,
    training_rows,
    write_history,
)
from dedt_ray.reweight.checks import (
    check_reweight,
    pretrained_unet_dir,
    stage_config,
)
from dedt_ray.store import RunStore

log = logging.getLogger("dedt_ray")
MODEL = ("reference", "model")


def subset_input(cfg: Config, store: RunStore) -> tuple[pa.Table | None, dict[str, str]]:
    """The select stage's kept rows when it ran and is enabled (else None: all rows)."""
    select = store.manifest("select")
    if select is None or not cfg.select.enabled or not store.exists(*SCORES):
        return None, {}
    return read_selection(store), {"select": select["output_id"]}


def latents_input(cfg: Config, store: RunStore) -> dict[str, str]:
    if not cfg.model.latent:
        return {}
    latents = store.manifest("latents")
    if latents is None:
        raise RuntimeError("model.latent needs the latents stage first: `dedt-ray latents`")
    return {"latents": latents["output_id"]}


def uniform_weights(labels: np.ndarray, classes: list[str] | None) -> np.ndarray | None:
    """Uniform class sampling weights, or None for unlabelled data."""
    if len(labels) == 0 or labels.min() < 0:
        return None
    k = len(classes) if classes else int(labels.max()) + 1
    return np.full(k, 1.0 / k)


def _expected_shape(cfg: Config, store: RunStore) -> tuple[int, int]:
    """(sample size, channels) the denoiser sees, from the config (and latents info)."""
    if cfg.model.latent:
        shape = store.read_json(*LATENT_INFO)["shape"]
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


def copy_pretrained(cfg: Config, store: RunStore) -> dict[str, Any]:
    """Validate the user's UNet against the data and write it in the export layout."""
    from diffusers import UNet2DModel

    from dedt_ray.diffusion.export import save_export
    from dedt_ray.diffusion.models import build_noise_scheduler

    path = cfg.reference.pretrained
    assert path is not None
    folder = pretrained_unet_dir(path)
    check_scheduler(cfg, path)
    size, channels = _expected_shape(cfg, store)
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


def run(cfg: Config, store: RunStore) -> dict[str, Any]:
    """Stage entry point: train (or copy) the reference model into `<run>/reference/model`."""
    check_reweight(cfg)
    if cfg.reference.pretrained:
        return copy_pretrained(cfg, store)
    selection, used = (None, {})
    if cfg.reference.data == "subset":
        selection, used = subset_input(cfg, store)
    used.update(latents_input(cfg, store))
    rows, labels, classes, data = training_rows(cfg, store, selection)
    weights = uniform_weights(labels, classes)
    if weights is None or len(weights) < 2:  # nothing to reweight: save the compute
        reason = "unlabelled data" if weights is None else "a single class"
        log.warning("reference: %s, nothing to reweight; no reference trained", reason)
        return {"skipped": reason, "steps": 0, "flops": 0, "summary": f"skipped: {reason}"}
    spec = model_spec(cfg, labels, classes, data)
    rcfg = stage_config(cfg, "reference")
    key = resume_key(rcfg, used, extra={"stage": "reference", "data": cfg.reference.data})
    log.info(
        "reference: %d rows (%s), uniform class weights, %d steps of batch %d",
        len(labels), "subset" if selection is not None else "all rows",
        rcfg.train.steps, rcfg.train.batch_size,
    )  # fmt: skip
    metrics, state = fit(rcfg, store, rows, labels, spec, weights, key, out="reference")
    model_dir = export(rcfg, store, state, spec, classes, out="reference")
    write_history(store, state["history"], out="reference")
    _keep_checkpoints(store, key, "reference")
    steps, flops = state["step"], state["flops_per_step"] * state["step"]
    loss = metrics.get("loss", float("nan"))
    return {
        "source": "trained",
        "data": "subset" if selection is not None else "full",
        "rows": int(len(labels)),
        "steps": steps,
        "batch_size": rcfg.train.batch_size,
        "images_seen": state["images_seen"],
        "flops": flops,
        "flops_per_step": state["flops_per_step"],
        "train_wall_seconds": round(state["wall"], 3),
        "final_loss": metrics.get("loss"),
        "resumed_at": state["resumed_at"],
        "inputs": used,
        "model": store.uri(model_dir),
        "spec": spec.to_dict(),
        "summary": f"reference: {steps} steps on {len(labels)} rows, loss {loss:.4f}, "
        f"{flops:.3g} FLOPs",
    }
