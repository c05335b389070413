"""The data-efficiency study: quality versus training compute on the embedded digits.

Runs, all from one embedding (computed once in `<run-dir>/embed`, reused by every run):
  - full data (no selection), at seeds 0 and 1 (run-to-run noise of the metric);
  - random / gaussian / moderate selection at keep ratios 0.1, 0.3, 0.5;
  - the best of those (lowest FD) again with DRO class reweighting (reference + proxy);
  - full data trained for only the step budgets of the subset runs ("full, truncated"):
    the compute-matched baseline that tells selection apart from merely training less.

Training-compute rule (an epoch budget): every run trains for the same number of epochs
over the rows it trains on,

    steps = max(MIN_STEPS, ceil(epochs * n_rows / batch_size)),

(default 10 epochs, MIN_STEPS 50), so compute is proportional to the subset size and a keep
ratio r costs about r of the full run. Compute is counted as training FLOPs (torch
FlopCounter of one fwd+bwd step x steps) and images seen; the DRO run adds its reference
training, proxy training and reference forwards. Reference and proxy get REWEIGHT_SHARE
of the run's train steps each.

Quality: the evaluate stage's FD in the fallback feature space (FD_digits-cnn, no Inception
weights here; never "FID"), plus precision / recall. The speed-up of a run is the full-data
compute over its compute, when its FD is within 5% of the full-data model's.

    python benchmarks/data_efficiency.py --config configs/study_digits.yaml
    python benchmarks/data_efficiency.py --quick            # smoke run, a few steps
    python benchmarks/data_efficiency.py --from-json a/study.json b/study.json  # re-render
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from dedt_ray import tune
from dedt_ray.config import Config, load_config
from dedt_ray.store import RunStore
from dedt_ray.tune import _copy_shared, run_trial_pipeline, trial_config

log = logging.getLogger("dedt_ray")

CRITERIA = ("random", "gaussian", "moderate")
KEEP_RATIOS = (0.1, 0.3, 0.5)
MIN_STEPS = 50
REWEIGHT_SHARE = 0.1  # reference and proxy steps, each, as a share of the run's train steps
RETRIES = 2  # reruns of a failed run (finished stages are skipped by their manifests)
WITHIN = 0.05  # "reaches the full-data quality": FD <= (1 + WITHIN) x the full-data FD


@dataclass
class Spec:
    """One run: its name (folder under <run-dir>/tune/trials) and its overrides."""

    name: str
    kind: str  # full | subset | dro | truncated
    criterion: str | None = None
    keep: float | None = None
    seed: int = 0
    steps: int | None = None  # fixed steps (truncated full-data runs); None: epoch rule
    result: dict[str, Any] = field(default_factory=dict)


class _Discard:
    """Stands in for the Tune trial's report queue (nothing listens here)."""

    def put(self, item: Any) -> None:
        return None


def epoch_steps(n_rows: int, epochs: float, batch: int, min_steps: int = MIN_STEPS) -> int:
    """The compute rule (`dedt_ray.tune.epoch_steps`, as `tune.epochs` sweeps use it)."""
    return tune.epoch_steps(n_rows, epochs, batch, min_steps)


def run_one(spec: Spec, base: RunStore, cfg: Config, epochs: float, min_steps: int) -> None:
    """Select (to count the kept rows), fix the steps by the rule, run the pipeline."""
    overrides = [f"seed={spec.seed}", f"reweight.enabled={str(spec.kind == 'dro').lower()}"]
    if spec.criterion is None:
        overrides.append("select.enabled=false")
    else:
        overrides += [
            "select.enabled=true",
            f"select.criterion={spec.criterion}",
            f"select.keep_ratio={spec.keep}",
        ]
    store = RunStore(base.path("tune", "trials", spec.name))
    _copy_shared(base, store)
    pre = trial_config(cfg.model_dump(mode="json"), overrides, {}, {})
    if spec.criterion is not None:
        from dedt_ray.pipeline import run_stage

        n_rows = int(run_stage("select", pre, store)["kept"])
    else:
        n_rows = int(base.manifest("embed")["rows"])
    steps = spec.steps or epoch_steps(n_rows, epochs, cfg.train.batch_size, min_steps)
    overrides.append(f"train.steps={steps}")
    if spec.kind == "dro":
        side = max(1, round(REWEIGHT_SHARE * steps))
        overrides += [f"reference.steps={side}", f"reweight.steps={side}"]
    ctx = {"run_dir": base.uri(base.root), "base": cfg.model_dump(mode="json"),
           "fixed": overrides, "space": {}}  # fmt: skip
    out = run_trial_pipeline(ctx, {}, spec.name, _Discard())
    stages = ("select", "reference", "reweight", "train", "evaluate")  # as first run
    wall = sum((store.manifest(n) or {}).get("seconds", 0.0) for n in stages)
    ev = store.read_json("evaluate", "metrics.json")
    train = store.manifest("train")
    rw = store.manifest("reweight") if spec.kind == "dro" else None
    search = int((rw or {}).get("search_flops") or 0)
    spec.result = {
        "rows": out["train_rows"],
        "steps": int(train["steps"]),
        "images_seen": int(train["images_seen"]),
        "train_flops": float(train["flops"]),
        "reweight_flops": float(search),
        "reweight_images": _reweight_images(store, cfg) if rw else 0,
        "total_flops": float(train["flops"]) + search,
        "metric": ev["metric"],
        "fd": ev["metrics"][ev["metric"]],
        "fd_real_halves": ev["metrics"].get(f"{ev['metric']}_real_halves"),
        "precision": ev["metrics"].get("precision"),
        "recall": ev["metrics"].get("recall"),
        "wall_s": round(wall, 1),
        "dir": out["trial_dir"],
    }
    log.info("study: %s -> %s", spec.name, json.dumps(spec.result))


