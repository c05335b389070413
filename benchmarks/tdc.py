"""Single model vs TDC at equal total training FLOPs, on digits.

1. TDC run: `train` (stage 1, --stage1-steps) -> `tdc` (pruning search + stage 2,
   --finetune-steps per group) -> `evaluate` (the routed model).
2. Baseline run: one model trained for as many steps as TDC's total training FLOPs buy
   (total / flops_per_step), then `evaluate`.

Prints quality (the evaluate stage's FD and its feature space), sampling FLOPs per image and
training FLOPs of both. Extra `key=value` arguments override both configs.

    python benchmarks/tdc.py --stage1-steps 600 --finetune-steps 200 --out /tmp/tdc-bench
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time
from typing import Any

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

from dedt_ray.config import load_config  # noqa: E402
from dedt_ray.pipeline import run_stage  # noqa: E402
from dedt_ray.store import RunStore  # noqa: E402

COMMON = [
    "select.enabled=false",
    "train.num_workers=0",
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
    parser.add_argument("--stage1-steps", type=int, default=600)
    parser.add_argument("--finetune-steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="/tmp/dedt-tdc-bench")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    started = time.time()
    tdc_over = [
        *args.overrides,
        f"train.steps={args.stage1_steps}",
        "tdc.enabled=true",
        f"tdc.finetune_steps={args.finetune_steps}",
        f"tdc.rounds={args.rounds}",
    ]
    tdc = run(os.path.join(args.out, "tdc"), tdc_over, ["train", "tdc", "evaluate"])
    flops = tdc["tdc"]["training_flops"]
    steps = math.ceil(flops["total_flops"] / tdc["train"]["flops_per_step"])
    base_over = [*args.overrides, f"train.steps={steps}"]
    base = run(os.path.join(args.out, "single"), base_over, ["train", "evaluate"])

    sampling = tdc["tdc"]["sampling_flops"]
    rows = [
        ("single", steps, base["train"]["flops"], base["evaluate"]),
        ("tdc", args.stage1_steps, flops["total_flops"], tdc["evaluate"]),
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


if __name__ == "__main__":
    main()
