"""The per-worker training function of every training stage (Ray Train V2, DDP).

Each worker reads only its shard (`get_dataset_shard`), builds the model from the job's
`ModelSource` and the loss from its `LossSpec`, resumes from `ray.train.get_checkpoint()` when
there is one, and runs `core.train_step` on a seeded `IndexStream`. Every worker calls
`ray.train.report` at the same steps (it is a barrier); rank 0 attaches the checkpoint.
`ScalingConfig(num_workers=0)` runs the same function in the driver process.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray.train
import torch

from dedt_ray.config import TrainConfig
from dedt_ray.diffusion.core import (
    LossConfig,
    Precision,
    build_lr_scheduler,
    build_optimizer,
    count_step_flops,
    iterate_micro_batches,
    train_step,
)
from dedt_ray.diffusion.infobatch import InfoBatchStream
from dedt_ray.diffusion.job import TrainJob, TrainLoss, WorkerInfo
from dedt_ray.diffusion.models import build_noise_scheduler
from dedt_ray.diffusion.state import checkpoint_dirs, load_state, save_state
from dedt_ray.diffusion.stream import IndexStream
from dedt_ray.runtime import use_actor_threads

log = logging.getLogger("dedt_ray")


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of a rank's noise/timestep/label-dropout generator at one step."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0] >> 1)


# -- data ----------------------------------------------------------------------------------
@dataclass
class Shard:
    """This worker's rows on its device, the index stream over them, and loss weights."""

    x: torch.Tensor  # uint8 NCHW images or float latents, sorted by id
    labels: torch.Tensor
    loss_weights: torch.Tensor | None
    stream: IndexStream | InfoBatchStream
    rows_per_rank: list[int]
    pixels: bool

    def batch(self, idx: np.ndarray, device: torch.device) -> torch.Tensor:
        x = self.x[torch.from_numpy(idx).to(self.x.device)].to(device, non_blocking=True)
        return x.float() / 127.5 - 1.0 if self.pixels else x.float()


def read_shard(shard: Any, pixels: bool) -> tuple[torch.Tensor, np.ndarray, np.ndarray | None]:
    """This worker's rows (its shard only), sorted by id: x, labels, row weights or None."""
    ids, labels, xs, weights = [], [], [], []
    for batch in shard.iter_batches(batch_size=4096, batch_format="numpy"):
        ids.append(batch["id"].astype(str))
        labels.append(batch["label"])
        xs.append(batch["x"])
        if "weight" in batch:
            weights.append(batch["weight"])
    if not ids:
        raise RuntimeError("this worker's dataset shard is empty (more workers than rows?)")
    order = np.argsort(np.concatenate(ids), kind="stable")
    tensor = torch.from_numpy(np.ascontiguousarray(np.concatenate(xs)[order]))
    if pixels:  # uint8 NHWC kept as is (4x smaller); converted per batch
        tensor = tensor.permute(0, 3, 1, 2).contiguous()
    w = np.concatenate(weights)[order] if weights else None
    return tensor, np.concatenate(labels)[order], w


def load_shard(job: TrainJob, rank: int, world: int, device: torch.device, dist: Any) -> Shard:
    """Read the shard, count rows per rank, and build the stream and the loss weights."""
    x, labels, row_weights = read_shard(ray.train.get_dataset_shard("train"), job.pixels)
    rows = [len(labels)]
    if dist is not None:  # rows per rank, to show (and test) that each worker got only its shard
        sizes = torch.zeros(world, dtype=torch.long, device=device)
        sizes[rank] = len(labels)
        dist.all_reduce(sizes)
        rows = sizes.tolist()
    if device.type == "cuda" and x.numel() * x.element_size() <= 2**30:
        x = x.to(device)  # small datasets live on the GPU
    class_w = np.asarray(job.sampling_weights) if job.sampling_weights is not None else None
    loss_w = None
    if job.loss_class_weights is not None:
        loss_w = np.asarray(job.loss_class_weights, np.float32)[labels]
    if row_weights is not None:
        loss_w = row_weights if loss_w is None else loss_w * row_weights
    return Shard(
        x=x,
        labels=torch.from_numpy(labels).to(device),
        loss_weights=torch.from_numpy(loss_w).to(device) if loss_w is not None else None,
        stream=make_stream(job, labels, rows, rank, world, class_w),
        rows_per_rank=rows,
        pixels=job.pixels,
    )


