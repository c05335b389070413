"""Stage `tdc`: timestep divide-and-conquer on top of the `train` stage's model.

Stage 1 is the `train` stage's exported (EMA) model, trained on all timesteps. The stage then
groups the timesteps by SNR, gives each group a FLOPs budget, decides each group's pruning with
a proxy (an Optuna study, or an LLM) scored by a short fine-tune on the group's timesteps, and
fine-tunes each group's pruned model on its timesteps only (stage 2: the trainer library's
``fit`` with ``t_range`` and a ``PrunedModel`` source). Outputs:

- ``<run>/tdc/model/``: the routed export (``save_export`` layout; ``unet/`` is a
  ``RoutedUNet`` folder, which ``load_export`` finds through model_index.json);
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
``train.num_workers=0``). On an object-store run directory the local files (the train stage's
export, the Optuna studies, the pruned and routed models) go through temporary folders
(``RunStore.fetched`` / ``staged``); stage-2 workers read the pruned models by URI.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dedt_ray.artifacts import class_weights_for, model_dir, read_inputs
from dedt_ray.config import Config
from dedt_ray.stages import StageContext
from dedt_ray.store import RunStore

log = logging.getLogger("dedt_ray")

OUT = "tdc"
BASE = model_dir("train")
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


@contextlib.contextmanager
def proxy_bank(cfg: Config, store: RunStore, g: int, depends_on: dict[str, Any]) -> Iterator[str]:
    """Group ``g``'s memory bank, ``<run>/_tdc_proxy/g<g>-<key>.db`` with ``key`` the hash of
    ``depends_on``, as a local SQLite path (a copy, uploaded after the block, on an object
    store); started afresh when ``tdc.resume_search`` is false."""
    from dedt_ray.config import hash_json

    name = f"g{g}-{hash_json(depends_on)[:16]}.db"
    with store.staged(BANK) as folder:
        path = os.path.join(folder, name)
        if not cfg.tdc.resume_search and os.path.exists(path):
            os.remove(path)
        elif cfg.tdc.resume_search and not store.is_local and store.exists(BANK, name):
            with open(path, "wb") as f:
                f.write(store.read_bytes(BANK, name))
        yield path


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


def stage2_config(cfg: Config, steps: int, rows: int) -> Config:
    """The train config of a group's fine-tune: `steps` steps at ``tdc.finetune_lr`` (default
    ``train.lr``); with InfoBatch, the epochs those steps make over `rows`."""
    from dedt_ray.diffusion.trainer import with_train

    tc = cfg.train
    return with_train(
        cfg,
        steps=steps,
        epochs=steps * tc.batch_size / rows if tc.infobatch.enabled else None,
        lr=cfg.tdc.finetune_lr or cfg.train.lr,
        checkpoint_every=min(cfg.train.checkpoint_every, steps),
    )


def plan_stage2(
    cfg: Config, store: RunStore, p: Plan, per_group: list[dict[str, Any]], train: dict[str, Any]
) -> tuple[int, str]:
    """Stage-2 steps per group: what the single model's budget (train.steps' FLOPs) leaves
    after stage 1 and the search, or ``tdc.finetune_steps`` (with a warning when that breaks
    the budget). Returns (steps, how)."""
    from dedt_ray.diffusion.trainer import step_flops
    from dedt_ray.tdc.budget import stage2_steps
    from dedt_ray.tdc.pruning import PrunedModel

    group_flops = [
        step_flops(PrunedModel(pruned_dir(store, g)).build(cfg.model, p.spec), cfg, p.spec)
        for g in range(len(p.groups))
    ]
    baseline = train.get("budget_steps", cfg.train.steps) * train["flops_per_step"]
    search = sum(r["search_flops"] for r in per_group)
    fits = stage2_steps(baseline, train["flops"], search, group_flops)
    if cfg.tdc.finetune_steps is not None:
        if cfg.tdc.finetune_steps > fits:
            log.warning(
                "tdc: tdc.finetune_steps=%d breaks the single model's budget (%d steps per "
                "group fit after stage 1 and the search)", cfg.tdc.finetune_steps, fits,
            )  # fmt: skip
        return cfg.tdc.finetune_steps, "tdc.finetune_steps"
    if fits < 1:
        raise RuntimeError(
            f"tdc: stage 1 ({train['flops']:.3g} FLOPs) and the pruning search ({search:.3g}) "
            f"leave no budget for stage 2 within train.steps' {baseline:.3g} FLOPs; lower "
            f"tdc.stage1_fraction ({cfg.tdc.stage1_fraction}) or tdc.rounds, or set "
            f"tdc.finetune_steps"
        )
    return fits, "budget"


def pruned_parts(g: int) -> tuple[str, ...]:
    """Where group `g`'s chosen pruned model is saved before stage 2."""
    return (OUT, "pruned", f"group_{g:02d}")


