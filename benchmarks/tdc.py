"""Single model vs TDC within the same budget (the pipeline's defaults), on digits.

1. TDC run: `train.steps = --budget-steps` with `tdc.enabled`: the train stage is stage 1
   (`tdc.stage1_fraction` of the budget), `tdc` searches and fine-tunes each group for what the
   budget leaves, `evaluate` measures the routed model.
2. Baseline run: one model trained for the whole budget, then `evaluate` (TDC's total is at
   most its FLOPs: `within_baseline`).
3. The stage-1 model alone (TDC's starting point, a copy of run 1 without `tdc`), evaluated:
   stage1 -> tdc is what pruning + stage 2 did with the rest of the budget, stage1 -> single
   what the same budget buys when spent on the single model.

Prints quality (the evaluate stage's FD and its feature space), sampling FLOPs per image and
training FLOPs of both, and writes them to `<out>/results.json`. Both runs measure FD with
the same feature classifier (the TDC run's, copied). Extra `key=value` arguments override both
configs. The paper's budget formula keeps one full-size group, so sampling saves
`(1 - mean budget fraction over the sampled steps)`: 2 groups need k <= ~0.15 for 20%.

    python benchmarks/tdc.py --budget-steps 1476 --out /tmp/tdc-bench train.lr=4e-3
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from typing import Any

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

import torch  # noqa: E402

from dedt_ray.config import load_config  # noqa: E402
from dedt_ray.pipeline import run_stage  # noqa: E402
from dedt_ray.store import RunStore  # noqa: E402

COMMON = [
    "select.enabled=false",
    "reweight.enabled=false",
    "train.num_workers=0",
    "train.threads_per_worker=1",  # 2 OpenMP threads in-process crawl on a loaded 2-vCPU VM
    "train.until=steps",  # a fixed budget, no curve
    "train.eval_every=null",
    "evaluate.samples_per_class=50",
    "evaluate.num_inference_steps=25",
    "evaluate.classifier_epochs=5",
]


def run(run_dir: str, overrides: list[str], stages: list[str]) -> dict[str, dict[str, Any]]:
    """Run ``stages`` in ``run_dir`` with the defaults plus ``overrides``."""
    cfg = load_config("configs/default.yaml", [*COMMON, *overrides])
    store = RunStore(run_dir)
    return {s: run_stage(s, cfg, store) for s in stages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-steps", type=int, default=1476, help="train.steps")
    parser.add_argument("--groups", type=int, default=2, help="tdc.n_groups")
    parser.add_argument("--k", type=float, default=0.1, help="tdc.k (smallest group's FLOPs)")
    parser.add_argument("--out", default="/tmp/dedt-tdc-bench")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("dedt_ray").setLevel(logging.INFO)
    torch.set_num_threads(1)  # the tdc stage's pruning search runs in this process too

    started = time.time()
    budget = [*args.overrides, f"train.steps={args.budget_steps}"]
    tdc_over = [*budget, "tdc.enabled=true", f"tdc.n_groups={args.groups}", f"tdc.k={args.k}"]
    tdc = run(os.path.join(args.out, "tdc"), tdc_over, ["train", "tdc", "evaluate"])
    flops = tdc["tdc"]["training_flops"]
    steps = args.budget_steps
    base_over = budget
    single_dir = os.path.join(args.out, "single")
    classifier = os.path.join(args.out, "tdc", "classifier")
    if os.path.isdir(classifier):  # the same FD feature space for both
        shutil.copytree(classifier, os.path.join(single_dir, "classifier"), dirs_exist_ok=True)
    base = run(single_dir, base_over, ["train", "evaluate"])
    # the stage-1 model alone (TDC's starting point): splits TDC's gap into training and pruning
    stage1_dir = os.path.join(args.out, "stage1")
    skip = shutil.ignore_patterns("tdc", "evaluate", "_ray")
    shutil.copytree(os.path.join(args.out, "tdc"), stage1_dir, ignore=skip, dirs_exist_ok=True)
    stage1_steps = tdc["train"]["steps"]
    stage1_over = [*args.overrides, f"train.steps={stage1_steps}"]
    stage1 = run(stage1_dir, stage1_over, ["train", "evaluate"])

    sampling = tdc["tdc"]["sampling_flops"]
    rows = [
        ("stage1", stage1_steps, stage1["train"]["flops"], stage1["evaluate"]),
        ("single", steps, base["train"]["flops"], base["evaluate"]),
        ("tdc", stage1_steps + tdc["tdc"]["stage2_steps"], flops["total_flops"], tdc["evaluate"]),
    ]
    metric = tdc["evaluate"]["metric"]
    print(f"\n{'model':8} {'steps':>7} {'train FLOPs':>12} {metric:>22} {'sample FLOPs/img':>17}")
    for name, n, train_flops, ev in rows:
        print(
            f"{name:8} {n:7d} {train_flops:12.4g} {ev['value']:22.4f} {ev['flops_per_image']:17.4g}"
        )
    print(
        f"\ntdc: groups {[[g['t_lo'], g['t_hi']] for g in tdc['tdc']['groups']]}, "
        f"FLOPs fractions {[round(g['flops_fraction'], 3) for g in tdc['tdc']['groups']]}; "
        f"training = stage1 {flops['stage1_flops']:.3g} + search {flops['search_flops']:.3g} "
        f"+ stage2 {flops['stage2_flops']:.3g}; routed sampling "
        f"{sampling['routed_flops_per_image']:.3g} vs single "
        f"{sampling['single_flops_per_image']:.3g} (UNet only, {sampling['scheduler']} "
        f"{sampling['num_inference_steps']} steps); wall {time.time() - started:.0f} s"
    )
    saved = 1 - tdc["evaluate"]["flops_per_image"] / base["evaluate"]["flops_per_image"]
    better = tdc["evaluate"]["value"] <= base["evaluate"]["value"]
    print(f"sampling FLOPs saved {saved:.1%}; {metric} tdc <= single: {better}; "
          f"within the budget: {flops['within_baseline']}")  # fmt: skip
    out = {
        "args": vars(args),
        "metric": metric,
        "rows": [
            {
                "model": name,
                "steps": n,
                "train_flops": f,
                "quality": ev["value"],
                "sampling_flops_per_image": ev["flops_per_image"],
            }
            for name, n, f, ev in rows
        ],
        "tdc": {k: tdc["tdc"][k] for k in ("groups", "training_flops", "sampling_flops")},
        "sampling_saved": saved,
        "wall_seconds": round(time.time() - started, 1),
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(out, f, indent=1, default=str)


if __name__ == "__main__":
    main()
