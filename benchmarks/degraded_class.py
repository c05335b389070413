"""Which way do the DRO weights move? Digits 0-3 with half of one class replaced by noise.

For each seed: one clean run and one run per degraded class (reference + reweight stages at
the config's defaults, except as given), on digits 0-3 at 8 px with a small UNet. Prints, per
degraded class and seed, its output weight clean -> degraded, whether it ends the lowest, and
its mean excess clean -> degraded; writes them to `<out>/degraded.json`.

    python benchmarks/degraded_class.py --out /tmp/degraded [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

MODEL = [
    "data.image_size=8",
    "model.block_out_channels=[16,32]",
    "model.norm_num_groups=8",
    "model.attention_head_dim=8",
    "train.threads_per_worker=1",
    "train.num_workers=0",
]


def digits_source(path: Path, degraded: int | None, seed: int = 0) -> None:
    """Digits 0-3 as a parquet source; half of class `degraded` replaced by uniform noise."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = digits.target < 4
    images = np.round(digits.images[keep] * 255 / 16).astype(np.uint8)
    labels = digits.target[keep]
    if degraded is not None:
        rng = np.random.default_rng(seed)
        idx = np.flatnonzero(labels == degraded)
        bad = rng.choice(idx, len(idx) // 2, replace=False)
        images[bad] = rng.integers(0, 256, images[bad].shape, dtype=np.uint8)
    table = pa.table(
        {
            "id": [f"d{i:04d}" for i in range(len(labels))],
            "image": [im.tolist() for im in images],
            "label": labels.astype(np.int64),
        }
    )
    pq.write_table(table, str(path))


def digits_run(
    root: Path, degraded: int | None, seed: int = 0, overrides: tuple[str, ...] = ()
) -> tuple[np.ndarray, np.ndarray, dict]:
    """reference + reweight on digits 0-3: (output weights, mean excess per class, manifest)."""
    from dedt_ray.config import load_config
    from dedt_ray.pipeline import run_stage
    from dedt_ray.store import RunStore

    root.mkdir(parents=True, exist_ok=True)
    digits_source(root / "data.parquet", degraded, seed)
    cfg = load_config(
        None,
        [
            *MODEL,
            "data.source=parquet",
            f"data.path={root / 'data.parquet'}",
            "select.enabled=false",
            f"seed={seed}",
            "train.batch_size=64",
            "train.log_every=1000",
            *overrides,
        ],
    )
    store = RunStore(str(root / "run"))
    run_stage("reference", cfg, store)
    manifest = run_stage("reweight", cfg, store)
    trace = pq.read_table(store.path("reweight", "trace.parquet")).to_pandas()
    excess = trace.groupby("class")["excess"].mean().to_numpy()
    return np.asarray(manifest["class_weights"]), excess, manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/dedt-degraded")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    import ray

    ray.init(num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False, log_to_driver=False)
    out, rows = Path(args.out), []
    for seed in range(args.seeds):
        clean_w, clean_x, m = digits_run(out / f"s{seed}-clean", None, seed, tuple(args.overrides))
        for cls in range(4):
            w, x, _ = digits_run(out / f"s{seed}-d{cls}", cls, seed, tuple(args.overrides))
            rows.append(
                {
                    "seed": seed, "class": cls, "clean": float(clean_w[cls]),
                    "degraded": float(w[cls]), "lowest": bool(w[cls] == w.min()),
                    "excess_clean": float(clean_x[cls]),
                    "excess_degraded": float(x[cls]), "steps": m["steps"],
                    "flops_fraction": m["flops_fraction"],
                }
            )  # fmt: skip
            r = rows[-1]
            print(
                f"seed {seed} class {cls}: {r['clean']:.3f} -> {r['degraded']:.3f}"
                f" lowest={r['lowest']} excess {r['excess_clean']:.4f} -> "
                f"{r['excess_degraded']:.4f} ({r['steps']} proxy steps, "
                f"{r['flops_fraction']:.1%} of train FLOPs)",
                flush=True,
            )
    (out / "degraded.json").write_text(json.dumps(rows, indent=1))
    fell = sum(r["degraded"] < r["clean"] for r in rows)
    print(f"weight fell in {fell}/{len(rows)} runs; lowest in {sum(r['lowest'] for r in rows)}")


if __name__ == "__main__":
    main()