def _reweight_images(store: RunStore, cfg: Config) -> int:
    """Images the reference and the proxy trained on (DRO runs)."""
    ref, rw = store.manifest("reference") or {}, store.manifest("reweight") or {}
    proxy_batch = cfg.reweight.batch_size or cfg.train.batch_size
    return int(ref.get("images_seen") or 0) + int(rw.get("steps") or 0) * proxy_batch


def speedups(specs: list[Spec]) -> tuple[float, dict[str, float | None]]:
    """Full-data FD (seed 0) and, per run, full compute / run compute where FD is within 5%."""
    full = next((s.result for s in specs if s.kind == "full" and s.seed == 0), None)
    if not full:  # a partial study (truncated runs only)
        return math.nan, {}
    target = (1 + WITHIN) * full["fd"]
    out: dict[str, float | None] = {}
    for s in specs:
        r = s.result
        ok = r and r["fd"] is not None and r["fd"] <= target and s.kind != "full"
        out[s.name] = full["total_flops"] / r["total_flops"] if ok else None
    return full["fd"], out


def table(specs: list[Spec]) -> str:
    """The markdown table of every finished run."""
    fd_full, sp = speedups(specs)
    metric = specs[0].result["metric"]
    head = (f"| run | rows | steps | images seen | train FLOPs | + ref/proxy FLOPs | "
            f"compute vs full | {metric} | precision | recall | speed-up (FD within 5%) | "
            f"stages s |\n|---|---|---|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    full_c = (
        math.nan
        if math.isnan(fd_full)
        else next(s.result["total_flops"] for s in specs if s.kind == "full" and s.seed == 0)
    )
    lines = [head]
    for s in specs:
        r = s.result
        if not r:
            continue
        extra = (
            f"{r['reweight_flops']:.3g} ({r['reweight_images']} img)" if s.kind == "dro" else "-"
        )
        speed = f"**{sp[s.name]:.2f}x**" if sp.get(s.name) else "-"
        lines.append(
            f"| {s.name} | {r['rows']} | {r['steps']} | {r['images_seen']} | "
            f"{r['train_flops']:.3g} | {extra} | {r['total_flops'] / full_c:.2f} | "
            f"{r['fd']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} | {speed} | "
            f"{r['wall_s']:.0f} |"
        )
    lines.append(f"\nTarget: {metric} <= {(1 + WITHIN) * fd_full:.3f} (full data, seed 0, + 5%).")
    return "\n".join(lines)


