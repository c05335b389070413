"""Stage `reweight`: DoReMi class weights from a proxy DM trained by Group DRO on Ray Train.

The proxy (`reweight.proxy_model`, from scratch, uniform class sampling) trains on the `select`
subset for the steps `reweight/plan.py` plans (`reweight.budget` of the final training's FLOPs,
shared equally with the reference; `reweight.steps` overrides) with the trainer library; its
loss hook (`DROSpec` -> `dedt_ray.reweight.dro.DROLoss`) compares it with the frozen
`<run>/reference/model` on the same (x_t, t, noise) each step and updates the weights.

Artifacts in `<run>/reweight/`: class_weights.json (`{"weights": {"<label>": w}, ...}`,
what the train stage reads: the running average of the weights), trace.parquet (step, class,
name, weight, average, excess), weights_over_steps.png, class_weights.png, metrics.parquet
and checkpoints/. The manifest carries the compute of reference + proxy as a fraction of the
final training's estimated FLOPs (`dedt_ray.reweight.cost`).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dedt_ray.artifacts import CLASS_WEIGHTS, class_names, model_dir, read_inputs
from dedt_ray.config import Config
from dedt_ray.diffusion.trainer import (
    budget_steps,
    fit,
    keep_checkpoints,
    make_job,
    model_spec,
    resume_key,
    training_rows,
    write_history,
)
from dedt_ray.reweight.checks import check_reference_classes, check_reweight, stage_config
from dedt_ray.reweight.cost import cost_fraction, dro_cost
from dedt_ray.reweight.dro import DROSpec
from dedt_ray.reweight.plan import plan_dro
from dedt_ray.reweight.plots import final_weights_png, weights_over_steps_png
from dedt_ray.reweight.reference import uniform_weights
from dedt_ray.stages import StageContext
from dedt_ray.store import RunStore

__all__ = ["class_names", "run", "trace_table"]
log = logging.getLogger("dedt_ray")
OUT = "reweight"
REFERENCE = model_dir("reference")
TRACE = "trace.parquet"
PLOT_STEPS = "weights_over_steps.png"
PLOT_BARS = "class_weights.png"


def reference_forward_flops(store: RunStore, rows: int) -> int:
    """FLOPs of one reference forward pass on `rows` samples (torch FlopCounterMode)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from dedt_ray.reweight.dro import load_reference_unet

    unet = load_reference_unet(store.uri(store.path(*REFERENCE)))
    cfg = unet.config
    x = torch.zeros(rows, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    t = torch.ones(rows, dtype=torch.long)
    y = torch.zeros(rows, dtype=torch.long) if cfg.num_class_embeds else None
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        unet(x, t, class_labels=y)
    return int(counter.get_total_flops())


def trace_table(trace: dict[str, Any], names: list[str]) -> pa.Table:
    """Long format: one row per (step, class)."""
    steps = np.asarray(trace["step"].numpy(), np.int64)
    n, k = len(steps), len(names)
    return pa.table(
        {
            "step": np.repeat(steps, k),
            "class": np.tile(np.arange(k, dtype=np.int64), n),
            "name": pa.array(names * n, pa.string()),
            "weight": trace["weight"].numpy().reshape(-1),
            "average": trace["average"].numpy().reshape(-1),
            "excess": trace["excess"].numpy().reshape(-1),
            "present": trace["present"].numpy().reshape(-1) > 0,  # in the step's global batch
        }
    )


def _skip(reason: str) -> dict[str, Any]:
    log.warning("reweight: %s; no class weights written", reason)
    return {"skipped": reason, "steps": 0, "search_flops": 0, "summary": f"skipped: {reason}"}


def run(cfg: Config, store: RunStore, ctx: StageContext) -> dict[str, Any]:
    """Stage entry point: train the proxy by Group DRO, write weights, trace and plots."""
    check_reweight(cfg)
    inputs = read_inputs(store, ctx.inputs)  # reference, the subset, latents
    rows, labels, classes, data = training_rows(cfg, store, inputs)
    if labels.min() < 0:
        return _skip("the data are unlabelled (one class)")
    spec = model_spec(cfg, labels, classes, data)
    k = len(classes) if classes else int(labels.max()) + 1
    if k < 2:
        return _skip("a single class")
    names = class_names(store, classes, k)
    embeds = store.read_json(*REFERENCE, "unet", "config.json").get("num_class_embeds")
    check_reference_classes(embeds, k, spec.num_classes > 0)  # before any proxy step

    plan, rw = plan_dro(cfg, spec, budget_steps(cfg, len(labels))), cfg.reweight  # train's rows
    pcfg = stage_config(cfg, "reweight", plan.proxy_steps)
    initial = rw.initial_excess
    if initial is None:
        initial = initial_excess(pcfg, rows, not spec.latent)
    dro = DROSpec(store.uri(store.path(*REFERENCE)), k, rw.eta, rw.smoothing, initial)
    key = resume_key(pcfg, inputs.used, loss=dro, stage=OUT)
    log.info(
        "reweight: proxy %s on %d rows (%s), %d classes, %d steps of batch %d, eta %g, c %g, "
        "initial excess %.3g",
        pcfg.model.block_out_channels, len(labels),
        "subset" if inputs.selection is not None else "all rows", k,
        pcfg.train.steps, pcfg.train.batch_size, rw.eta, rw.smoothing, initial,
    )  # fmt: skip
    job = make_job(pcfg, spec, labels, uniform_weights(labels, classes), key, loss=dro)
    metrics, state = fit(pcfg, store, job, rows, OUT)
    write_history(store, state["history"], OUT)
    keep_checkpoints(store, OUT, key)
    average = write_weights(store, state, names, rw.eta, rw.smoothing)
    cost = search_cost(pcfg, store, state, inputs.manifests["reference"], plan.final_flops)
    hi, lo = int(np.argmax(average)), int(np.argmin(average))
    summary = (
        f"{state['step']} DRO steps, weights {average[lo]:.3f} ({names[lo]}) .. "
        f"{average[hi]:.3f} ({names[hi]}); reference + proxy = {cost['flops_fraction']:.1%} "
        f"of the final training's FLOPs"
    )
    present = state["loss"]["trace"]["present"].numpy()
    return {
        "rows": int(len(labels)),
        "classes": k,
        "steps": state["step"],
        "num_updates": int(state["loss"]["group_dro"]["num_updates"]),
        "eta": rw.eta,
        "smoothing": rw.smoothing,
        "initial_excess": initial,
        "class_coverage": float(present.mean()) if present.size else None,  # per global batch
        "dro_plan": plan.to_dict(),
        "class_weights": average.tolist(),
        "class_names": names,
        "final_loss": metrics.get("loss"),
        "resumed_at": state["resumed_at"],
        "inputs": inputs.used,
        **cost,
        "train_wall_seconds": round(state["wall"], 3),
        "summary": summary,
    }


def write_weights(
    store: RunStore, state: dict[str, Any], names: list[str], eta: float, smoothing: float
) -> np.ndarray:
    """class_weights.json, trace.parquet and the two plots; returns the averaged weights."""
    group, trace = state["loss"]["group_dro"], state["loss"]["trace"]
    k = len(names)
    average = group["average"].numpy().astype(np.float64)
    average = average / average.sum()
    current = group["weights"].numpy().astype(np.float64)
    store.write_json(
        {
            "weights": {str(c): float(average[c]) for c in range(k)},
            "names": {str(c): names[c] for c in range(k)},
            "final_weights": {str(c): float(current[c]) for c in range(k)},
            "last_excess": {str(c): float(group["excess"][c]) for c in range(k)},
            "method": "doremi-group-dro",
            "eta": eta,
            "smoothing": smoothing,
            "steps": state["step"],
            "num_updates": int(group["num_updates"]),
        },
        *CLASS_WEIGHTS,
    )
    sink = pa.BufferOutputStream()
    pq.write_table(trace_table(trace, names), sink)
    store.write_bytes(sink.getvalue().to_pybytes(), OUT, TRACE)
    png = weights_over_steps_png(
        trace["step"].numpy(), trace["weight"].numpy(), trace["average"].numpy(), names
    )
    store.write_bytes(png, OUT, PLOT_STEPS)
    store.write_bytes(final_weights_png(average, names), OUT, PLOT_BARS)
    return average


def search_cost(
    pcfg: Config,
    store: RunStore,
    state: dict[str, Any],
    reference: dict[str, Any],
    final_flops: float,
) -> dict[str, Any]:
    """Reference + proxy FLOPs and their share of the final training (manifest fields)."""
    steps, batch = state["step"], pcfg.train.batch_size
    micro = batch // (max(1, pcfg.train.num_workers) * pcfg.train.grad_accum)
    cost = dro_cost(
        int(reference.get("flops") or 0),
        state["flops_per_step"],
        steps,
        reference_forward_flops(store, micro),
        batch // micro,
    )
    return {
        "flops": cost.parts(),
        "search_flops": cost.total,
        "train_flops_estimate": final_flops,
        "flops_fraction": cost_fraction(cost.total, final_flops),
        "reference_pretrained": reference.get("source") == "pretrained",
    }


def initial_excess(pcfg: Config, rows: Any, pixels: bool) -> float:
    """The zero predictor's loss for the prediction type (DoReMi starts every domain at the
    loss of a uniform predictor), with E[x0^2] from up to 512 rows for v-prediction."""
    from dedt_ray.diffusion.core import zero_prediction_loss
    from dedt_ray.diffusion.models import build_noise_scheduler

    moment = 1.0
    if pcfg.model.prediction_type == "v_prediction":
        x = np.concatenate(
            [b["x"] for b in rows.iter_batches(batch_size=512, batch_format="numpy")][:1]
        )
        x = x.astype(np.float64) / 127.5 - 1.0 if pixels else x.astype(np.float64)
        moment = float(np.mean(x**2))
    return zero_prediction_loss(build_noise_scheduler(pcfg.model), pcfg.train.min_snr_gamma, moment)
