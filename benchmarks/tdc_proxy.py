"""The TDC pruning proxy: does it learn from its memory bank, and what does a group's search cost?

1. ``synthetic`` (no model, seconds): the best score after N rounds of ``OptunaProxy`` against N
   random proposals, over many seeds, on a known function of the per-block ratios built like
   the real search: the proposed ratios are a *shape*, scaled by one factor until the FLOPs
   meet the budget (FLOPs of a block fall with the square of its kept width), and the score
   is a sum of per-block sensitivities times the squared achieved ratio. Prints the mean best
   of each proposer, its ratio to random's and the share of seeds where it beats random.
   ``tests/test_tdc_proxy.py`` runs the same comparison at the defaults.
2. ``cost RUN_DIR`` (a run directory whose `train` stage has run): the real `tdc` stage on a
   copy of it, once per settings string (``--settings``, ``;``-separated override lists, e.g.
   the old defaults and the new), with one stage-2 step so that the search dominates; prints
   each searched group's search FLOPs and seconds and their ratios to the first settings.

    python benchmarks/tdc_proxy.py synthetic --rounds 4,6,8,10 --seeds 100
    python benchmarks/tdc_proxy.py cost /tmp/run --settings "tdc.rounds=4;"
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time

import numpy as np
import optuna

from dedt_ray.tdc.proxy import OptunaProxy, RoundRecord

BLOCKS = ("down.0", "down.1", "down.2", "mid", "up.0", "up.1", "up.2")
# Share of the model's FLOPs per block (the remaining 0.08 is not prunable) and the score's
# sensitivity to pruning each block: the outer blocks (image resolution) hurt most.
SHARES = np.array([0.08, 0.10, 0.12, 0.10, 0.22, 0.18, 0.12])
SENSITIVITY = np.array([3.0, 1.0, 0.5, 0.4, 0.6, 1.2, 4.0])
BUDGET, MAX_RATIO = 0.55, 0.9  # the noisy group's budget at k = 0.1, 2 groups


def _flops(achieved: np.ndarray) -> float:
    return 1.0 - SHARES.sum() + float((SHARES * (1.0 - achieved) ** 2).sum())


def fit_to_budget(shape: np.ndarray) -> np.ndarray | None:
    """The achieved ratios: ``shape`` times the factor that meets ``BUDGET`` (None: cannot)."""
    if shape.max() <= 0:
        return None
    lo, hi = 0.0, MAX_RATIO / shape[shape > 0].min()
    if _flops(np.minimum(MAX_RATIO, hi * shape)) > BUDGET:
        return None
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _flops(np.minimum(MAX_RATIO, mid * shape)) > BUDGET else (lo, mid)
    return np.minimum(MAX_RATIO, hi * shape)


def synthetic_score(ratios: dict[str, float]) -> float | None:
    """The score of proposed ratios (lower is better); None when the budget cannot be met."""
    achieved = fit_to_budget(np.array([ratios[b] for b in BLOCKS]))
    return None if achieved is None else float((SENSITIVITY * achieved**2).sum())


def best_of_optuna(rounds: int, seed: int, startup: int) -> float:
    """Best synthetic score after ``rounds`` rounds of an in-memory ``OptunaProxy``."""
    proxy = OptunaProxy(list(BLOCKS), seed=seed, n_startup_trials=startup)
    best = float("inf")
    for r in range(rounds):
        ratios = proxy.propose(r, []).ratios
        score = synthetic_score(ratios)
        proxy.record(RoundRecord(r, "optuna", ratios, ratios, 1, score))
        best = min(best, float("inf") if score is None else score)
    return best


def best_of_random(rounds: int, seed: int) -> float:
    """Best synthetic score of ``rounds`` uniform random proposals in [0, MAX_RATIO]."""
    proposals = np.random.default_rng(seed).uniform(0, MAX_RATIO, (rounds, len(BLOCKS)))
    scores = [synthetic_score(dict(zip(BLOCKS, p, strict=True))) for p in proposals]
    return min((s for s in scores if s is not None), default=float("inf"))


def synthetic(rounds: list[int], seeds: int, startups: list[int]) -> None:
    """Print mean best after N rounds per proposer, against random proposals."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for n in rounds:
        rand = np.array([best_of_random(n, s) for s in range(seeds)])
        line = f"N={n:2d}  random {rand.mean():.4f}"
        for k in (k for k in startups if k <= n):
            t0 = time.time()
            tpe = np.array([best_of_optuna(n, s, k) for s in range(seeds)])
            line += (
                f" | startup {k}: {tpe.mean():.4f} ({tpe.mean() / rand.mean():.3f}x random, "
                f"beats it on {np.mean(tpe < rand):.0%} of seeds, "
                f"{(time.time() - t0) / seeds:.2f} s)"
            )
        print(line, flush=True)


def cost(run_dir: str, settings: list[list[str]]) -> None:
    """Run the tdc stage on a copy of ``run_dir`` per settings; print search FLOPs and s."""
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    import torch

    from dedt_ray.config import load_config
    from dedt_ray.pipeline import run_stage
    from dedt_ray.store import RunStore

    torch.set_num_threads(1)
    common = ["select.enabled=false", "reweight.enabled=false", "train.num_workers=0",
              "train.threads_per_worker=1", "tdc.enabled=true", "tdc.finetune_steps=1"]  # fmt: skip
    first: dict[int, tuple[float, float]] = {}
    for overrides in settings:
        with tempfile.TemporaryDirectory() as tmp:
            copy = os.path.join(tmp, "run")
            shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("tdc", "_ray", "_tdc*"))
            cfg = load_config("configs/default.yaml", [*common, *overrides])
            manifest = run_stage("tdc", cfg, RunStore(copy))
        for g in (g for g in manifest["groups"] if g["rounds"]):
            flops, seconds = g["search_flops"], g["search_seconds"]
            base = first.setdefault(g["group"], (flops, seconds))
            print(
                f"{' '.join(overrides) or 'defaults'}: group {g['group']} {g['rounds']} rounds, "
                f"search {flops:.4g} FLOPs ({flops / base[0]:.2f}x), {seconds:.1f} s "
                f"({seconds / base[1]:.2f}x)",
                flush=True,
            )


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="part", required=True)
    syn = sub.add_parser("synthetic")
    syn.add_argument("--rounds", type=_ints, default=[4, 6, 8, 10])
    syn.add_argument("--seeds", type=int, default=100)
    syn.add_argument("--startup", type=_ints, default=[1, 2, 3, 5])
    cst = sub.add_parser("cost")
    cst.add_argument("run_dir")
    cst.add_argument("--settings", default=";", help="';'-separated override lists")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.part == "synthetic":
        synthetic(args.rounds, args.seeds, args.startup)
    else:
        cost(args.run_dir, [s.split() for s in args.settings.split(";")])


if __name__ == "__main__":
    main()