def make_stream(
    job: TrainJob, labels: np.ndarray, rows: list[int], rank: int, world: int, class_w: Any
) -> IndexStream | InfoBatchStream:
    """The rank's draws: a seeded index stream, or InfoBatch's pruned epochs over the global
    score table (this rank's rows are global rows `sum(rows[:rank]) ..`)."""
    tc = job.train_cfg
    if not tc.infobatch.enabled:
        return IndexStream(labels, job.seed, rank, class_w)
    ib = tc.infobatch
    per_rank = tc.batch_size // world
    return InfoBatchStream(
        labels, sum(rows[:rank]), sum(rows), per_rank, world, ib.ratio, ib.anneal,
        float(tc.epochs), job.seed, rank, class_w,
    )  # fmt: skip


# -- model and optimisation state ----------------------------------------------------------
@dataclass
class Training:
    """The model and everything a checkpoint restores."""

    unet: torch.nn.Module
    ema: Any  # diffusers EMAModel on rank 0, else None
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    precision: Precision
    loss: TrainLoss
    flops_per_step: int
    step: int = 0
    images_seen: int = 0
    wall: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_at: list[int] = field(default_factory=list)
    stopped: str | None = None  # why training ended before train.steps (train.until)
    curve_steps: list[int] = field(default_factory=list)  # steps sent to the curve scorer
    curve_in_turn: bool | None = None  # the scorer's answer at the first submission


def build_training(job: TrainJob, shard: Shard, worker: WorkerInfo, rank: int) -> Training:
    """The model from the job's source, optimizer, schedule, EMA (rank 0) and loss."""
    from diffusers.training_utils import EMAModel

    tc = job.train_cfg
    torch.manual_seed(job.seed)
    unet = job.source.build(job.model_cfg, job.spec).to(worker.device).train()
    micro = tc.batch_size // worker.world // tc.grad_accum
    sample = np.arange(micro) % len(shard.labels)
    labels = shard.labels[torch.from_numpy(sample).to(worker.device)]
    flops = count_step_flops(
        unet,
        build_noise_scheduler(job.model_cfg),
        shard.batch(sample, worker.device),
        labels if job.spec.num_classes > 0 else None,
    )
    optimizer = build_optimizer(unet, tc.lr, tc.weight_decay)
    return Training(
        unet=unet,
        ema=EMAModel(unet.parameters(), decay=tc.ema_decay) if rank == 0 else None,
        optimizer=optimizer,
        lr_scheduler=build_lr_scheduler(optimizer, tc.lr_schedule, tc.warmup_steps, tc.steps),
        precision=Precision(tc.mixed_precision, worker.device.type),
        loss=job.loss.build(worker),
        flops_per_step=flops * tc.grad_accum * worker.world,
    )


def state_dict(
    run: Training, stream: IndexStream | InfoBatchStream, job: TrainJob
) -> dict[str, Any]:
    """The checkpoint: every tensor in safetensors, the rest in JSON (diffusion.state)."""
    return {
        "model": run.unet.state_dict(),
        "ema": run.ema.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "lr_scheduler": run.lr_scheduler.state_dict(),
        "scaler": run.precision.scaler.state_dict() if run.precision.scaler else None,
        "stream": {  # numpy arrays (InfoBatch's score table) as tensors
            k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v
            for k, v in stream.state_dict().items()
        },
        "rng": {"torch": torch.get_rng_state()},
        "step": run.step,
        "images_seen": run.images_seen,
        "wall": run.wall,
        "flops_per_step": run.flops_per_step,
        "history": run.history,
        "resumed_at": run.resumed_at,
        "fingerprint": job.fingerprint,
        "loss": run.loss.state_dict(),
        "spec": job.spec.to_dict(),
        "stopped": run.stopped,
        "curve_steps": run.curve_steps,
    }