def pruned_dir(store: RunStore, g: int) -> str:
    """Group `g`'s pruned model as a path or URI any node reads (``PrunedModel``'s path)."""
    return store.uri(store.path(*pruned_parts(g)))


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


# -- the stage, step by step ---------------------------------------------------------------
@dataclass
class Plan:
    """Stage 1's model, the timestep groups with their budgets, and the training data."""

    base: torch.nn.Module
    noise_scheduler: Any
    vae: Any
    info: dict[str, Any]
    spec: Any  # ModelSpec of the train stage
    groups: list[tuple[int, int]]
    budgets: list[float]
    described: list[dict[str, Any]]
    base_fwd: int


def plan(cfg: Config, store: RunStore) -> Plan:
    """Load the train stage's export, group the timesteps and give each group its budget."""
    from dedt_ray.diffusion.export import load_export
    from dedt_ray.diffusion.models import ModelSpec
    from dedt_ray.tdc.budget import group_budgets, model_flops
    from dedt_ray.tdc.grouping import describe_groups, group_timesteps

    tc = cfg.tdc
    with store.fetched(*BASE) as folder:
        base, noise_scheduler, vae, info = load_export(folder)
    base.requires_grad_(True)
    spec_dict = store.read_json("train", "run.json")["spec"]
    spec = ModelSpec(**{k: v for k, v in spec_dict.items() if k != "null_class"})
    groups = group_timesteps(noise_scheduler, tc.n_groups, tc.rule, tc.boundaries, tc.boundary_unit)
    described = describe_groups(noise_scheduler, groups)
    base_fwd = model_flops(base)
    budgets = group_budgets(tc.n_groups, tc.k, float(base_fwd), tc.smallest)
    for row, budget in zip(described, budgets, strict=True):
        row["budget_flops"] = int(budget)
        row["budget_fraction"] = budget / base_fwd
    log.info("tdc: groups %s", [(r["t_lo"], r["t_hi"], r["size"]) for r in described])
    return Plan(base, noise_scheduler, vae, info, spec, groups, budgets, described, base_fwd)


@dataclass
class SearchData:
    """The training images of the pruning search: Taylor, fine-tune and held-out parts."""

    data: Any  # Batch of every drawn image
    n_taylor: int
    n_tune: int
    heldout: Any  # Batch: the last n_held images

    @property
    def n_held(self) -> int:
        return self.heldout.images.shape[0]


def search_data(cfg: Config, rows: Any, spec: Any) -> SearchData:
    """Draw the search's images and split them (`proxy.search_images`; a warning if short)."""
    from dedt_ray.tdc.proxy import search_images

    tc = cfg.tdc
    wanted = max(tc.taylor_images, tc.score_images) + tc.score_heldout
    data = score_batch(rows, wanted, cfg.seed, not spec.latent, spec.num_classes > 0)
    n = data.images.shape[0]
    n_taylor, n_tune, n_held = search_images(n, tc.taylor_images, tc.score_images, tc.score_heldout)
    if n < wanted:
        log.warning(
            "tdc: %d training images for %d wanted; the search uses %d for Taylor, "
            "%d to fine-tune, %d held out", n, wanted, n_taylor, n_tune, n_held,
        )  # fmt: skip
    return SearchData(data, n_taylor, n_tune, data.take(slice(n - n_held, n)))


