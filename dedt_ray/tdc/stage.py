"""Stage `tdc`: timestep divide-and-conquer on top of the `train` stage's model.

Stage 1 is the `train` stage's exported (EMA) model, trained on all timesteps. The stage then
groups the timesteps by SNR, gives each group a FLOPs budget, decides each group's pruning with
a proxy (Optuna study, or an LLM) scored by a short fine-tune on the group's timesteps, and
fine-tunes each group's pruned model on its timesteps only (stage 2, Ray Train ``fit`` with
``t_range`` and the pruned model as ``init_unet``). Outputs:

- ``<run>/tdc/model/``: the routed export (``save_routed`` folders + ``routing.json``, plus
  ``scheduler/`` and ``dedt_model.json``, so ``load_export`` returns a ``RoutedUNet``);
- ``<run>/tdc/rounds.json``: every proxy round the decisions used (group, round, proposer,
  ratios, FLOPs, score), memory-bank rounds included;
- ``<run>/tdc/pruned/group_<g>``: the chosen pruned models before stage 2;
- ``<run>/_tdc_proxy/g<g>-<key>.db``: each group's memory bank (the Optuna study), outside the
  stage folder so that a rerun continues it; ``key`` is what the scores depend on (the base
  model's output id, the group, its budget, the Taylor and scoring settings);
- the manifest: groups, budgets, training FLOPs (stage 1 + search + stage 2) next to the
  single-model baseline's, and sampling FLOPs per image next to the single model's.

The pruning decisions run in the driver, one group after another. Each stage-2 fine-tune is
its own Ray Train run (DDP over ``train.num_workers``); ``tdc.parallel_groups`` of them run at
once (default: as many as the free CPUs / GPUs hold; one at a time with
``train.num_workers=0``). The run directory must be local (``init_unet`` is a local path).
"""

from __future__ import annotations

import copy
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from dedt_ray.config import Config
from dedt_ray.store import RunStore

log = logging.getLogger("dedt_ray")

OUT = "tdc"
SCORE_BATCH = 16  # denoising_score's fine-tune batch
BANK = "_tdc_proxy"  # the groups' memory banks; not a stage folder, so no stage clears it


def score_batch(rows: Any, n: int, seed: int, pixels: bool, conditional: bool) -> Any:
    """Up to ``n`` training rows drawn at random (seeded) as a ``Batch`` in model units."""
    from dedt_ray.tdc.denoise import Batch

    total = rows.count()
    ds = rows.random_sample(min(1.0, 2.0 * n / max(1, total)), seed=seed) if total > n else rows
    xs, ys = [], []
    for batch in ds.iter_batches(batch_size=1024, batch_format="numpy"):
        xs.append(batch["x"])
        ys.append(batch["label"])
    x, y = np.concatenate(xs), np.concatenate(ys)
    order = np.random.default_rng(seed).permutation(len(y))[:n]
    x, y = x[order], y[order]
    images = torch.from_numpy(np.ascontiguousarray(x))
    if pixels:
        images = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    else:
        images = images.float()
    labels = torch.from_numpy(y.astype(np.int64)) if conditional else None
    return Batch(images.contiguous(), labels)


def proxy_bank(cfg: Config, store: RunStore, g: int, depends_on: dict[str, Any]) -> str:
    """Group ``g``'s memory bank, ``<run>/_tdc_proxy/g<g>-<key>.db`` with ``key`` the hash of
    ``depends_on``; deleted first when ``tdc.resume_search`` is false."""
    from dedt_ray.config import hash_json

    path = store.local_path(BANK, f"g{g}-{hash_json(depends_on)[:16]}.db")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not cfg.tdc.resume_search and os.path.exists(path):
        os.remove(path)
    return path


def make_proxy(cfg: Config, pruner: Any, group: dict[str, Any], budget: float, db: str) -> Any:
    """The configured proxy for one group (Optuna study persisted in ``db``)."""
    from dedt_ray.tdc.proxy import LLMProxy, OptunaProxy
    from dedt_ray.tdc.pruning import architecture_table

    optuna_proxy = OptunaProxy(
        pruner.blocks, db, seed=cfg.seed + group["group"], n_startup_trials=cfg.tdc.startup_rounds
    )
    if cfg.tdc.proxy == "optuna":
        return optuna_proxy
    return LLMProxy(
        architecture_table(pruner.model),
        budget / pruner.base_flops,
        group,
        optuna_proxy,
        base_url=cfg.tdc.llm_base_url,
        model=cfg.tdc.llm_model,
        api_key_env=cfg.tdc.llm_api_key_env,
    )