def restore(
    run: Training,
    stream: IndexStream | InfoBatchStream,
    job: TrainJob,
    device: torch.device,
    rank: int,
) -> None:
    """Continue from `ray.train.get_checkpoint()` (local mode: the newest checkpoint in
    `job.checkpoints`) when there is one."""
    checkpoint = ray.train.get_checkpoint() or newest_checkpoint(job.checkpoints)
    if checkpoint is None:
        return
    state = load_resumable(checkpoint, rank)
    if state is None:
        return
    if state["fingerprint"] != job.fingerprint:
        raise RuntimeError("the checkpoint to resume was written for another config")
    run.unet.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.lr_scheduler.load_state_dict(state["lr_scheduler"])
    if run.precision.scaler is not None and state["scaler"]:
        run.precision.scaler.load_state_dict(state["scaler"])
    if run.ema is not None:
        run.ema.load_state_dict(state["ema"])
        run.ema.to(device)
    stream.load_state_dict(state["stream"])
    run.loss.load_state_dict(state["loss"])
    torch.set_rng_state(state["rng"]["torch"])
    run.step, run.images_seen, run.wall = state["step"], state["images_seen"], state["wall"]
    run.history, run.resumed_at = state["history"], [*state["resumed_at"], run.step]
    run.curve_steps = list(state.get("curve_steps") or [])
    if rank == 0:
        log.info("train: resumed at step %d/%d", run.step, job.train_cfg.steps)


def newest_checkpoint(uri: str | None) -> ray.train.Checkpoint | None:
    """The newest `checkpoint_<step>` folder under `uri` (local mode's checkpoints), if any."""
    import pyarrow.fs as pafs

    if uri is None:
        return None
    fs, root = pafs.FileSystem.from_uri(uri)
    names = _checkpoint_names(fs, root)
    return ray.train.Checkpoint(f"{root}/{names[-1]}", fs) if names else None


def _checkpoint_names(fs: Any, root: str) -> list[str]:
    """The `checkpoint_<step>` folder names under `root` on `fs`, oldest first."""
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    return checkpoint_dirs([i.base_name for i in infos])


def persist_checkpoint(directory: str, uri: str, name: str, keep: int) -> None:
    """Local mode: copy the checkpoint `directory` to `<uri>/<name>`, then delete all but the
    newest `keep` checkpoints there (as Ray Train does for its workers' checkpoints)."""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(uri)
    fs.create_dir(f"{root}/{name}", recursive=True)
    pafs.copy_files(directory, f"{root}/{name}", destination_filesystem=fs)
    for old in _checkpoint_names(fs, root)[:-keep]:
        fs.delete_dir(f"{root}/{old}")


def load_resumable(checkpoint: ray.train.Checkpoint, rank: int) -> dict[str, Any] | None:
    """The state of `checkpoint`, else of the newest older checkpoint beside it that loads
    (a truncated or damaged one is skipped with a warning); None when none loads."""
    import posixpath

    fs, path = checkpoint.filesystem, checkpoint.path.rstrip("/")
    parent = posixpath.dirname(path)
    names = _checkpoint_names(fs, parent)
    newest = posixpath.basename(path)
    older = names[: names.index(newest)] if newest in names else names
    for candidate in [path, *(posixpath.join(parent, n) for n in reversed(older))]:
        try:
            with ray.train.Checkpoint(candidate, fs).as_directory() as directory:
                return load_state(directory)
        except Exception as exc:  # truncated safetensors, missing file, bad JSON
            if rank == 0:
                log.warning("train: checkpoint %s does not load (%s); trying an older one",
                            candidate, type(exc).__name__)  # fmt: skip
    if rank == 0:
        log.warning("train: no checkpoint of %s loads; starting from step 0", parent)
    return None