def search_group(
    cfg: Config, store: RunStore, ctx: StageContext, p: Plan, g: int, sd: SearchData
) -> tuple[dict, Any, list, int, int, int]:
    """Group `g`'s proxy rounds (continuing its memory bank). (ratios, pruned model, history,
    search FLOPs, Taylor pairs, rounds reused)"""
    from dedt_ray.tdc.budget import search_flops
    from dedt_ray.tdc.proxy import decide_group, denoising_score
    from dedt_ray.tdc.pruning import UNetPruner

    tc, (lo, hi) = cfg.tdc, p.groups[g]
    pruner = UNetPruner.from_denoising(
        p.base, p.noise_scheduler, sd.data.take(slice(0, sd.n_taylor)), (lo, hi),
        tc.taylor_timesteps, seed=cfg.seed, threshold=tc.taylor_threshold,
    )  # fmt: skip
    depends_on = {
        "inputs": ctx.inputs, "seed": cfg.seed, "t_range": [lo, hi], "budget": int(p.budgets[g]),
        "lr": cfg.train.lr, "search": [sd.n_taylor, sd.n_tune, sd.n_held, tc.taylor_timesteps,
                                       tc.taylor_threshold, tc.score_steps],
    }  # fmt: skip

    def score(model: torch.nn.Module) -> float:
        return denoising_score(
            model, p.noise_scheduler, sd.data.take(slice(0, sd.n_tune)), (lo, hi),
            tc.score_steps, cfg.train.lr * 0.1, cfg.seed, sd.heldout, SCORE_BATCH,
        )  # fmt: skip

    with proxy_bank(cfg, store, g, depends_on) as db:
        proxy = make_proxy(cfg, pruner, p.described[g], p.budgets[g], db)
        reused = min(len(proxy.memory_bank()), tc.rounds)
        ratios, pruned, history = decide_group(
            p.base, (lo, hi), p.budgets[g], proxy, tc.rounds, score, pruner=pruner,
            seed=cfg.seed,
        )  # fmt: skip
    search = search_flops(
        p.base_fwd, pruner.taylor_pairs, [r.flops for r in history], tc.score_steps,
        min(SCORE_BATCH, sd.n_tune), sd.n_held,
    )  # fmt: skip
    return ratios, pruned, history, search, pruner.taylor_pairs, reused


def decide(
    cfg: Config, store: RunStore, ctx: StageContext, p: Plan, g: int, sd: SearchData
) -> tuple[dict, list[dict]]:
    """Group `g`'s pruning decision (the full-size group keeps the base model); saves the
    chosen model to `<run>/tdc/pruned/group_<g>`. Returns (manifest row, its rounds)."""
    from dedt_ray.tdc.budget import model_flops
    from dedt_ray.tdc.pruning import save_pruned

    (lo, hi), t0 = p.groups[g], time.time()
    if p.budgets[g] >= p.base_fwd:  # the full-size group: the base model, nothing to search
        ratios, pruned, history, search, pairs, reused = {}, copy.deepcopy(p.base), [], 0, 0, 0
        best = None
    else:
        ratios, pruned, history, search, pairs, reused = search_group(cfg, store, ctx, p, g, sd)
        best = min(r.score for r in history if r.score is not None)
    with store.staged(*pruned_parts(g)) as folder:
        save_pruned(pruned, folder)
    pruned_fwd = model_flops(pruned)
    log.info(
        "tdc: group %d [%d, %d): %d rounds (%d from the memory bank), best score %s at "
        "%.1f%% of the base FLOPs; search %.3g FLOPs in %.1f s",
        g, lo, hi, len(history), reused, best, 100 * pruned_fwd / p.base_fwd, search,
        time.time() - t0,
    )  # fmt: skip
    row = {
        **p.described[g],
        "ratios": ratios,
        "flops_per_image": pruned_fwd,
        "flops_fraction": pruned_fwd / p.base_fwd,
        "best_score": best,
        "rounds": len(history),
        "rounds_reused": reused,
        "taylor_pairs": pairs,
        "search_images": {"taylor": sd.n_taylor, "finetune": sd.n_tune, "heldout": sd.n_held},
        "search_flops": search,
        "search_seconds": round(time.time() - t0, 3),
    }
    return row, [{"group": g, **r.to_dict()} for r in history]


