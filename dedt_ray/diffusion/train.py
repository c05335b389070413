"""Stage `train`: the diffusion trainer on Ray Train V2 (TorchTrainer, DDP) — the thin shell.

Driver: resolve inputs (source images or latents; the `select` subset and `reweight` class
weights when those stages ran), materialise the training rows once in the object store,
run `TorchTrainer(train_loop, datasets={"train": rows})`, then export the final EMA model
and the metrics history. Workers: each reads only its shard (`get_dataset_shard`), builds
the model, resumes from `ray.train.get_checkpoint()` when there is one, and runs
`core.train_step` with a seeded `IndexStream`; rank 0 attaches checkpoints to the
`ray.train.report` calls every worker makes at the same steps.

Checkpoints live under `<run>/_ray/train-<key>` while a run is in progress, so rerunning a
crashed stage with the same config resumes it; after success they move to
`<run>/train/checkpoints`.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.dataset as pads  # noqa: E402
import pyarrow.fs as pafs  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402
import ray.data  # noqa: E402
import ray.train  # noqa: E402
import torch  # noqa: E402

from dedt_ray.config import Config, ModelConfig, TrainConfig, hash_json  # noqa: E402
from dedt_ray.diffusion.core import (  # noqa: E402
    LossConfig,
    Precision,
    build_lr_scheduler,
    build_optimizer,
    count_step_flops,
    iterate_micro_batches,
    train_step,
)
from dedt_ray.diffusion.models import ModelSpec, build_noise_scheduler, build_unet  # noqa: E402
from dedt_ray.diffusion.state import load_state, save_state  # noqa: E402
from dedt_ray.diffusion.stream import IndexStream  # noqa: E402
from dedt_ray.store import RunStore  # noqa: E402

log = logging.getLogger("dedt_ray")

SCORES = ("select", "scores.parquet")
CLASS_WEIGHTS = ("reweight", "class_weights.json")
LATENTS = ("latents", "latents.parquet")
LATENT_INFO = ("latents", "info.json")
# extra ray.train UserCallbacks of the train stage's trainer (a sweep trial sets them)
TRAIN_CALLBACKS: list[Any] = []
# train.* fields that do not change what is trained (excluded from the resume key)
OPERATIONAL = {
    "num_workers", "use_gpu", "cpus_per_worker", "threads_per_worker", "checkpoint_every",
    "keep_checkpoints", "max_failures", "log_every", "fail_at_step", "fail_flag",
}  # fmt: skip


# -- inputs ------------------------------------------------------------------------------
def read_class_weights(obj: dict[str, Any], num_classes: int) -> np.ndarray:
    """`{"weights": {"<label int>": float, ...}, ...}` -> probabilities [num_classes].

    Every label 0..num_classes-1 must be present exactly once; weights finite and >= 0 with
    a positive sum. Other top-level keys are ignored.
    """
    weights = obj.get("weights") if isinstance(obj, dict) else None
    if not isinstance(weights, dict):
        raise ValueError('class weights: expected {"weights": {"<label>": float, ...}}')
    out = np.full(num_classes, np.nan)
    for key, value in weights.items():
        try:
            label = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"class weights: label {key!r} is not an integer") from None
        if str(label) != str(key).strip() or not 0 <= label < num_classes:
            raise ValueError(f"class weights: label {key!r} not in 0..{num_classes - 1}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"class weights: weight of {key} is not a number: {value!r}")
        out[label] = float(value)
    missing = np.flatnonzero(np.isnan(out))
    if len(missing):
        raise ValueError(f"class weights: no weight for labels {missing.tolist()}")
    if not np.isfinite(out).all() or (out < 0).any() or out.sum() <= 0:
        raise ValueError(f"class weights must be finite, >= 0, not all 0: {out.tolist()}")
    return out / out.sum()


def read_selection(store: RunStore) -> pa.Table:
    """Rows kept by the select stage: id, label (+ weight when the scores carry one)."""
    table = pads.dataset(store.uri(store.path(*SCORES)), format="parquet").to_table()
    missing = {"id", "label", "kept"} - set(table.column_names)
    if missing:
        raise ValueError(f"{store.path(*SCORES)} lacks columns {sorted(missing)}")
    table = table.filter(pa.compute.equal(table.column("kept"), True))
    columns = ["id", "label"] + (["weight"] if "weight" in table.column_names else [])
    return table.select(columns)


@dataclass
class Inputs:
    """What the train stage reads besides the config, and the upstream outputs it used."""

    selection: pa.Table | None = None
    class_weights: dict[str, Any] | None = None  # class_weights.json, parsed later
    used: dict[str, str] = field(default_factory=dict)  # stage -> its manifest output_id


def resolve_inputs(cfg: Config, store: RunStore) -> Inputs:
    """Use `select` / `reweight` outputs when their stages completed in this run directory."""
    inputs = Inputs()
    select = store.manifest("select")
    if select is not None and cfg.select.enabled and store.exists(*SCORES):
        inputs.selection = read_selection(store)
        inputs.used["select"] = select["output_id"]
    reweight = store.manifest("reweight")
    if reweight is not None and cfg.reweight.enabled and store.exists(*CLASS_WEIGHTS):
        inputs.class_weights = store.read_json(*CLASS_WEIGHTS)
        inputs.used["reweight"] = reweight["output_id"]
    if cfg.model.latent:
        latents = store.manifest("latents")
        if latents is None:
            raise RuntimeError("model.latent needs the latents stage first: `dedt-ray latents`")
        inputs.used["latents"] = latents["output_id"]
    return inputs


def _prepare_rows(
    batch: dict[str, np.ndarray],
    column: str,
    shape: tuple[int, ...],
    keep: np.ndarray | None,
    keep_weights: np.ndarray | None,
) -> dict[str, np.ndarray]:
    """Keep the selected ids; bring the training column to `x` of `shape` per row."""
    ids = np.asarray(batch["id"]).astype(str)
    mask = np.ones(len(ids), bool) if keep is None else np.isin(ids, keep)
    x = np.asarray(batch[column])
    if x.dtype == object:
        x = np.stack(list(x))
    x = x[mask].reshape((-1, *shape))
    out = {"id": ids[mask], "label": np.asarray(batch["label"], np.int64)[mask], "x": x}
    if keep_weights is not None:
        out["weight"] = keep_weights[np.searchsorted(keep, out["id"])].astype(np.float32)
    return out


def training_rows(
    cfg: Config, store: RunStore, selection: pa.Table | None
) -> tuple[ray.data.Dataset, np.ndarray, list[str] | None, dict[str, Any]]:
    """(materialised rows: id, label, x [, weight]), labels, class names, data info."""
    from dedt_ray.data import open_source

    if cfg.model.latent:
        info = store.read_json(*LATENT_INFO)
        ds = ray.data.read_parquet(store.uri(store.path(*LATENTS)))
        column, shape, classes = "latent", tuple(info["shape"]), info.get("classes")
        data_info = {"latent_shape": info["shape"], "scaling_factor": info["scaling_factor"]}
    else:
        source = open_source(cfg.data)
        channels = 1 if cfg.data.mode == "L" else 3
        size = cfg.data.image_size
        ds, column, classes = source.dataset, "image", source.classes
        shape, data_info = (size, size, channels), {}
    keep = keep_weights = None
    if selection is not None:
        order = np.argsort(np.asarray(selection.column("id").to_pylist(), dtype=str))
        keep = np.asarray(selection.column("id").to_pylist(), dtype=str)[order]
        if "weight" in selection.column_names:
            keep_weights = selection.column("weight").to_numpy()[order]
    ds = ds.map_batches(
        _prepare_rows,
        fn_kwargs={"column": column, "shape": shape, "keep": keep, "keep_weights": keep_weights},
        batch_format="numpy",
    ).materialize()
    labels = np.concatenate(
        [b["label"] for b in ds.select_columns(["label"]).iter_batches(batch_format="numpy")]
        or [np.zeros(0, np.int64)]
    )
    if len(labels) == 0:
        raise ValueError("no training rows (empty source or empty selection)")
    return ds, labels, classes, {"shape": list(shape), **data_info}


# -- the job a worker receives -----------------------------------------------------------
@dataclass
class TrainJob:
    """Everything a worker needs, as plain values (the train_loop_config)."""

    model: dict[str, Any]
    train: dict[str, Any]
    spec: dict[str, Any]
    seed: int
    fingerprint: str
    sampling_weights: list[float] | None = None  # class sampling probabilities
    loss_class_weights: list[float] | None = None  # per-class loss multipliers
    t_range: tuple[int, int] | None = None
    init_unet: str | None = None  # start from a diffusers UNet folder instead of scratch
    dro: dict[str, Any] | None = None  # DoReMi proxy: reference, num_classes, eta, smoothing
    pixels: bool = True  # rows are uint8 HWC images (else float CHW latents)
    local: bool = False  # ScalingConfig(num_workers=0): in the driver process
    use_gpu: bool = False

    @property
    def model_cfg(self) -> ModelConfig:
        return ModelConfig.model_validate(self.model)

    @property
    def train_cfg(self) -> TrainConfig:
        return TrainConfig.model_validate(self.train)

    @property
    def model_spec(self) -> ModelSpec:
        spec = {k: v for k, v in self.spec.items() if k != "null_class"}
        return ModelSpec(**spec)


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of a rank's noise/timestep/label-dropout generator at one step."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0] >> 1)


def load_shard(shard: Any, pixels: bool) -> tuple[torch.Tensor, np.ndarray, np.ndarray | None]:
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
    x = np.concatenate(xs)[order]
    tensor = torch.from_numpy(np.ascontiguousarray(x))
    if pixels:  # uint8 NHWC kept as is (4x smaller); converted per batch
        tensor = tensor.permute(0, 3, 1, 2).contiguous()
    w = np.concatenate(weights)[order] if weights else None
    return tensor, np.concatenate(labels)[order], w


def _to_model_input(x: torch.Tensor, pixels: bool, device: torch.device) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.float() / 127.5 - 1.0 if pixels else x.float()


def _device(job: TrainJob) -> torch.device:
    if not job.use_gpu or not torch.cuda.is_available():
        return torch.device("cpu")
    if job.local:
        return torch.device("cuda")
    import ray.train.torch

    return ray.train.torch.get_device()


def _set_threads(tc: TrainConfig, local_world: int, local: bool) -> None:
    if tc.threads_per_worker is not None:
        torch.set_num_threads(tc.threads_per_worker)
    elif not local:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(max(1, (cpus or 1) // max(1, local_world)))


def _maybe_fail(tc: TrainConfig, step: int, rank: int) -> None:
    """Testing hook: raise once at `train.fail_at_step` while `train.fail_flag` exists."""
    if tc.fail_at_step == step and rank == 0 and tc.fail_flag and os.path.exists(tc.fail_flag):
        os.remove(tc.fail_flag)
        raise RuntimeError(f"injected failure at step {step} (train.fail_flag)")


def train_loop(config: dict[str, Any]) -> None:
    """The per-worker training function (also runs in-process with num_workers=0)."""
    import torch.distributed as dist
    from diffusers import UNet2DModel
    from diffusers.training_utils import EMAModel
    from torch.nn.parallel import DistributedDataParallel

    job = TrainJob(**config)
    tc, mc, spec = job.train_cfg, job.model_cfg, job.model_spec
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    _set_threads(tc, ctx.get_local_world_size(), job.local)
    device = _device(job)
    distributed = world > 1 and dist.is_available() and dist.is_initialized()

    x_all, labels_all, row_weights = load_shard(ray.train.get_dataset_shard("train"), job.pixels)
    shard_rows = [len(labels_all)]
    if distributed:  # rows per rank, to show (and test) that each worker got only its shard
        sizes = torch.zeros(world, dtype=torch.long, device=device)
        sizes[rank] = len(labels_all)
        dist.all_reduce(sizes)
        shard_rows = sizes.tolist()
    if device.type == "cuda" and x_all.numel() * x_all.element_size() <= 2**30:
        x_all = x_all.to(device)  # small datasets live on the GPU
    per_rank = tc.batch_size // world
    micro = per_rank // tc.grad_accum
    class_w = np.asarray(job.sampling_weights) if job.sampling_weights is not None else None
    stream = IndexStream(labels_all, job.seed, rank, class_w)
    loss_w = None
    if job.loss_class_weights is not None:
        loss_w = np.asarray(job.loss_class_weights, np.float32)[labels_all]
    if row_weights is not None:
        loss_w = row_weights if loss_w is None else loss_w * row_weights
    loss_w_t = torch.from_numpy(loss_w).to(device) if loss_w is not None else None
    labels_t = torch.from_numpy(labels_all).to(device)
    conditional = spec.num_classes > 0
    loss_cfg = LossConfig(
        label_dropout=mc.label_dropout if conditional else 0.0,
        null_class=spec.null_class,
        min_snr_gamma=tc.min_snr_gamma,
        t_range=tuple(job.t_range) if job.t_range else None,
    )

    torch.manual_seed(job.seed)
    if job.init_unet and os.path.isfile(os.path.join(job.init_unet, "pruned.json")):
        from dedt_ray.tdc.pruning import load_pruned  # a TDC-pruned UNet (stage `tdc`)

        unet = load_pruned(job.init_unet)
    elif job.init_unet:
        unet = UNet2DModel.from_pretrained(job.init_unet)
    else:
        unet = build_unet(mc, spec)
    unet.to(device).train()
    noise_scheduler = build_noise_scheduler(mc)
    dro = None
    if job.dro is not None:  # DoReMi proxy: Group DRO against a frozen reference model
        from dedt_ray.reweight.dro import DROLoss

        dro = DROLoss.from_job(job.dro, device, world, distributed)
    sample_idx = torch.arange(micro) % len(labels_all)
    flops_per_step = (
        count_step_flops(
            unet,
            noise_scheduler,
            _to_model_input(x_all[sample_idx.to(x_all.device)], job.pixels, device),
            labels_t[sample_idx.to(device)] if conditional else None,
        )
        * tc.grad_accum
        * world
    )
    optimizer = build_optimizer(unet, tc.lr, tc.weight_decay)
    lr_scheduler = build_lr_scheduler(optimizer, tc.lr_schedule, tc.warmup_steps, tc.steps)
    precision = Precision(tc.mixed_precision, device.type)
    ema = EMAModel(unet.parameters(), decay=tc.ema_decay) if rank == 0 else None
    step, images_seen, wall, history, resumed_at = 0, 0, 0.0, [], []

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_state(directory)
        if state["fingerprint"] != job.fingerprint:
            raise RuntimeError("the checkpoint to resume was written for another config")
        unet.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        if precision.scaler is not None and state["scaler"]:
            precision.scaler.load_state_dict(state["scaler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
            ema.to(device)
        stream.load_state_dict(state["stream"])
        if dro is not None:
            dro.load_state_dict(state["dro"])
        torch.set_rng_state(state["rng"]["torch"])
        step, images_seen, wall = state["step"], state["images_seen"], state["wall"]
        history, resumed_at = state["history"], [*state["resumed_at"], step]
        if rank == 0:
            log.info("train: resumed at step %d/%d", step, tc.steps)

    model = unet
    if distributed:
        ddp_kwargs = {"device_ids": [device.index]} if device.type == "cuda" else {}
        model = DistributedDataParallel(unet, **ddp_kwargs)
    generator = torch.Generator(device=device)
    global_batch = per_rank * world
    window_start, window_steps = time.perf_counter(), 0
    window_loss = torch.zeros((), device=device)
    local_ckpt: str | None = None

    while step < tc.steps:
        _maybe_fail(tc, step + 1, rank)
        idx = torch.from_numpy(stream.next(per_rank))
        idx_dev = idx.to(x_all.device)
        x0 = _to_model_input(x_all[idx_dev], job.pixels, device)
        y = labels_t[idx.to(device)] if conditional or dro is not None else None
        w = loss_w_t[idx.to(device)] if loss_w_t is not None else None
        generator.manual_seed(step_seed(job.seed, rank, step))
        loss = train_step(
            model, noise_scheduler, optimizer, lr_scheduler,
            list(iterate_micro_batches(x0, y, w, micro)),
            generator, loss_cfg, tc.grad_clip, precision, loss_fn=dro,
        )  # fmt: skip
        if ema is not None:
            ema.step(unet.parameters())
        step += 1
        if dro is not None:
            dro.record(step)
        images_seen += global_batch
        window_loss += loss
        window_steps += 1

        log_now = step % tc.log_every == 0 or step == tc.steps
        save_now = step % tc.checkpoint_every == 0 or step == tc.steps
        if not (log_now or save_now):
            continue
        if distributed:
            dist.all_reduce(window_loss)
            window_loss /= world
        now = time.perf_counter()  # a window also pays the previous report and checkpoint
        seconds = now - window_start
        wall += seconds
        metrics = {
            "step": step,
            "loss": float(window_loss) / window_steps,
            "lr": float(lr_scheduler.get_last_lr()[0]),
            "images_per_s": window_steps * global_batch / max(seconds, 1e-9),
            "images_seen": images_seen,
            "flops": flops_per_step * step,
            "flops_per_step": flops_per_step,
            "epoch": stream.epoch,
            "wall": wall,
        }
        report = {**metrics, "shard_rows": shard_rows}
        if log_now:
            history.append(dict(metrics))
            if rank == 0:
                log.info(
                    "train: step %d/%d loss %.4f lr %.2e %.0f img/s seen %d epoch %.2f",
                    step, tc.steps, metrics["loss"], metrics["lr"], metrics["images_per_s"],
                    images_seen, stream.epoch,
                )  # fmt: skip
        ckpt = None
        if save_now and rank == 0:
            directory = tempfile.mkdtemp(prefix="dedt-ckpt-")
            save_state(
                directory,
                {
                    "model": unet.state_dict(),
                    "ema": ema.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "lr_scheduler": lr_scheduler.state_dict(),
                    "scaler": precision.scaler.state_dict() if precision.scaler else None,
                    "stream": stream.state_dict(),
                    "rng": {"torch": torch.get_rng_state()},
                    "step": step,
                    "images_seen": images_seen,
                    "wall": wall,
                    "flops_per_step": flops_per_step,
                    "history": history,
                    "resumed_at": resumed_at,
                    "fingerprint": job.fingerprint,
                    "dro": dro.state_dict() if dro is not None else None,
                    "spec": spec.to_dict(),
                },
            )
            ckpt = ray.train.Checkpoint.from_directory(directory)
            if job.local:  # nothing uploads it: keep the newest, drop the one before
                if local_ckpt:
                    shutil.rmtree(local_ckpt, ignore_errors=True)
                local_ckpt = directory
        ray.train.report(
            report,
            checkpoint=ckpt,
            checkpoint_dir_name=f"checkpoint_{step:08d}" if save_now else None,
            delete_local_checkpoint_after_upload=(ckpt is not None and not job.local),
        )
        window_loss.zero_()
        window_start, window_steps = now, 0


# -- the driver --------------------------------------------------------------------------
def resume_key(cfg: Config, used: dict[str, str], extra: dict[str, Any] | None = None) -> str:
    """What a checkpoint must match to be resumed: everything but operational settings."""
    train = cfg.train.model_dump(mode="json", exclude=OPERATIONAL)
    return hash_json(
        {
            "seed": cfg.seed,
            "data": cfg.data.model_dump(mode="json"),
            "model": cfg.model.model_dump(mode="json"),
            "train": train,
            "inputs": used,
            "extra": extra or {},
        }
    )


def worker_env() -> dict[str, str]:
    """Environment of the train workers: OpenMP threads sleep instead of spinning while idle.

    Spinning (the default) collapses a CPU worker's throughput 10-40x when other processes
    share its cores (measured on a busy 2-core machine: 2 threads 5-8 img/s spinning, 214-232
    sleeping); set OMP_WAIT_POLICY in the driver's environment to choose otherwise.
    """
    return {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


def fit(
    cfg: Config,
    store: RunStore,
    rows: ray.data.Dataset,
    labels: np.ndarray,
    spec: ModelSpec,
    class_weights: np.ndarray | None,
    key: str,
    out: str = "train",
    t_range: tuple[int, int] | None = None,
    init_unet: str | None = None,
    dro: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the TorchTrainer on `rows`; returns (final metrics, final checkpoint state)."""
    from ray.train.torch import TorchTrainer

    from dedt_ray.runtime import cluster_gpus

    tc = cfg.train
    use_gpu = tc.use_gpu if tc.use_gpu is not None else cluster_gpus() > 0
    sampling = loss_weights = None
    if class_weights is not None:
        if tc.class_weighting == "sampling":
            sampling = class_weights.tolist()
        else:  # importance weights: same expected gradient as sampling by class weights
            share = np.bincount(labels, minlength=len(class_weights)) / len(labels)
            loss_weights = np.where(share > 0, class_weights / np.maximum(share, 1e-12), 0.0)
            loss_weights = loss_weights.tolist()
    job = TrainJob(
        model=cfg.model.model_dump(mode="json"),
        train=tc.model_dump(mode="json"),
        spec=spec.to_dict(),
        seed=cfg.seed,
        fingerprint=key,
        sampling_weights=sampling,
        loss_class_weights=loss_weights,
        t_range=t_range,
        init_unet=init_unet,
        dro=dro,
        pixels=not spec.latent,
        local=tc.num_workers == 0,
        use_gpu=use_gpu,
    )
    resources = {"CPU": tc.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    storage = store.uri(store.path("_ray"))
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=asdict(job),
        datasets={"train": rows},
        scaling_config=ray.train.ScalingConfig(
            num_workers=tc.num_workers,
            use_gpu=use_gpu,
            resources_per_worker=resources if tc.num_workers else None,
        ),
        run_config=ray.train.RunConfig(
            name=f"{out}-{key}",
            storage_path=storage,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=tc.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
            worker_runtime_env={"env_vars": worker_env()},
            callbacks=list(TRAIN_CALLBACKS) if out == "train" else None,
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("training ended without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        state = load_state(directory)
    if job.local:  # the newest in-process checkpoint joins the Ray storage layout
        dest = store.path("_ray", f"{out}-{key}", f"checkpoint_{state['step']:08d}")
        store.fs.create_dir(dest, recursive=True)
        pafs.copy_files(result.checkpoint.path, dest, destination_filesystem=store.fs)
        shutil.rmtree(result.checkpoint.path, ignore_errors=True)
    return dict(result.metrics or {}), state


def export(
    cfg: Config,
    store: RunStore,
    state: dict[str, Any],
    spec: ModelSpec,
    classes: list[str] | None,
    out: str = "train",
) -> str:
    """The EMA weights of `state` in diffusers layout at `<run>/<out>/model`."""
    from dedt_ray.diffusion.export import load_vae, save_export

    unet = build_unet(cfg.model, spec)
    unet.load_state_dict(state["model"])
    for param, shadow in zip(unet.parameters(), state["ema"]["shadow_params"], strict=True):
        param.data.copy_(shadow)
    info = {
        **spec.to_dict(),
        "class_conditional": spec.num_classes > 0,
        "classes": classes,
        "steps": state["step"],
        "images_seen": state["images_seen"],
        "flops": state["flops_per_step"] * state["step"],
        "ema_decay": cfg.train.ema_decay,
    }
    vae = load_vae(cfg.model.vae) if spec.latent else None
    dest = store.path(out, "model")
    if store.is_local:
        save_export(dest, unet, build_noise_scheduler(cfg.model), info, vae)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            save_export(tmp, unet, build_noise_scheduler(cfg.model), info, vae)
            pafs.copy_files(tmp, dest, destination_filesystem=store.fs)
    return dest


def _keep_checkpoints(store: RunStore, key: str, out: str) -> None:
    """Move the finished run's Ray folder to `<run>/<out>/checkpoints`."""
    src, dst = store.path("_ray", f"{out}-{key}"), store.path(out, "checkpoints")
    if not store.exists("_ray", f"{out}-{key}"):
        return
    try:
        store.fs.move(src, dst)
    except (OSError, NotImplementedError):
        pafs.copy_files(src, dst, source_filesystem=store.fs, destination_filesystem=store.fs)
        store.fs.delete_dir(src)


def write_history(store: RunStore, history: list[dict[str, Any]], out: str = "train") -> None:
    """The metrics history as `<run>/<out>/metrics.parquet` (one row per log step)."""
    table = pa.Table.from_pylist(history)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    store.write_bytes(sink.getvalue().to_pybytes(), out, "metrics.parquet")


def model_spec(cfg: Config, labels: np.ndarray, classes: list[str] | None, data: dict) -> ModelSpec:
    """The UNet's input shape and label space from the data and the config."""
    if cfg.model.latent:
        channels, size = data["latent_shape"][0], data["latent_shape"][1]
    else:
        size, channels = cfg.data.image_size, 1 if cfg.data.mode == "L" else 3
    if cfg.model.sample_size is not None and cfg.model.sample_size != size:
        raise ValueError(f"model.sample_size={cfg.model.sample_size} but the data are {size} px")
    num_classes = 0
    if cfg.model.class_conditional:
        if labels.min() < 0:
            raise ValueError(
                "model.class_conditional needs labelled data (labels are -1); "
                "set model.class_conditional=false"
            )
        num_classes = len(classes) if classes else int(labels.max()) + 1
    return ModelSpec(size, channels, num_classes, cfg.model.latent)


def run(cfg: Config, store: RunStore) -> dict[str, Any]:
    """Stage entry point: train on the selected (and reweighted) rows, export, summarise."""
    started = time.time()
    inputs = resolve_inputs(cfg, store)
    rows, labels, classes, data = training_rows(cfg, store, inputs.selection)
    class_weights = None
    if inputs.class_weights is not None:
        if labels.min() < 0:
            raise ValueError("class weights (reweight stage) need labelled data")
        num_classes = len(classes) if classes else int(labels.max()) + 1
        class_weights = read_class_weights(inputs.class_weights, num_classes)
    spec = model_spec(cfg, labels, classes, data)
    key = resume_key(cfg, inputs.used)
    log.info(
        "train: %d rows (%s), %s, %d steps of batch %d on %d worker(s)",
        len(labels),
        "selected subset" if inputs.selection is not None else "all source rows",
        "class weights " + cfg.train.class_weighting if class_weights is not None
        else "no class weights",
        cfg.train.steps, cfg.train.batch_size, max(1, cfg.train.num_workers),
    )  # fmt: skip
    metrics, state = fit(cfg, store, rows, labels, spec, class_weights, key)
    model_dir = export(cfg, store, state, spec, classes)
    write_history(store, state["history"])
    _keep_checkpoints(store, key, "train")
    store.write_json(
        {"key": key, "spec": spec.to_dict(), "classes": classes, "inputs": inputs.used},
        "train",
        "run.json",
    )
    steps, flops, wall = state["step"], state["flops_per_step"] * state["step"], state["wall"]
    ips = state["images_seen"] / wall if wall > 0 else 0.0
    counts = np.bincount(labels[labels >= 0]).tolist() if (labels >= 0).any() else []
    rw_manifest = store.manifest("reweight") if class_weights is not None else None
    search = (rw_manifest or {}).get("search_flops")
    summary = (
        f"{steps} steps on {len(labels)} rows, loss {metrics.get('loss', float('nan')):.4f}, "
        f"{ips:.0f} img/s, {flops:.3g} FLOPs"
    )
    return {
        "rows": int(len(labels)),
        "class_counts": counts,
        "steps": steps,
        "images_seen": state["images_seen"],
        "flops": flops,
        "flops_per_step": state["flops_per_step"],
        "train_wall_seconds": round(wall, 3),
        "images_per_s": round(ips, 2),
        "final_loss": metrics.get("loss"),
        "resumed_at": state["resumed_at"],
        "shard_rows": metrics.get("shard_rows"),
        "inputs": inputs.used,
        "class_weights": class_weights.tolist() if class_weights is not None else None,
        "class_weighting": cfg.train.class_weighting,
        "reweight_flops_fraction": search / flops if search and flops else None,  # ref + proxy
        "model": store.uri(model_dir),
        "spec": spec.to_dict(),
        "setup_seconds": round(time.time() - started - wall, 3),
        "summary": summary,
    }
