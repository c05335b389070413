"""One GPU check in one script (<= 8 minutes on one H200): training, embedding, sampling.

1. bf16 training images/s of the Ray Train loop (1 worker, `dedt_ray.diffusion.trainer.fit`)
   against a plain PyTorch loop over the same `core.train_step`, on a 32 px RGB UNet of the
   DDPM CIFAR-10 width (configs/cifar10.yaml's model, batch 128);
2. the embed stage (Ray Data, one GPU actor) with a ViT-B/16-sized encoder at 224 px (random
   weights built from a config) against a plain DataLoader loop;
3. sampling images/s of the same UNet (DDIM, 50 steps, batch 256).

    python benchmarks/gpu_check.py [--steps 200] [--images 4096]   # on a machine with a GPU
    python benchmarks/gpu_check.py --smoke                         # a CPU smoke run, seconds

Prints every figure and the ratios, and writes them to `--out` (JSON). Without a GPU it says
so and exits 2 (unless `--smoke`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

UNET = [  # configs/cifar10.yaml's denoiser
    "model.block_out_channels=[128,256,256,256]",
    "model.layers_per_block=2",
    "model.attention_levels=[false,true,false,false]",
    "model.attention_head_dim=null",
    "model.norm_num_groups=32",
    "model.dropout=0.1",
    "model.class_conditional=false",
]
SMOKE_UNET = ["model.block_out_channels=[16,32]", "model.norm_num_groups=8",
              "model.attention_levels=[false,true]"]  # fmt: skip


def plain_loop(cfg, x: np.ndarray, spec, steps: int, warmup: int, device: str) -> float:
    """Images/s of a single-process loop over the same core step on `device` (bf16 on GPU)."""
    from diffusers.training_utils import EMAModel

    from dedt_ray.diffusion.core import (
        LossConfig,
        Precision,
        build_lr_scheduler,
        build_optimizer,
        train_step,
    )  # fmt: skip
    from dedt_ray.diffusion.models import build_noise_scheduler, build_unet

    tc, mc = cfg.train, cfg.model
    images = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(device)
    torch.manual_seed(cfg.seed)
    unet = build_unet(mc, spec).to(device).train()
    sched = build_noise_scheduler(mc)
    opt = build_optimizer(unet, tc.lr, tc.weight_decay)
    lr = build_lr_scheduler(opt, tc.lr_schedule, tc.warmup_steps, steps)
    ema = EMAModel(unet.parameters(), decay=tc.ema_decay)
    precision = Precision(tc.mixed_precision, device)
    gen = torch.Generator(device=device)
    for step in range(steps):
        if step == warmup:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        idx = torch.randint(0, len(images), (tc.batch_size,), device=device)
        x0 = images[idx].float() / 127.5 - 1.0
        gen.manual_seed(step)
        train_step(unet, sched, opt, lr, [(x0, None, None)], gen, LossConfig(), tc.grad_clip,
                   precision)  # fmt: skip
        ema.step(unet.parameters())
    if device == "cuda":
        torch.cuda.synchronize()
    return (steps - warmup) * tc.batch_size / (time.perf_counter() - start)


def training(args: argparse.Namespace, device: str) -> dict[str, float]:
    """(plain, Ray 1 worker) steady-state training images/s in bf16."""
    from train_throughput import ray_loop

    from dedt_ray.config import load_config
    from dedt_ray.diffusion.models import ModelSpec

    size = 8 if args.smoke else 32
    cfg = load_config(None, [
        *(SMOKE_UNET if args.smoke else UNET), f"data.image_size={size}", "data.mode=RGB",
        f"train.batch_size={16 if args.smoke else 128}", "train.mixed_precision=bf16",
        f"train.use_gpu={device == 'cuda'}", "train.warmup_steps=10",
    ])  # fmt: skip
    n = 512 if args.smoke else 8192
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    y = np.zeros(n, np.int64)
    spec = ModelSpec(size, 3, 0)
    rows = ray.data.from_items(
        [{"id": f"{i:06d}", "label": 0, "x": x[i]} for i in range(n)],
        override_num_blocks=8,
    ).materialize()
    plain = plain_loop(cfg, x, spec, args.steps, args.warmup, device)
    ray_ips, wall = ray_loop(cfg, rows, y, spec, 1, args.steps, args.warmup)
    return {"train_plain_images_per_s": plain, "train_ray1_images_per_s": ray_ips,
            "train_ray1_over_plain": ray_ips / plain, "train_ray_fit_wall_s": wall}  # fmt: skip


def embedding(args: argparse.Namespace) -> dict[str, float]:
    """(plain, Ray Data end to end, steady state) images/s of a ViT-B-sized encoder."""
    from embed_throughput import images, plain_loop, ray_stage
    from transformers import ViTConfig, ViTModel

    size = 32 if args.smoke else 224
    n = 128 if args.smoke else args.images
    data = images(n, size)
    width, layers, heads = (64, 2, 2) if args.smoke else (768, 12, 12)
    with tempfile.TemporaryDirectory() as model:
        ViTModel(
            ViTConfig(image_size=size, patch_size=16, hidden_size=width, num_hidden_layers=layers,
                      num_attention_heads=heads, intermediate_size=4 * width),
            add_pooling_layer=False,
        ).save_pretrained(model)  # fmt: skip
        plain = plain_loop(data, model, 64 if args.smoke else 256, size)
        staged, steady = ray_stage(data, model, 64 if args.smoke else 256, size)
    return {"embed_plain_images_per_s": plain, "embed_ray_images_per_s": staged,
            "embed_ray_steady_images_per_s": steady,
            "embed_steady_over_plain": steady / plain}  # fmt: skip


def sampling(args: argparse.Namespace, device: str) -> dict[str, float]:
    """DDIM-50 sampling images/s of the training check's UNet (bf16 autocast on a GPU)."""
    from dedt_ray.config import load_config
    from dedt_ray.diffusion.models import (
        ModelSpec,
        build_noise_scheduler,
        build_unet,
        sampling_scheduler,
    )
    from dedt_ray.diffusion.sampling import generate

    size, batch = (8, 16) if args.smoke else (32, 256)
    cfg = load_config(None, [*(SMOKE_UNET if args.smoke else UNET), f"data.image_size={size}"])
    unet = build_unet(cfg.model, ModelSpec(size, 3, 0)).to(device).eval()
    sched = sampling_scheduler(build_noise_scheduler(cfg.model), "ddim")
    steps = 5 if args.smoke else 50
    autocast = torch.autocast("cuda", torch.bfloat16) if device == "cuda" else torch.no_grad()
    with torch.no_grad(), autocast:
        generate(unet, sched, None, steps, num_samples=batch)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(2 if args.smoke else 4):
            generate(unet, sched, None, steps, num_samples=batch)
        if device == "cuda":
            torch.cuda.synchronize()
    per_s = (2 if args.smoke else 4) * batch / (time.perf_counter() - start)
    return {"sample_images_per_s": per_s, "sample_steps": steps, "sample_batch": batch}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; runs on a CPU")
    parser.add_argument("--out", default="gpu_check.json")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.warmup = 20, 10
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        print("no GPU here: this check measures a GPU (use --smoke for a CPU run)")
        return 2
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    started, out = time.time(), {"device": torch.cuda.get_device_name() if device == "cuda"
                                 else "cpu"}  # fmt: skip
    for part in (lambda: training(args, device), lambda: embedding(args),
                 lambda: sampling(args, device)):  # fmt: skip
        out.update(part())
        print(json.dumps(out, indent=1), flush=True)
    out["seconds"] = round(time.time() - started, 1)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"\nwritten {args.out} in {out['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