# -- the loop ------------------------------------------------------------------------------
@dataclass
class Window:
    """Steps since the last report: their summed loss and wall time."""

    loss: torch.Tensor
    start: float = field(default_factory=time.perf_counter)
    steps: int = 0


def train_loop(config: dict[str, Any]) -> None:
    """The per-worker training function (also runs in-process with num_workers=0)."""
    import torch.distributed as torch_dist

    job: TrainJob = config["job"]
    tc = job.train_cfg
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    _set_threads(tc, ctx.get_local_world_size(), job.local)
    device = _device(job)
    distributed = world > 1 and torch_dist.is_available() and torch_dist.is_initialized()
    dist = torch_dist if distributed else None
    shard = load_shard(job, rank, world, device, dist)
    run = build_training(job, shard, WorkerInfo(device, world, distributed), rank)
    restore(run, shard.stream, job, device, rank)
    model = run.unet
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        ddp_kwargs = {"device_ids": [device.index]} if device.type == "cuda" else {}
        model = DistributedDataParallel(run.unet, **ddp_kwargs)
    loss_cfg = LossConfig(
        label_dropout=job.model_cfg.label_dropout if job.spec.num_classes > 0 else 0.0,
        null_class=job.spec.null_class,
        min_snr_gamma=tc.min_snr_gamma,
        t_range=tuple(job.t_range) if job.t_range else None,
    )
    step_fn = Stepper(job, run, shard, model, loss_cfg, rank, world, device)
    window = Window(torch.zeros((), device=device))
    local_ckpt: list[str] = []
    while run.step < tc.steps and not getattr(shard.stream, "done", False):
        _maybe_fail(tc, run.step + 1, rank)
        window.loss += step_fn()
        window.steps += 1
        last = run.step == tc.steps or getattr(shard.stream, "done", False)
        stop = curve_step(job, run, window, last, rank, dist, device)
        log_now = run.step % tc.log_every == 0 or last or stop
        save_now = run.step % tc.checkpoint_every == 0 or last or stop
        if log_now or save_now:
            now = report(job, run, shard, window, log_now, save_now, rank, world, dist, local_ckpt)
            window = Window(torch.zeros((), device=device), start=now)
        if stop:
            break


# -- quality along training ---------------------------------------------------------------
def submit_curve(job: TrainJob, run: Training, window: Window) -> None:
    """Rank 0: the EMA weights at this step to the curve scorer. The first submission asks
    whether it scores in turn: when it shares this trainer's CPU cores, each point is scored
    before training goes on; otherwise training goes on at once."""
    assert job.curve is not None and run.ema is not None
    weights = {k: v.detach().cpu().clone() for k, v in run.unet.state_dict().items()}
    for (name, _), shadow in zip(run.unet.named_parameters(), run.ema.shadow_params, strict=True):
        weights[name] = shadow.detach().cpu().clone()
    point = {
        "step": run.step,
        "images_seen": run.images_seen,
        "flops": run.flops_per_step * run.step,
        "offset": job.curve.flops_offset,
        "wall_s": run.wall + time.perf_counter() - window.start,
    }
    scorer = job.curve.scorer
    scored = scorer.submit.remote(point, weights, job.source, job.curve.key)
    run.curve_steps.append(run.step)
    if run.curve_in_turn is None:
        run.curve_in_turn = bool(ray.get(scorer.status.remote())["in_turn"])
    if run.curve_in_turn:
        ray.get(scored)


