"""Images/s of the Ray Train loop (1 and 2 workers) against a plain PyTorch loop.

    python benchmarks/train_throughput.py [--steps 120] [--warmup 20] [--rounds 2] [key=value ...]

The same UNet (the default ModelConfig, or overrides), the same rows (the default digits
source through the train stage's own data path), the same global batch, AdamW, grad clip,
EMA and index stream. The plain loop is one process calling `core.train_step`; the Ray
loop is `dedt_ray.diffusion.trainer.fit` (TorchTrainer, datasets=, reports, checkpoint at
the end). Steady-state images/s skip the first `--warmup` steps of every run (Ray: the
first report window). Rounds interleave the three runs, so a busy machine hurts all
alike; the medians are reported. Prints the ratios Ray-1/plain (goal >= 0.95) and Ray-2/Ray-1.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as dedt_ray.diffusion.trainer.worker_env

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from diffusers.training_utils import EMAModel  # noqa: E402

from dedt_ray.artifacts import TrainingInputs  # noqa: E402
from dedt_ray.config import Config, load_config  # noqa: E402
from dedt_ray.diffusion import trainer  # noqa: E402
from dedt_ray.diffusion.core import (  # noqa: E402
    LossConfig,
    build_lr_scheduler,
    build_optimizer,
    train_step,
)
from dedt_ray.diffusion.models import build_noise_scheduler, build_unet  # noqa: E402
from dedt_ray.diffusion.stream import IndexStream  # noqa: E402
from dedt_ray.store import RunStore  # noqa: E402


def plain_loop(
    cfg: Config, x: np.ndarray, labels: np.ndarray, spec, steps: int, warmup: int, threads: int
) -> float:
    """Images/s of a single-process loop over the same core step (after `warmup` steps)."""
    torch.set_num_threads(threads)
    tc, mc = cfg.train, cfg.model
    images = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()  # uint8, like the workers
    y_all = torch.from_numpy(labels)
    torch.manual_seed(cfg.seed)
    unet = build_unet(mc, spec).train()
    sched = build_noise_scheduler(mc)
    opt = build_optimizer(unet, tc.lr, tc.weight_decay)
    lr = build_lr_scheduler(opt, tc.lr_schedule, tc.warmup_steps, tc.steps)
    ema = EMAModel(unet.parameters(), decay=tc.ema_decay)
    stream = IndexStream(labels, cfg.seed)
    loss_cfg = LossConfig(mc.label_dropout, spec.null_class, tc.min_snr_gamma)
    gen = torch.Generator()
    for step in range(steps):
        if step == warmup:
            start = time.perf_counter()
        idx = torch.from_numpy(stream.next(tc.batch_size))
        x0 = images[idx].float() / 127.5 - 1.0
        gen.manual_seed(step)
        loss = train_step(
            unet, sched, opt, lr, [(x0, y_all[idx], None)], gen, loss_cfg, tc.grad_clip
        )
        ema.step(unet.parameters())
    float(loss)
    return (steps - warmup) * tc.batch_size / (time.perf_counter() - start)


def ray_loop(cfg: Config, rows, labels, spec, workers: int, steps: int, warmup: int):
    """(steady images/s, end-to-end seconds of fit) of the Ray Train loop."""
    cfg = cfg.model_copy(deep=True)
    cfg.train.num_workers = workers
    cfg.train.steps = steps
    cfg.train.log_every = warmup
    cfg.train.checkpoint_every = steps
    with tempfile.TemporaryDirectory() as tmp:
        store = RunStore(tmp)
        started = time.perf_counter()
        job = trainer.make_job(cfg, spec, labels, None, key=f"bench{workers}")
        _, state = trainer.fit(cfg, store, job, rows, "bench")
        seconds = time.perf_counter() - started
    history = state["history"]
    first = history[0]  # the window with startup, compile-free warmup and the first steps
    last = history[-1]
    ips = (last["images_seen"] - first["images_seen"]) / (last["wall"] - first["wall"])
    return ips, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="default: all CPUs")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    if args.steps % args.warmup:
        parser.error("--steps must be a multiple of --warmup (Ray report windows)")
    cpus = len(os.sched_getaffinity(0))
    threads = args.threads or cpus
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = load_config(
        "configs/default.yaml" if Path("configs/default.yaml").exists() else None,
        [f"train.threads_per_worker={threads}", *args.overrides],
    )
    with tempfile.TemporaryDirectory() as tmp:
        rows, labels, classes, data = trainer.training_rows(cfg, RunStore(tmp), TrainingInputs())
    spec = trainer.model_spec(cfg, labels, classes, data)
    batch = sorted(rows.take_all(), key=lambda r: r["id"])  # the order a worker's shard has
    x = np.stack([r["x"] for r in batch])
    y = np.asarray([r["label"] for r in batch], np.int64)
    print(
        f"{len(y)} rows {data['shape']}, UNet {cfg.model.block_out_channels}, batch "
        f"{cfg.train.batch_size}, {args.steps} steps ({args.warmup} warmup), {cpus} CPUs, "
        f"{threads} torch threads (plain, Ray 1 worker); Ray 2 workers: {max(1, threads // 2)} each"
    )
    results: dict[str, list[float]] = {"plain": [], "ray1": [], "ray2": []}
    walls: dict[str, list[float]] = {"ray1": [], "ray2": []}
    two = cfg.model_copy(deep=True)
    two.train.threads_per_worker = max(1, threads // 2)
    for r in range(args.rounds):
        order = ["plain", "ray1", "ray2"] if r % 2 == 0 else ["ray2", "ray1", "plain"]
        for name in order:  # alternate the order so a drifting machine load cancels out
            if name == "plain":
                ips = plain_loop(cfg, x, y, spec, args.steps, args.warmup, threads)
            else:
                workers, c = (1, cfg) if name == "ray1" else (2, two)
                ips, wall = ray_loop(c, rows, labels, spec, workers, args.steps, args.warmup)
                walls[name].append(wall)
            results[name].append(ips)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} img/s" for k, v in results.items()))
    med = {k: statistics.median(v) for k, v in results.items()}
    print(
        f"\nmedian images/s: plain {med['plain']:.1f}, Ray 1 worker {med['ray1']:.1f}, "
        f"Ray 2 workers {med['ray2']:.1f}"
    )
    print(
        f"Ray fit wall (incl. startup) median: 1 worker {statistics.median(walls['ray1']):.1f}"
        f" s, 2 workers {statistics.median(walls['ray2']):.1f} s"
    )
    print(f"ratio Ray 1 worker / plain: {med['ray1'] / med['plain']:.3f} (goal >= 0.95)")
    print(f"ratio Ray 2 workers / 1 worker: {med['ray2'] / med['ray1']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