def stage2_config(cfg: Config) -> Config:
    """The train config of a group's fine-tune: ``tdc.finetune_steps`` steps at
    ``tdc.finetune_lr`` (default ``train.lr``)."""
    steps = cfg.tdc.finetune_steps
    train = cfg.train.model_copy(
        update={
            "steps": steps,
            "lr": cfg.tdc.finetune_lr or cfg.train.lr,
            "warmup_steps": min(cfg.train.warmup_steps, steps // 10),
            "checkpoint_every": min(cfg.train.checkpoint_every, steps),
        }
    )
    return cfg.model_copy(update={"train": train})


def stage2_parallelism(cfg: Config, n_groups: int) -> int:
    """How many stage-2 fine-tunes run at once: ``tdc.parallel_groups`` if set, else as many
    Ray Train runs as the cluster's free CPUs (one left for Ray Data) and GPUs hold.
    In-process training (``train.num_workers=0``) runs the groups one after another."""
    import ray

    from dedt_ray.runtime import cluster_gpus

    tc = cfg.train
    if cfg.tdc.parallel_groups is not None:
        return min(cfg.tdc.parallel_groups, n_groups)
    if tc.num_workers == 0:
        return 1
    free = ray.available_resources()
    use_gpu = tc.use_gpu if tc.use_gpu is not None else cluster_gpus() > 0
    fits = (free.get("CPU", 0.0) - 1.0) // (tc.num_workers * tc.cpus_per_worker)
    if use_gpu:
        fits = min(fits, free.get("GPU", 0.0) // tc.num_workers)
    return int(max(1, min(n_groups, fits)))


def finetuned_model(pruned_dir: str, state: dict[str, Any]) -> torch.nn.Module:
    """The pruned architecture with the stage-2 EMA weights."""
    from dedt_ray.tdc.pruning import load_pruned

    model = load_pruned(pruned_dir)
    model.load_state_dict(state["model"])
    for param, shadow in zip(model.parameters(), state["ema"]["shadow_params"], strict=True):
        param.data.copy_(shadow)
    return model.eval()


def run(cfg: Config, store: RunStore) -> dict[str, Any]:
    """Stage entry point (see the module docstring)."""
    from dedt_ray.diffusion.export import INFO, load_export
    from dedt_ray.diffusion.models import ModelSpec, sampling_scheduler
    from dedt_ray.diffusion.train import (
        fit,
        read_class_weights,
        resolve_inputs,
        resume_key,
        training_rows,
    )
    from dedt_ray.tdc.budget import group_budgets, model_flops, search_flops
    from dedt_ray.tdc.grouping import describe_groups, group_timesteps
    from dedt_ray.tdc.proxy import decide_group, denoising_score, search_images
    from dedt_ray.tdc.pruning import UNetPruner, save_pruned
    from dedt_ray.tdc.routing import RoutedUNet, sampling_flops, save_routed, scheduler_config

    started = time.time()
    tc = cfg.tdc
    train_manifest = store.manifest("train")
    base_dir = store.local_path("train", "model")
    base, noise_scheduler, vae, info = load_export(base_dir)
    base.requires_grad_(True)
    spec_dict = store.read_json("train", "run.json")["spec"]
    spec = ModelSpec(**{k: v for k, v in spec_dict.items() if k != "null_class"})
    conditional = spec.num_classes > 0

    # -- groups and budgets ----------------------------------------------------------------
    groups = group_timesteps(noise_scheduler, tc.n_groups, tc.rule, tc.boundaries, tc.boundary_unit)
    described = describe_groups(noise_scheduler, groups)
    base_fwd = model_flops(base)
    budgets = group_budgets(tc.n_groups, tc.k, float(base_fwd), tc.smallest)
    for row, budget in zip(described, budgets, strict=True):
        row["budget_flops"] = int(budget)
        row["budget_fraction"] = budget / base_fwd
    log.info("tdc: groups %s", [(r["t_lo"], r["t_hi"], r["size"]) for r in described])

    # -- data ------------------------------------------------------------------------------
    inputs = resolve_inputs(cfg, store)
    rows, labels, _, _ = training_rows(cfg, store, inputs.selection)
    class_weights = None
    if inputs.class_weights is not None:
        num_classes = spec.num_classes or int(labels.max()) + 1
        class_weights = read_class_weights(inputs.class_weights, num_classes)
    wanted = max(tc.taylor_images, tc.score_images) + tc.score_heldout
    data = score_batch(rows, wanted, cfg.seed, not spec.latent, conditional)
    n = data.images.shape[0]
    n_taylor, n_tune, n_held = search_images(n, tc.taylor_images, tc.score_images, tc.score_heldout)
    if n < wanted:
        log.warning(
            "tdc: %d training images for %d wanted; the search uses %d for Taylor, "
            "%d to fine-tune, %d held out", n, wanted, n_taylor, n_tune, n_held,
        )  # fmt: skip
    heldout = data.take(slice(n - n_held, n))

    # -- per group: proxy-based pruning decision (in the driver) ---------------------------
    cfg2 = stage2_config(cfg)
    store.clear(OUT)
    rounds: list[dict[str, Any]] = []
    per_group: list[dict[str, Any]] = []
    for g, (lo, hi) in enumerate(groups):
        t0 = time.time()
        if budgets[g] >= base_fwd:  # the full-size group: the base model, nothing to search
            ratios, pruned, history, search, best_score = {}, copy.deepcopy(base), [], 0, None
            reused = pairs = 0
        else:
            pruner = UNetPruner.from_denoising(
                base, noise_scheduler, data.take(slice(0, n_taylor)), (lo, hi),
                tc.taylor_timesteps, seed=cfg.seed, threshold=tc.taylor_threshold,
            )  # fmt: skip
            pairs = pruner.taylor_pairs
            depends_on = {
                "train": train_manifest["output_id"], "inputs": inputs.used, "seed": cfg.seed,
                "t_range": [lo, hi], "budget": int(budgets[g]), "lr": cfg.train.lr,
                "search": [n_taylor, n_tune, n_held, tc.taylor_timesteps, tc.taylor_threshold,
                           tc.score_steps],
            }  # fmt: skip
            db = proxy_bank(cfg, store, g, depends_on)
            proxy = make_proxy(cfg, pruner, described[g], budgets[g], db)
            reused = min(len(proxy.memory_bank()), tc.rounds)

            def score(model: torch.nn.Module, t_range: tuple[int, int] = (lo, hi)) -> float:
                return denoising_score(
                    model, noise_scheduler, data.take(slice(0, n_tune)), t_range,
                    tc.score_steps, cfg.train.lr * 0.1, cfg.seed, heldout, SCORE_BATCH,
                )  # fmt: skip

            ratios, pruned, history = decide_group(
                base, (lo, hi), budgets[g], proxy, tc.rounds, score, pruner=pruner, seed=cfg.seed
            )
            search = search_flops(
                base_fwd, pairs, [r.flops for r in history], tc.score_steps,
                min(SCORE_BATCH, n_tune), n_held,
            )  # fmt: skip
            best_score = min(r.score for r in history if r.score is not None)
        rounds += [{"group": g, **r.to_dict()} for r in history]
        save_pruned(pruned, store.local_path(OUT, "pruned", f"group_{g:02d}"))
        pruned_fwd = model_flops(pruned)
        log.info(
            "tdc: group %d [%d, %d): %d rounds (%d from the memory bank), best score %s at "
            "%.1f%% of the base FLOPs; search %.3g FLOPs in %.1f s",
            g, lo, hi, len(history), reused, best_score, 100 * pruned_fwd / base_fwd, search,
            time.time() - t0,
        )  # fmt: skip
        per_group.append(
            {
                **described[g],
                "ratios": ratios,
                "flops_per_image": pruned_fwd,
                "flops_fraction": pruned_fwd / base_fwd,
                "best_score": best_score,
                "rounds": len(history),
                "rounds_reused": reused,
                "taylor_pairs": pairs,
                "search_images": {"taylor": n_taylor, "finetune": n_tune, "heldout": n_held},
                "search_flops": search,
                "search_seconds": round(time.time() - t0, 3),
            }
        )
    store.write_json(rounds, OUT, "rounds.json")

    # -- stage 2: each group's fine-tune, as many at once as the cluster holds ---------------
    parallel = stage2_parallelism(cfg, len(groups))
    if parallel > 1 and cfg.train.threads_per_worker is None:  # runs share the node's cores
        threads = max(1, int(cfg.train.cpus_per_worker))
        cfg2 = cfg2.model_copy(
            update={"train": cfg2.train.model_copy(update={"threads_per_worker": threads})}
        )
    log.info("tdc: stage 2, %d group fine-tunes, %d at a time", len(groups), parallel)

    def finetune(g: int) -> tuple[torch.nn.Module, dict[str, Any]]:
        pruned_dir = store.local_path(OUT, "pruned", f"group_{g:02d}")
        extra = {
            "tdc_group": g,
            "t_range": list(groups[g]),
            "ratios": per_group[g]["ratios"],
            "train": train_manifest["output_id"],
            "tdc": tc.model_dump(mode="json"),
        }
        key = resume_key(cfg2, inputs.used, extra)
        t0 = time.time()
        metrics, state = fit(
            cfg2, store, rows, labels, spec, class_weights, key,
            out=f"tdc-g{g}", t_range=groups[g], init_unet=pruned_dir,
        )  # fmt: skip
        ray_dir = ("_ray", f"tdc-g{g}-{key}")
        if store.exists(*ray_dir):
            store.fs.delete_dir(store.path(*ray_dir))
        done = {
            "stage2_steps": state["step"],
            "stage2_flops": int(state["flops_per_step"] * state["step"]),
            "stage2_loss": metrics.get("loss"),
            "stage2_started": t0,
            "stage2_seconds": round(time.time() - t0, 3),
        }
        return finetuned_model(pruned_dir, state), done

    with ThreadPoolExecutor(parallel, thread_name_prefix="tdc-stage2") as pool:
        finished = list(pool.map(finetune, range(len(groups))))  # Train V2 fit runs in threads
    models = [model for model, _ in finished]
    for row, (_, done) in zip(per_group, finished, strict=True):
        row.update(done)

    # -- routed export ---------------------------------------------------------------------
    routed = RoutedUNet(models, groups, scheduler_config(noise_scheduler))
    steps = cfg.evaluate.num_inference_steps
    sampler = sampling_scheduler(noise_scheduler, cfg.evaluate.scheduler)
    routed_sampling = sampling_flops(routed, sampler, steps)
    single_sampling = base_fwd * len(_timesteps(sampler, steps))
    stage1 = int(train_manifest["flops"])
    baseline = int(cfg.train.steps * train_manifest["flops_per_step"])
    search_total = sum(r["search_flops"] for r in per_group)
    stage2_total = sum(r["stage2_flops"] for r in per_group)
    total = stage1 + search_total + stage2_total
    model_dir = store.local_path(OUT, "model")
    save_routed(routed, model_dir)
    noise_scheduler.save_pretrained(os.path.join(model_dir, "scheduler"))
    export_info = {
        **info,
        "tdc": True,
        "groups": [list(g) for g in groups],
        "steps": info.get("steps", 0) + sum(r["stage2_steps"] for r in per_group),
        "flops": total,
    }
    store.write_json(export_info, OUT, "model", INFO)
    if vae is not None:
        vae.save_pretrained(os.path.join(model_dir, "vae"), safe_serialization=True)

    training = {
        "stage1_flops": stage1,
        "search_flops": search_total,
        "stage2_flops": stage2_total,
        "total_flops": total,
        "baseline_flops": baseline,
        "ratio_to_baseline": total / baseline if baseline else None,
        "within_baseline": total <= baseline,
    }
    sampling = {
        "scheduler": cfg.evaluate.scheduler,
        "num_inference_steps": steps,
        "routed_flops_per_image": routed_sampling,
        "single_flops_per_image": int(single_sampling),
        "ratio": routed_sampling / single_sampling if single_sampling else None,
    }
    summary = (
        f"{len(groups)} groups {[list(g) for g in groups]}, pruned to "
        f"{[round(r['flops_fraction'], 3) for r in per_group]} of the base; training FLOPs "
        f"{total:.3g} ({training['ratio_to_baseline']:.2f}x the single-model {baseline:.3g}); "
        f"sampling {routed_sampling:.3g} FLOPs/image ({sampling['ratio']:.2f}x)"
    )
    log.info("tdc: %s", summary)
    return {
        "rows": len(groups),
        "groups": per_group,
        "stage2_parallel": parallel,
        "base_flops_per_image": base_fwd,
        "training_flops": training,
        "sampling_flops": sampling,
        "proxy": tc.proxy,
        "model": store.uri(model_dir),
        "seconds_total": round(time.time() - started, 3),
        "summary": summary,
    }


def _timesteps(scheduler: Any, steps: int) -> list[int]:
    """The inference timesteps of a fresh copy of ``scheduler``."""
    fresh = type(scheduler).from_config(scheduler.config)
    fresh.set_timesteps(steps)
    return fresh.timesteps.tolist()