def curve_step(
    job: TrainJob, run: Training, window: Window, last: bool, rank: int, dist: Any,
    device: torch.device,
) -> bool:  # fmt: skip
    """At an evaluation step (every `curve.every` steps and the `last`: the step ceiling, or
    the end of an epoch budget): submit (rank 0) and, with `until_converged`, whether every
    rank stops here (rank 0 asks the scorer and broadcasts its answer)."""
    curve = job.curve
    if curve is None or (run.step % curve.every and not last):
        return False
    if rank == 0:
        submit_curve(job, run, window)
    if not curve.until_converged:
        return False
    verdict = torch.zeros((), device=device)
    if rank == 0:
        status = ray.get(curve.scorer.status.remote())
        if status["stop"]:
            verdict += 1
            run.stopped = status["why"]
            log.info("train: stopping at step %d: %s", run.step, status["why"])
    if dist is not None:
        dist.broadcast(verdict, src=0)
    return bool(verdict.item())


@dataclass
class Stepper:
    """One optimizer step over this rank's share of the global batch."""

    job: TrainJob
    run: Training
    shard: Shard
    model: torch.nn.Module
    loss_cfg: LossConfig
    rank: int
    world: int
    device: torch.device

    def __post_init__(self) -> None:
        tc = self.job.train_cfg
        self.per_rank = tc.batch_size // self.world
        self.micro = self.per_rank // tc.grad_accum
        self.scheduler = build_noise_scheduler(self.job.model_cfg)
        self.generator = torch.Generator(device=self.device)
        self.with_labels = self.job.spec.num_classes > 0 or self.job.loss.needs_labels
        import torch.distributed as torch_dist

        self.dist = torch_dist if self.world > 1 and torch_dist.is_initialized() else None

    def record_scores(self, idx: np.ndarray) -> None:
        """InfoBatch: this step's per-sample losses into every rank's score table."""
        stream, loss = self.shard.stream, self.run.loss
        losses = torch.cat(loss.recorded)
        loss.recorded.clear()
        rows = torch.from_numpy(idx + stream.offset)
        stream.record(*gather_scores(rows, losses, self.dist, self.world))

    def __call__(self) -> torch.Tensor:
        run, shard, tc = self.run, self.shard, self.job.train_cfg
        pruned = isinstance(shard.stream, InfoBatchStream)
        if pruned:  # the lr follows the epochs done, not the (fewer) steps
            run.lr_scheduler.last_epoch = int(shard.stream.progress * tc.steps) - 1
            idx, ib_weights = shard.stream.next()
        else:
            idx = shard.stream.next(self.per_rank)
        idx_dev = torch.from_numpy(idx).to(self.device)
        x0 = shard.batch(idx, self.device)
        if tc.hflip:  # from its own seeded draw: the noise draw stays as without flips
            x0 = random_hflip(x0, step_seed(self.job.seed + 1, self.rank, run.step))
        y = shard.labels[idx_dev] if self.with_labels else None
        w = shard.loss_weights[idx_dev] if shard.loss_weights is not None else None
        if pruned:
            ib = torch.from_numpy(ib_weights).to(self.device)
            w = ib if w is None else w * ib
        self.generator.manual_seed(step_seed(self.job.seed, self.rank, run.step))
        loss = train_step(
            self.model, self.scheduler, run.optimizer, run.lr_scheduler,
            list(iterate_micro_batches(x0, y, w, self.micro)),
            self.generator, self.loss_cfg, tc.grad_clip, run.precision, loss_fn=run.loss,
        )  # fmt: skip
        if pruned:
            self.record_scores(idx)
        if run.ema is not None:
            run.ema.step(run.unet.parameters())
        run.step += 1
        run.loss.after_step(run.step)
        run.images_seen += self.per_rank * self.world
        return loss