def finetune_all(
    cfg: Config, store: RunStore, ctx: StageContext, p: Plan, rows: Any, labels: Any,
    class_weights: Any, per_group: list[dict[str, Any]], steps: int, curve: Any = None,
) -> tuple[list[torch.nn.Module], int]:  # fmt: skip
    """Stage 2: each group's pruned model fine-tuned on its timesteps for `steps` steps, as
    many at once as the cluster holds; adds the stage-2 fields to each group's row.
    (models, runs at once)"""
    from dedt_ray.diffusion.trainer import ema_model, fit, make_job, ray_run_name, resume_key
    from dedt_ray.tdc.pruning import PrunedModel

    cfg2, parallel = stage2_config(cfg, steps, len(labels)), stage2_parallelism(cfg, len(p.groups))
    if parallel > 1 and cfg.train.threads_per_worker is None:  # runs share the node's cores
        threads = max(1, int(cfg.train.cpus_per_worker))
        cfg2 = cfg2.model_copy(
            update={"train": cfg2.train.model_copy(update={"threads_per_worker": threads})}
        )
    log.info("tdc: stage 2, %d group fine-tunes, %d at a time", len(p.groups), parallel)

    def finetune(g: int) -> torch.nn.Module:
        source = PrunedModel(pruned_dir(store, g))
        key = resume_key(
            cfg2, ctx.inputs, source, tdc_group=g, t_range=list(p.groups[g]),
            ratios=per_group[g]["ratios"], tdc=cfg.tdc.model_dump(mode="json"),
        )  # fmt: skip
        t0 = time.time()
        hook = dataclasses.replace(curve, key=g) if curve is not None else None
        job = make_job(
            cfg2, p.spec, labels, class_weights, key, source, t_range=p.groups[g], curve=hook
        )
        metrics, state = fit(cfg2, store, job, rows, f"{OUT}-g{g}")
        ray_dir = ("_ray", ray_run_name(f"{OUT}-g{g}", key))
        if store.exists(*ray_dir):
            store.fs.delete_dir(store.path(*ray_dir))
        per_group[g].update(
            stage2_steps=state["step"],
            curve_steps=state.get("curve_steps") or [],
            stage2_flops=int(state["flops_per_step"] * state["step"]),
            stage2_loss=metrics.get("loss"),
            stage2_started=t0,
            stage2_seconds=round(time.time() - t0, 3),
        )
        return ema_model(source, cfg2, p.spec, state).eval()

    with ThreadPoolExecutor(parallel, thread_name_prefix="tdc-stage2") as pool:
        models = list(pool.map(finetune, range(len(p.groups))))  # Train V2 fit runs in threads
    return models, parallel


def training_offset(train: dict[str, Any], per_group: list[dict[str, Any]]) -> float:
    """What stage 2's curve starts from: stage 1's FLOPs plus the pruning search."""
    return float(train["flops"]) + sum(r["search_flops"] for r in per_group)


def start_curve(cfg: Config, store: RunStore, ctx: StageContext, p: Plan, offset: float) -> Any:
    """Stage 2's curve (train.eval_every): the routed model, scored once every group has
    reached a step, at stage 1 + search + every group's FLOPs so far."""
    from dedt_ray.diffusion.job import CurveHook
    from dedt_ray.tdc.routing import RoutedUNet

    if cfg.train.eval_every is None or ctx.curve_scorer is None:
        return None
    classes = list(range(p.spec.num_classes)) if p.spec.num_classes > 0 else None
    scorer = ctx.curve_scorer(
        cfg, store, p.spec.to_dict(), classes, f"{OUT}-stage2", parts=len(p.groups),
        assemble=functools.partial(RoutedUNet, groups=p.groups),
    )  # fmt: skip
    return CurveHook(scorer, cfg.train.eval_every, flops_offset=offset)


def export_routed(
    cfg: Config, store: RunStore, p: Plan, models: list[torch.nn.Module], flops: int, steps: int
) -> str:
    """The routed model in the export layout at `<run>/tdc/model`."""
    from dedt_ray.diffusion.export import save_export
    from dedt_ray.tdc.routing import RoutedUNet, scheduler_config

    routed = RoutedUNet(models, p.groups, scheduler_config(p.noise_scheduler))
    info = {
        **p.info,
        "tdc": True,
        "groups": [list(g) for g in p.groups],
        "steps": p.info.get("steps", 0) + steps,
        "flops": flops,
    }
    with store.staged(*model_dir(OUT)) as folder:
        save_export(folder, routed, p.noise_scheduler, info, p.vae)
    return store.path(*model_dir(OUT))


