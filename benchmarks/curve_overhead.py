"""What quality along training costs: the same train stage with and without `train.eval_every`.

The config's study settings (default `configs/study_digits.yaml`: full data, its model, batch,
curve settings), `--steps` steps each, `--rounds` rounds in alternating order. The feature
classifier and the real-feature cache are prepared first, once (a study shares them), and timed
apart, and an untimed 20-step run first pays for what the first run in a process pays once (Ray
Data's start). Printed: the train stage's wall seconds (start-up, training, waiting for the
last scores) and the training loop's own wall seconds, each with and without the curve, and
their ratios (goal: <= 1.15).

    flock /tmp/dedt-heavy.lock python benchmarks/curve_overhead.py [--steps 600] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dedt_ray.config import Config, load_config  # noqa: E402
from dedt_ray.store import RunStore  # noqa: E402


def one_run(cfg: Config, base: RunStore, name: str) -> dict[str, float]:
    """The train stage in a fresh run directory that shares the base's classifier and cache."""
    from dedt_ray.pipeline import run_stage
    from dedt_ray.tune import _copy_shared_folder

    store = RunStore(base.path(name))
    store.clear()
    for folder in ("classifier", "curve"):
        _copy_shared_folder(base, store, folder)
    started = time.perf_counter()
    manifest = run_stage("train", cfg, store, force=True)
    curve = manifest.get("curve") or {}
    return {
        "stage_s": time.perf_counter() - started,
        "loop_s": float(manifest["train_wall_seconds"]),
        "points": int(curve.get("points") or 0),
        "eval_s": float(curve.get("eval_seconds") or 0.0),
        "start_s": float(curve.get("start_seconds") or 0.0),  # starting the scorer
        "wait_s": float(curve.get("wait_seconds") or 0.0),  # waiting for the last points
        "noise_floor": float(curve.get("noise_floor") or float("nan")),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/study_digits.yaml")
    p.add_argument("--run-dir", default="/tmp/curve_overhead")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    import ray

    from dedt_ray.runtime import init_ray
    from dedt_ray.study import prepare_shared

    fixed = ["select.enabled=false", "reweight.enabled=false", "train.until=steps",
             f"train.steps={args.steps}", *args.overrides]  # fmt: skip
    with_curve = load_config(args.config, fixed)
    without = load_config(args.config, [*fixed, "train.eval_every=null"])
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    init_ray()
    base = RunStore(args.run_dir)
    started = time.perf_counter()
    prepare_shared(with_curve, base)
    shared_s = time.perf_counter() - started
    warm_up = load_config(args.config, [*fixed, "train.eval_every=null", "train.steps=20"])
    one_run(warm_up, base, "warm-up")

    runs: dict[str, list[dict[str, float]]] = {"curve": [], "plain": []}
    for r in range(args.rounds):
        order = ["curve", "plain"] if r % 2 == 0 else ["plain", "curve"]
        for kind in order:
            cfg = with_curve if kind == "curve" else without
            runs[kind].append(one_run(cfg, base, f"{kind}-{r}"))
            print(f"round {r} {kind}: {json.dumps(runs[kind][-1])}", flush=True)

    figures = ("stage_s", "loop_s", "eval_s", "start_s", "wait_s")
    med = {k: {m: statistics.median(x[m] for x in v) for m in figures} for k, v in runs.items()}
    tc = with_curve.train
    print(
        f"\n{args.steps} steps of batch {tc.batch_size}; curve every {tc.eval_every} steps, "
        f"{tc.eval_samples} samples, DDIM {tc.eval_steps}; medians of {args.rounds}"
    )
    print(f"one-time: classifier + real-feature cache {shared_s:.1f} s")
    print("| | with curve | without | ratio |\n|---|---|---|---|")
    for m, label in (("stage_s", "train stage wall s"), ("loop_s", "training loop wall s")):
        ratio = med["curve"][m] / med["plain"][m]
        print(f"| {label} | {med['curve'][m]:.1f} | {med['plain'][m]:.1f} | **{ratio:.3f}** |")
    c = med["curve"]
    print(
        f"scoring time on the actor (summed over points): {c['eval_s']:.1f} s; the stage "
        f"spent {c['start_s']:.1f} s starting the scorer and {c['wait_s']:.1f} s waiting for "
        "the last points"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "shared_s": shared_s}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