def random_hflip(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Each image of the NCHW batch flipped left-right with probability 1/2 (seeded)."""
    flip = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(seed)) < 0.5
    return torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)


def gather_scores(
    rows: torch.Tensor, losses: torch.Tensor, dist: Any, world: int
) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's (global rows, per-sample losses) of this step, on every rank."""
    if dist is None:
        return rows.cpu().numpy(), losses.cpu().numpy()
    both = torch.stack([rows.to(losses.device, torch.float64), losses.double()])
    out = torch.empty((world, *both.shape), dtype=both.dtype, device=both.device)
    dist.all_gather_into_tensor(out, both)
    out = out.cpu()
    return out[:, 0].reshape(-1).long().numpy(), out[:, 1].reshape(-1).numpy()


def report(
    job: TrainJob,
    run: Training,
    shard: Shard,
    window: Window,
    log_now: bool,
    save_now: bool,
    rank: int,
    world: int,
    dist: Any,
    local_ckpt: list[str],
) -> float:
    """Metrics of the window (+ the checkpoint on rank 0) to `ray.train.report`; returns the
    time the next window starts from (a window also pays the previous report and checkpoint)."""
    tc = job.train_cfg
    if dist is not None:
        dist.all_reduce(window.loss)
        window.loss /= world
    now = time.perf_counter()
    seconds = now - window.start
    run.wall += seconds
    metrics = {
        "step": run.step,
        "loss": float(window.loss) / window.steps,
        "lr": float(run.lr_scheduler.get_last_lr()[0]),
        "images_per_s": window.steps * tc.batch_size / max(seconds, 1e-9),  # global batch
        "images_seen": run.images_seen,
        "flops": run.flops_per_step * run.step,
        "flops_per_step": run.flops_per_step,
        "epoch": shard.stream.epoch,
        "wall": run.wall,
    }
    if log_now:
        run.history.append(dict(metrics))
        if rank == 0 and job.on_report is None:  # else the driver shows it (`on_report`)
            log.info(
                "train: step %d/%d loss %.4f lr %.2e %.0f img/s seen %d epoch %.2f",
                run.step, tc.steps, metrics["loss"], metrics["lr"], metrics["images_per_s"],
                run.images_seen, shard.stream.epoch,
            )  # fmt: skip
    ckpt, name = None, f"checkpoint_{run.step:08d}" if save_now else None
    if save_now and rank == 0:
        directory = tempfile.mkdtemp(prefix="dedt-ckpt-")
        save_state(directory, state_dict(run, shard.stream, job))
        ckpt = ray.train.Checkpoint.from_directory(directory)
        if job.local:  # nothing uploads it: persisted here; the newest local copy is kept
            if job.checkpoints:
                persist_checkpoint(directory, job.checkpoints, name, tc.keep_checkpoints)
            for old in local_ckpt:
                shutil.rmtree(old, ignore_errors=True)
            local_ckpt[:] = [directory]
    metrics["shard_rows"] = shard.rows_per_rank
    if job.on_report is not None:
        job.on_report(metrics)
    ray.train.report(
        metrics,
        checkpoint=ckpt,
        checkpoint_dir_name=name,
        delete_local_checkpoint_after_upload=(ckpt is not None and not job.local),
    )
    return now


# -- worker environment --------------------------------------------------------------------
def _device(job: TrainJob) -> torch.device:
    if not job.use_gpu or not torch.cuda.is_available():
        return torch.device("cpu")
    if job.local:
        return torch.device("cuda")
    import ray.train.torch

    return ray.train.torch.get_device()


def _set_threads(tc: TrainConfig, local_world: int, local: bool) -> None:
    """`train.threads_per_worker`, else (a Ray Train worker) the node's cores shared among its
    workers; in-process training without the key keeps torch's setting."""
    if tc.threads_per_worker is not None or not local:
        use_actor_threads(tc.threads_per_worker, local_world)


def _maybe_fail(tc: TrainConfig, step: int, rank: int) -> None:
    """Testing hook: raise once at `train.fail_at_step` while `train.fail_flag` exists."""
    if tc.fail_at_step == step and rank == 0 and tc.fail_flag and os.path.exists(tc.fail_flag):
        os.remove(tc.fail_flag)
        raise RuntimeError(f"injected failure at step {step} (train.fail_flag)")