def plot(specs: list[Spec], path: str) -> None:
    """Quality vs training compute: one marker per criterion, the full-data points."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fd_full, _ = speedups(specs)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    style = {"random": ("o", "tab:gray"), "gaussian": ("s", "tab:blue"),
             "moderate": ("^", "tab:green")}  # fmt: skip
    for crit, (marker, color) in style.items():
        pts = sorted((s for s in specs if s.kind == "subset" and s.criterion == crit and s.result),
                     key=lambda s: s.result["total_flops"])  # fmt: skip
        ax.plot([s.result["total_flops"] for s in pts], [s.result["fd"] for s in pts],
                marker=marker, color=color, ls=":", label=crit)  # fmt: skip
        for s in pts:
            xy = (s.result["total_flops"], s.result["fd"])
            ax.annotate(f"{s.keep:g}", xy, textcoords="offset points", xytext=(4, 3),
                        fontsize=7, color=color)  # fmt: skip
    trunc = sorted((s for s in specs if s.kind == "truncated" and s.result),
                   key=lambda s: s.result["total_flops"])  # fmt: skip
    if trunc:
        ax.plot([s.result["total_flops"] for s in trunc], [s.result["fd"] for s in trunc],
                "x--", color="black", alpha=0.6, label="full data, fewer steps")  # fmt: skip
    for s in specs:
        if s.kind == "full" and s.result:
            ax.plot(s.result["total_flops"], s.result["fd"], "X", ms=11, color="black",
                    label="full data" if s.seed == 0 else None)  # fmt: skip
        if s.kind == "dro" and s.result:
            ax.plot(s.result["total_flops"], s.result["fd"], "*", ms=15, color="tab:red",
                    label=f"{s.criterion} {s.keep:g} + DRO (incl. ref/proxy)")  # fmt: skip
    ax.axhline((1 + WITHIN) * fd_full, color="black", lw=0.8, ls="-.",
               label="full-data FD + 5%")  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
    ax.set_xlabel("training compute (FLOPs; DRO: + reference and proxy)")
    ax.set_ylabel(f"{specs[0].result['metric']} (lower is better)")
    ax.set_title("digits 16 px: quality vs training compute (equal epochs)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/study_digits.yaml")
    p.add_argument("--run-dir", default=None, help="default runs/data_efficiency[_quick]")
    p.add_argument("--epochs", type=float, default=10.0, help="epoch budget of every run")
    p.add_argument("--min-steps", type=int, default=MIN_STEPS)
    p.add_argument("--seeds", type=int, default=2, help="full-data runs (seeds 0..n-1)")
    p.add_argument("--criteria", nargs="+", default=list(CRITERIA))
    p.add_argument("--ratios", nargs="+", type=float, default=list(KEEP_RATIOS))
    p.add_argument("--no-truncated", action="store_true", help="skip the compute-matched baseline")
    p.add_argument("--plot", default=None, help="default benchmarks/data_efficiency.png")
    p.add_argument("--quick", action="store_true", help="smoke run: 4 small runs, tiny evaluation")
    p.add_argument("--truncated-steps", nargs="+", type=int, default=None,
                   help="run only full-data runs of these step budgets")  # fmt: skip
    p.add_argument("--from-json", nargs="+", default=None,
                   help="no runs: table and plot from these study.json files")  # fmt: skip
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="study | %(message)s", stream=sys.stderr)

    import ray

    from dedt_ray.config import dump_config
    from dedt_ray.pipeline import run_stage
    from dedt_ray.runtime import init_ray

    overrides = list(args.overrides)
    if args.quick:
        overrides += ["evaluate.samples_per_class=4", "evaluate.num_inference_steps=3",
                     "evaluate.classifier_epochs=1", "evaluate.manifold_samples=40"]  # fmt: skip
        args.epochs, args.min_steps, args.seeds = 0.5, 3, 1
        args.criteria, args.ratios, args.no_truncated = ["random", "gaussian"], [0.3], True
    run_dir = args.run_dir or (
        "runs/data_efficiency_quick" if args.quick else "runs/data_efficiency"
    )
    plot_path = args.plot or (
        f"{run_dir}/data_efficiency.png" if args.quick else "benchmarks/data_efficiency.png"
    )
    if args.from_json:
        specs_in = [Spec(**r) for f in args.from_json for r in json.load(open(f))["runs"]]
        plot(specs_in, plot_path)
        print(table(specs_in))
        return 0
    cfg = load_config(args.config, overrides)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    init_ray()
    started = time.time()
    base = RunStore(run_dir)
    base.write_text(dump_config(cfg), "config.yaml")
    run_stage("embed", cfg, base)

    specs: list[Spec] = []

    def add(spec: Spec) -> None:  # run, then rewrite the outputs (a partial study is kept)
        for attempt in range(1, RETRIES + 2):  # e.g. a Train worker health check on a busy host
            try:
                run_one(spec, base, cfg, args.epochs, args.min_steps)
                break
            except Exception as exc:  # noqa: BLE001
                log.error("study: %s failed (attempt %d): %s", spec.name, attempt, exc)
        else:
            return
        specs.append(spec)
        summary = {"config": args.config, "overrides": overrides, "epochs": args.epochs,
                   "min_steps": args.min_steps, "wall_s": round(time.time() - started, 1),
                   "runs": [asdict(s) for s in specs]}  # fmt: skip
        base.write_json(summary, "study.json")
        base.write_text(table(specs) + "\n", "study.md")
        os.makedirs(os.path.dirname(plot_path) or ".", exist_ok=True)
        plot(specs, plot_path)

    if args.truncated_steps:
        for steps in args.truncated_steps:
            add(Spec(f"full-{steps}steps", "truncated", steps=steps))
        print(table(specs))
        return 0
    add(Spec("full-seed0", "full"))
    for r in args.ratios:
        for c in args.criteria:
            add(Spec(f"{c}-{r:g}", "subset", c, r))
    subsets = [s for s in specs if s.kind == "subset"]
    best = min(subsets, key=lambda s: s.result["fd"])
    add(Spec(f"{best.criterion}-{best.keep:g}-dro", "dro", best.criterion, best.keep))
    for i in range(1, args.seeds):  # run-to-run noise of the full-data point
        add(Spec(f"full-seed{i}", "full", seed=i))
    if not args.no_truncated:  # full data at the subset runs' step budgets
        for steps in sorted({s.result["steps"] for s in subsets}):
            add(Spec(f"full-{steps}steps", "truncated", steps=steps))

    wall = time.time() - started
    print(table(specs))
    print(
        f"\nstudy wall time {wall / 60:.1f} min; {base.uri(base.path('study.json'))}, {plot_path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