def run(cfg: Config, store: RunStore, ctx: StageContext) -> dict[str, Any]:
    """Stage entry point (see the module docstring)."""
    from dedt_ray.diffusion.models import sampling_scheduler
    from dedt_ray.diffusion.trainer import finish_curve, training_rows
    from dedt_ray.tdc.budget import sampling_totals, training_totals
    from dedt_ray.tdc.routing import RoutedUNet, sampling_flops

    started, tc = time.time(), cfg.tdc
    p = plan(cfg, store)
    inputs = read_inputs(store, ctx.inputs)
    rows, labels, classes, _ = training_rows(cfg, store, inputs)
    class_weights = class_weights_for(inputs.class_weights, labels, classes)
    sd = search_data(cfg, rows, p.spec)
    store.clear(OUT)
    decided = [decide(cfg, store, ctx, p, g, sd) for g in range(len(p.groups))]
    per_group = [row for row, _ in decided]
    store.write_json([r for _, rounds in decided for r in rounds], OUT, "rounds.json")
    train = inputs.manifests["train"]
    steps2, rule = plan_stage2(cfg, store, p, per_group, train)
    log.info("tdc: stage 2, %d steps per group (%s)", steps2, rule)
    curve = start_curve(cfg, store, ctx, p, training_offset(train, per_group))
    models, parallel = finetune_all(
        cfg, store, ctx, p, rows, labels, class_weights, per_group, steps2, curve
    )
    curve_info = finish_curve(store, curve, OUT, per_group[0].pop("curve_steps", []))
    for row in per_group[1:]:
        row.pop("curve_steps", None)
    training = training_totals(
        int(train["flops"]),
        sum(r["search_flops"] for r in per_group),
        sum(r["stage2_flops"] for r in per_group),
        int(train.get("budget_steps", cfg.train.steps) * train["flops_per_step"]),
    )
    dest = export_routed(
        cfg, store, p, models, training["total_flops"], sum(r["stage2_steps"] for r in per_group)
    )
    ev = cfg.evaluate
    sampler = sampling_scheduler(p.noise_scheduler, ev.scheduler)
    routed = RoutedUNet(models, p.groups)
    sampling = {
        "scheduler": ev.scheduler,
        "num_inference_steps": ev.num_inference_steps,
        **sampling_totals(
            sampling_flops(routed, sampler, ev.num_inference_steps),
            p.base_fwd,
            len(_timesteps(sampler, ev.num_inference_steps)),
        ),
    }
    summary = (
        f"{len(p.groups)} groups {[list(g) for g in p.groups]}, pruned to "
        f"{[round(r['flops_fraction'], 3) for r in per_group]} of the base; training FLOPs "
        f"{training['total_flops']:.3g} ({training['ratio_to_baseline']:.2f}x the single-model "
        f"{training['baseline_flops']:.3g}); sampling {sampling['routed_flops_per_image']:.3g} "
        f"FLOPs/image ({sampling['ratio']:.2f}x)"
    )
    log.info("tdc: %s", summary)
    return {
        "rows": len(p.groups),
        "groups": per_group,
        "stage2_parallel": parallel,
        "stage2_steps": steps2,
        "stage2_steps_rule": rule,  # "budget": what train.steps' FLOPs leave; or explicit
        "base_flops_per_image": p.base_fwd,
        "training_flops": training,
        "sampling_flops": sampling,
        "proxy": tc.proxy,
        "curve": curve_info,
        "model": store.uri(dest),
        "seconds_total": round(time.time() - started, 3),
        "summary": summary,
    }


def _timesteps(scheduler: Any, steps: int) -> list[int]:
    """The inference timesteps of a fresh copy of ``scheduler``."""
    fresh = type(scheduler).from_config(scheduler.config)
    fresh.set_timesteps(steps)
    return fresh.timesteps.tolist()
