"""Stage `train`: the final diffusion model on the selected (and reweighted) rows.

Reads the upstream artifacts the pipeline gives it (`select`'s kept rows, `reweight`'s class
weights, `latents`), trains with the trainer library (`dedt_ray.diffusion.trainer`, Ray Train
V2, DDP over `train.num_workers`), then exports the EMA model to `<run>/train/model`
(diffusers layout) and the metrics history to `<run>/train/metrics.parquet`. A crashed run
resumes from its last checkpoint when rerun with the same config; after success the
checkpoints move to `<run>/train/checkpoints`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from dedt_ray.artifacts import (
    TrainingInputs,
    class_weights_for,
    export_info,
    read_inputs,
)
from dedt_ray.artifacts import model_dir as export_dir
from dedt_ray.config import Config
from dedt_ray.diffusion.card import table, update_card
from dedt_ray.diffusion.job import CurveHook
from dedt_ray.diffusion.trainer import (
    budget_steps,
    export_model,
    finish_curve,
    fit,
    keep_checkpoints,
    make_job,
    model_spec,
    resume_key,
    run_summary,
    training_rows,
    with_train,
    write_history,
)
from dedt_ray.stages import StageContext
from dedt_ray.store import RunStore

log = logging.getLogger("dedt_ray")
OUT = "train"


def stage1_config(cfg: Config, budget: int) -> Config:
    """With TDC on, stage 1 trains `tdc.stage1_fraction` of the single model's budget, so TDC's
    stage 1 + search + stage 2 stay within it (an epoch budget shrinks alike)."""
    if not cfg.tdc.enabled:
        return cfg
    epochs = cfg.train.epochs * cfg.tdc.stage1_fraction if cfg.train.epochs else None
    return with_train(cfg, steps=cfg.tdc.stage1_steps(budget), epochs=epochs)


def infobatch_summary(state: dict[str, Any], cfg: Config) -> dict[str, Any] | None:
    """What InfoBatch pruned (samples not trained in their epoch, summed over epochs)."""
    if not cfg.train.infobatch.enabled:
        return None
    stream = state["stream"]
    return {
        "pruned_samples": int(stream["pruned_total"]),
        "epochs": float(stream["epoch"]),
        "ratio": cfg.train.infobatch.ratio,
        "anneal": cfg.train.infobatch.anneal,
    }


def upstream_flops(manifests: dict[str, dict[str, Any]]) -> float:
    """Compute spent before this run that the curve counts as an offset: the reweight stage's
    reference + proxy (selection's embedding is not counted: it is a forward pass of a
    frozen encoder, reported by the embed stage)."""
    return float(manifests.get("reweight", {}).get("search_flops") or 0)


def start_curve(
    cfg: Config, store: RunStore, ctx: StageContext, spec: Any, key: str, manifests: dict
) -> CurveHook | None:
    """The curve scorer of this run when `train.eval_every` is set."""
    if cfg.train.eval_every is None:
        return None
    if ctx.curve_scorer is None:
        raise RuntimeError("train.eval_every needs a curve scorer: run the stage via the pipeline")
    classes = list(range(spec.num_classes)) if spec.num_classes > 0 else None
    scorer = ctx.curve_scorer(cfg, store, spec.to_dict(), classes, f"{OUT}-{key}")
    return CurveHook(
        scorer, cfg.train.eval_every, cfg.train.until == "converged",
        flops_offset=upstream_flops(manifests),
    )  # fmt: skip


def run(cfg: Config, store: RunStore, ctx: StageContext) -> dict[str, Any]:
    """Stage entry point: train on the selected (and reweighted) rows, export, summarise."""
    started = time.time()
    inputs = read_inputs(store, ctx.inputs)
    rows, labels, classes, data = training_rows(cfg, store, inputs)
    budget = budget_steps(cfg, len(labels))
    cfg = stage1_config(cfg, budget)
    class_weights = class_weights_for(inputs.class_weights, labels, classes)
    spec = model_spec(cfg, labels, classes, data)
    key = resume_key(cfg, inputs.used)
    log.info(
        "train: %d rows (%s), %s, %d steps of batch %d %s",
        len(labels),
        "selected subset" if inputs.selection is not None else "all source rows",
        "class weights " + cfg.train.class_weighting if class_weights is not None
        else "no class weights",
        budget_steps(cfg, len(labels)), cfg.train.batch_size,
        f"on {n} worker(s)" if (n := cfg.train.num_workers) else "in-process",
    )  # fmt: skip
    curve_started = time.perf_counter()
    curve = start_curve(cfg, store, ctx, spec, key, inputs.manifests)
    curve_start_s = time.perf_counter() - curve_started
    job = make_job(cfg, spec, labels, class_weights, key, curve=curve)
    metrics, state = fit(cfg, store, job, rows, OUT, ctx.train_callbacks)
    curve_info = finish_curve(store, curve, OUT, state.get("curve_steps") or [])
    if curve_info is not None:
        curve_info["start_seconds"] = round(curve_start_s, 3)
    model_dir = export_model(cfg, store, state, spec, classes, OUT)
    update_card(
        store, export_dir(OUT), card_sections(cfg, inputs, labels, class_weights, classes),
        export_info(store, export_dir(OUT)),
    )  # fmt: skip
    write_history(store, state["history"], OUT)
    keep_checkpoints(store, OUT, key)
    store.write_json(
        {"key": key, "spec": spec.to_dict(), "classes": classes, "inputs": inputs.used},
        OUT,
        "run.json",
    )
    done = run_summary(state, metrics)
    search = inputs.manifests.get("reweight", {}).get("search_flops")  # reference + proxy
    ips = state["images_seen"] / state["wall"] if state["wall"] > 0 else 0.0
    counts = np.bincount(labels[labels >= 0]).tolist() if (labels >= 0).any() else []
    summary = (
        f"{done['steps']} steps on {len(labels)} rows, loss "
        f"{metrics.get('loss', float('nan')):.4f}, {ips:.0f} img/s, {done['flops']:.3g} FLOPs"
    )
    if state.get("stopped"):
        summary += f"; stopped early, {state['stopped']}"
    elif cfg.train.until == "converged":
        summary += f"; reached its step ceiling ({done['steps']}) still improving"
    return {
        "rows": int(len(labels)),
        "class_counts": counts,
        **done,
        "images_per_s": round(ips, 2),
        "shard_rows": metrics.get("shard_rows"),
        "inputs": inputs.used,
        "class_weights": class_weights.tolist() if class_weights is not None else None,
        "class_weighting": cfg.train.class_weighting,
        "budget_steps": budget,  # the single model's budget in steps (TDC: stage 1 + 2 within)
        "infobatch": infobatch_summary(state, cfg),
        "reweight_flops_fraction": search / done["flops"]
        if search and done["flops"] and class_weights is not None
        else None,
        "model": store.uri(model_dir),
        "spec": spec.to_dict(),
        "stopped": state.get("stopped"),
        "curve": curve_info,
        "setup_seconds": round(time.time() - started - state["wall"], 3),
        "summary": summary,
    }


def card_sections(
    cfg: Config,
    inputs: TrainingInputs,
    labels: np.ndarray,
    class_weights: np.ndarray | None,
    classes: list[str] | None,
) -> dict[str, str]:
    """The model card's data selection and class weights sections."""
    select = inputs.manifests.get("select")
    if select is not None:
        text = (
            f"Trained on {len(labels)} of {select.get('rows')} images: the `select` stage "
            f"kept {select.get('keep_ratio', 0):.0%} of every class by the "
            f"`{select.get('criterion')}` criterion in `{select.get('encoder')}` embedding space."
        )
    else:
        text = f"Trained on all {len(labels)} source images (no selection)."
    sections = {"Data selection": f"{text} Data: `{cfg.data.source}`."}
    if class_weights is not None:
        names = classes or [str(i) for i in range(len(class_weights))]
        how = (
            "sampling probabilities"
            if cfg.train.class_weighting == "sampling"
            else ("loss multipliers")
        )
        rows = [(str(n), float(w)) for n, w in zip(names, class_weights, strict=False)]
        sections["Class weights"] = (
            f"Group DRO (DoReMi) class weights from the `reweight` stage, used as {how}:\n\n"
            + table(rows, ("class", "weight"))
        )
    return sections
