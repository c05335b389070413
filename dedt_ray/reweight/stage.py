"""Stage `reweight`: DoReMi class weights from a proxy DM trained by Group DRO on Ray Train.

The proxy (same architecture as the final model, from scratch, uniform class sampling) trains
on the `select` subset for `reweight.steps` (default 3.5% of `train.steps`); the trainer's
`dro` hook (`dedt_ray.reweight.dro.DROLoss`) compares it with the frozen
`<run>/reference/model` on the same (x_t, t, noise) each step and updates the weights.

Artifacts in `<run>/reweight/`: class_weights.json (`{"weights": {"<label>": w}, ...}`,
what the train stage reads: the running average of the weights), trace.parquet (step, class,
name, weight, average, excess), weights_over_steps.png, class_weights.png, metrics.parquet
and checkpoints/. The manifest carries the compute of reference + proxy as a fraction of the
final training's estimated FLOPs.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dedt_ray.config import Config
from dedt_ray.diffusion.train import (
    _keep_checkpoints,
    fit,
    model_spec,
    resume_key,
    training_rows,
    write_history,
)
from dedt_ray.reweight.checks import check_reweight, stage_config
from dedt_ray.reweight.plots import final_weights_png, weights_over_steps_png
from dedt_ray.reweight.reference import MODEL, latents_input, subset_input, uniform_weights
from dedt_ray.store import RunStore

log = logging.getLogger("dedt_ray")
WEIGHTS = "class_weights.json"
TRACE = "trace.parquet"
PLOT_STEPS = "weights_over_steps.png"
PLOT_BARS = "class_weights.png"


def class_names(store: RunStore, classes: list[str] | None, k: int) -> list[str]:
    """Names from the dataset, else embed/classes.json, else the label numbers."""
    if not classes and store.exists("embed", "classes.json"):
        classes = store.read_json("embed", "classes.json").get("classes")
    if classes and len(classes) == k:
        return [str(c) for c in classes]
    return [str(i) for i in range(k)]


def reference_forward_flops(store: RunStore, rows: int) -> int:
    """FLOPs of one reference forward pass on `rows` samples (torch FlopCounterMode)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from dedt_ray.reweight.dro import load_reference_unet

    unet = load_reference_unet(store.uri(store.path(*MODEL)))
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
        }
    )


def _skip(reason: str) -> dict[str, Any]:
    log.warning("reweight: %s; no class weights written", reason)
    return {"skipped": reason, "steps": 0, "search_flops": 0, "summary": f"skipped: {reason}"}


def run(cfg: Config, store: RunStore) -> dict[str, Any]:
    """Stage entry point: train the proxy by Group DRO, write weights, trace and plots."""
    check_reweight(cfg)
    reference = store.manifest("reference")
    if reference is None:
        raise RuntimeError("reweight needs the reference stage first: `dedt-ray reference`")
    selection, used = subset_input(cfg, store)
    used.update(latents_input(cfg, store), reference=reference["output_id"])
    rows, labels, classes, data = training_rows(cfg, store, selection)
    if labels.min() < 0:
        return _skip("the data are unlabelled (one class)")
    spec = model_spec(cfg, labels, classes, data)
    k = len(classes) if classes else int(labels.max()) + 1
    if k < 2:
        return _skip("a single class")
    names = class_names(store, classes, k)
    ref_cfg = store.read_json(*MODEL, "unet", "config.json")
    embeds = ref_cfg.get("num_class_embeds")
    if embeds not in (None, k, k + 1):
        raise ValueError(f"the reference has {embeds} class embeddings; the data have {k} classes")

    pcfg = stage_config(cfg, "reweight")
    rw = cfg.reweight
    dro = {
        "reference": store.uri(store.path(*MODEL)),
        "num_classes": k,
        "eta": rw.eta,
        "smoothing": rw.smoothing,
    }
    key = resume_key(pcfg, used, extra={"stage": "reweight", "eta": rw.eta, "c": rw.smoothing})
    log.info(
        "reweight: proxy on %d rows (%s), %d classes, %d steps of batch %d, eta %g, c %g",
        len(labels), "subset" if selection is not None else "all rows", k,
        pcfg.train.steps, pcfg.train.batch_size, rw.eta, rw.smoothing,
    )  # fmt: skip
    weights0 = uniform_weights(labels, classes)
    metrics, state = fit(pcfg, store, rows, labels, spec, weights0, key, out="reweight", dro=dro)
    write_history(store, state["history"], out="reweight")
    _keep_checkpoints(store, key, "reweight")

    group, trace = state["dro"]["group_dro"], state["dro"]["trace"]
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
            "eta": rw.eta,
            "smoothing": rw.smoothing,
            "steps": state["step"],
            "num_updates": int(group["num_updates"]),
        },
        "reweight",
        WEIGHTS,
    )
    sink = pa.BufferOutputStream()
    pq.write_table(trace_table(trace, names), sink)
    store.write_bytes(sink.getvalue().to_pybytes(), "reweight", TRACE)
    steps_arr = trace["step"].numpy()
    store.write_bytes(
        weights_over_steps_png(steps_arr, trace["weight"].numpy(), trace["average"].numpy(), names),
        "reweight",
        PLOT_STEPS,
    )
    store.write_bytes(final_weights_png(average, names), "reweight", PLOT_BARS)

    # compute: reference training + proxy fwd/bwd + one reference forward per proxy sample
    steps, batch = state["step"], pcfg.train.batch_size
    proxy = state["flops_per_step"] * steps
    micro = batch // (max(1, pcfg.train.num_workers) * pcfg.train.grad_accum)
    ref_forward = reference_forward_flops(store, micro) * (batch // micro) * steps
    ref_train = int(reference.get("flops") or 0)
    search = ref_train + proxy + ref_forward
    train_estimate = cfg.train.steps * state["flops_per_step"] * cfg.train.batch_size / batch
    fraction = search / train_estimate if train_estimate else None
    hi, lo = int(np.argmax(average)), int(np.argmin(average))
    summary = (
        f"{steps} DRO steps, weights {average[lo]:.3f} ({names[lo]}) .. {average[hi]:.3f} "
        f"({names[hi]}); reference + proxy = {fraction:.1%} of the train stage's FLOPs"
    )
    return {
        "rows": int(len(labels)),
        "classes": k,
        "steps": steps,
        "num_updates": int(group["num_updates"]),
        "eta": rw.eta,
        "smoothing": rw.smoothing,
        "class_weights": average.tolist(),
        "class_names": names,
        "final_loss": metrics.get("loss"),
        "resumed_at": state["resumed_at"],
        "inputs": used,
        "flops": {
            "reference_training": ref_train,
            "proxy_training": proxy,
            "reference_forward": ref_forward,
        },
        "search_flops": search,
        "train_flops_estimate": train_estimate,
        "flops_fraction": fraction,
        "train_wall_seconds": round(state["wall"], 3),
        "summary": summary,
    }
