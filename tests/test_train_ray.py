"""The train (and latents) stages on Ray Train V2: local mode, DDP, inputs, resume, export."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from dedt_ray.config import load_config
from dedt_ray.diffusion.core import count_step_flops
from dedt_ray.diffusion.export import load_export
from dedt_ray.diffusion.models import ModelSpec, build_noise_scheduler, build_unet
from dedt_ray.diffusion.sampling import generate
from dedt_ray.diffusion.state import load_state
from dedt_ray.pipeline import run_stage
from dedt_ray.store import RunStore

from runs import ROWS, copy_run

SMALL = [
    "data.image_size=8",
    f"data.limit={ROWS}",  # the rows of the session's upstream runs
    "model.block_out_channels=[8,16]",
    "model.norm_num_groups=4",
    "model.attention_head_dim=4",
    "train.steps=6",
    "train.batch_size=8",
    "train.warmup_steps=1",
    "train.log_every=2",
    "train.checkpoint_every=3",
    "train.threads_per_worker=1",
    "train.num_workers=0",
]


def config(*overrides: str):
    return load_config(None, [*SMALL, *overrides])


def train(tmp_path, *overrides: str, store: RunStore | None = None):
    store = store or RunStore(str(tmp_path / "run"))
    cfg = config(*overrides)
    return cfg, store, run_stage("train", cfg, store)


@pytest.fixture(scope="module")
def local_run(ray_cluster, tmp_path_factory):
    """One in-process (num_workers=0) training run shared by several tests."""
    return train(tmp_path_factory.mktemp("local"))


def test_local_mode_trains_and_exports(local_run):
    cfg, store, manifest = local_run
    assert manifest["rows"] == ROWS and manifest["steps"] == 6
    assert manifest["images_seen"] == 6 * 8
    assert manifest["flops"] == 6 * manifest["flops_per_step"] > 0
    assert manifest["inputs"] == {} and manifest["resumed_at"] == []
    assert f"6 steps on {ROWS} rows" in manifest["summary"]
    model = store.path("train", "model")
    unet = UNet2DModel.from_pretrained(model, subfolder="unet")
    assert unet.config.num_class_embeds == 11 and unet.config.sample_size == 8
    assert DDPMScheduler.from_pretrained(model, subfolder="scheduler").config.num_train_timesteps
    _, _, vae, info = load_export(model)
    assert vae is None and info["null_class"] == 10 and info["classes"][3] == "3"
    history = pq.read_table(store.path("train", "metrics.parquet")).to_pylist()
    assert [h["step"] for h in history] == [2, 4, 6]
    assert {"loss", "lr", "images_seen", "flops", "wall", "images_per_s"} <= set(history[0])
    assert history[-1]["images_seen"] == 48 and history[-1]["wall"] > 0
    assert not store.exists("_ray", f"train-{store.read_json('train', 'run.json')['key']}")
    # written as they were made, the newest train.keep_checkpoints (2) kept, as Ray Train does
    assert store.list("train", "checkpoints") == ["checkpoint_00000003", "checkpoint_00000006"]


def test_sample_cli_writes_grid_and_npz(local_run, tmp_path):
    from dedt_ray.cli import main

    _, store, _ = local_run
    out = tmp_path / "samples"
    code = main(
        ["sample", "--run-dir", store.root, "--num", "6", "--classes", "1,7", "--steps", "2",
         "--guidance-scale", "2", "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    data = np.load(out / "samples.npz")
    assert data["images"].shape == (6, 8, 8, 1) and data["images"].dtype == np.uint8
    assert data["labels"].tolist() == [1, 7, 1, 7, 1, 7]
    assert (out / "grid.png").stat().st_size > 0
    assert main(["sample", "--model", str(tmp_path / "none"), "--out", str(out)]) == 2


@pytest.mark.parametrize("weighting", ["sampling", "loss"])
def test_trains_on_selected_rows_with_class_weights(trained, tmp_path, weighting):
    """On the real select and reweight outputs of the session's `trained` run."""
    store = copy_run(trained, tmp_path / "run", "embed", "select", "reference", "reweight")
    select, reweight = store.manifest("select"), store.manifest("reweight")
    _, _, manifest = train(tmp_path, f"train.class_weighting={weighting}", store=store)
    assert manifest["rows"] == select["kept"] < ROWS
    assert manifest["class_counts"] == [c["kept"] for c in select["per_class"]]
    assert manifest["inputs"] == {"select": select["output_id"], "reweight": reweight["output_id"]}
    assert not np.allclose(reweight["class_weights"], 0.1, atol=1e-4)  # not uniform
    np.testing.assert_allclose(manifest["class_weights"], reweight["class_weights"])
    # a different selection is a different run: it must not resume the first one's checkpoints
    _, _, again = train(tmp_path / "b", f"train.class_weighting={weighting}")
    assert again["rows"] == ROWS and again["inputs"] == {}


def test_two_worker_ddp_resumes_after_injected_failure(ray_cluster, tmp_path):
    """One 2-worker DDP run whose rank 0 raises once at step 3: the group restarts from the
    step-2 checkpoint and the run ends as an uninterrupted one would."""
    flag = tmp_path / "fail.flag"
    flag.write_text("x")
    steps, every = 6, 2
    cfg, store, manifest = train(
        tmp_path,
        "train.num_workers=2",
        f"train.steps={steps}",
        "train.log_every=1",
        f"train.checkpoint_every={every}",
        "train.max_failures=1",
        "train.fail_at_step=3",
        f"train.fail_flag={flag}",
        "train.tracking=[tensorboard,mlflow]",
    )
    assert not flag.exists()  # the failure happened
    assert manifest["steps"] == steps and manifest["resumed_at"] == [2]  # the last checkpoint
    assert manifest["images_seen"] == steps * 8
    history = pq.read_table(store.path("train", "metrics.parquet")).to_pylist()
    assert [h["step"] for h in history] == list(range(1, steps + 1))  # each step once
    assert history[-1]["images_seen"] == steps * 8
    # each worker materialised only its shard (streaming_split(equal=True) may drop 1 row)
    assert len(manifest["shard_rows"]) == 2 and ROWS - 1 <= sum(manifest["shard_rows"]) <= ROWS
    assert max(manifest["shard_rows"]) <= ROWS // 2
    # FLOPs per step = 2 workers x forward+backward of a 4-row micro-batch
    torch.manual_seed(0)
    unet = build_unet(cfg.model, ModelSpec(8, 1, 10))
    micro = count_step_flops(
        unet, build_noise_scheduler(cfg.model), torch.randn(4, 1, 8, 8), torch.arange(4)
    )
    assert manifest["flops_per_step"] == 2 * micro
    ckpts = [n for n in store.list("train", "checkpoints") if n.startswith("checkpoint_0")]
    written = [f"checkpoint_{s:08d}" for s in range(every, steps + 1, every)]
    assert ckpts == written[-cfg.train.keep_checkpoints :]  # the newest ones are kept
    # the export holds the EMA weights of the last checkpoint, not the raw weights
    state = load_state(store.path("train", "checkpoints", ckpts[-1]))
    exported = UNet2DModel.from_pretrained(store.path("train", "model"), subfolder="unet")
    params = list(exported.parameters())
    assert all(
        torch.equal(p, e) for p, e in zip(params, state["ema"]["shadow_params"], strict=True)
    )
    assert not all(torch.equal(p, state["model"][n]) for n, p in exported.named_parameters())
    # the workers' reports reached TensorBoard and MLflow while it trained (the driver's
    # callback), each step once across the restart
    from test_first_hour import check_mlflow, read_tensorboard

    scalars = read_tensorboard(Path(store.path("tensorboard", "train")))
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, steps + 1))
    check_mlflow(f"sqlite:///{store.path('mlruns', 'mlflow.db')}", "run", "train",
                 list(range(1, steps + 1)))  # fmt: skip


def test_rerun_resumes_a_crashed_in_process_stage(ray_cluster, tmp_path):
    """In-process training (the default config's) persists its checkpoints itself: a rerun
    of the crashed stage resumes from the last one (Ray Train's workers: the DDP test)."""
    flag = tmp_path / "fail.flag"
    flag.write_text("x")
    args = [
        "train.steps=6",
        "train.checkpoint_every=2",
        "train.fail_at_step=4",
        f"train.fail_flag={flag}",
    ]
    store = RunStore(str(tmp_path / "run"))
    with pytest.raises(Exception, match="injected failure"):
        train(tmp_path, *args, store=store)
    assert store.manifest("train") is None
    _, _, manifest = train(tmp_path, *args, store=store)
    assert manifest["resumed_at"] == [2] and manifest["steps"] == 6
    history = pq.read_table(store.path("train", "metrics.parquet")).column("step").to_pylist()
    assert history == [2, 4, 6]  # each logged step once


def test_latent_mode_round_trip(ray_cluster, tmp_path, tiny_vae):
    vae_dir = str(tmp_path / "vae")
    tiny_vae().save_pretrained(vae_dir)
    store = RunStore(str(tmp_path / "run"))
    overrides = ["model.latent=true", f"model.vae={vae_dir}", "model.vae_batch_size=32"]
    latents = run_stage("latents", config(*overrides), store)
    assert latents["rows"] == ROWS and latents["shape"] == [4, 4, 4]
    table = pq.read_table(store.path("latents", "latents.parquet"))
    assert table.num_rows == ROWS and table.schema.field("latent").type.list_size == 64
    _, _, manifest = train(tmp_path, *overrides, store=store)
    assert manifest["spec"]["latent"] and manifest["spec"]["channels"] == 4
    assert manifest["inputs"] == {"latents": latents["output_id"]}
    model = store.path("train", "model")
    assert os.path.isdir(os.path.join(model, "vae"))
    unet, sched, vae, _ = load_export(model)
    assert unet.config.sample_size == 4 and unet.config.in_channels == 4
    from dedt_ray.diffusion.models import sampling_scheduler

    g = torch.Generator().manual_seed(0)
    images = generate(unet, sampling_scheduler(sched, "ddim"), [0, 5], 2, 1.0, g, vae=vae)
    assert images.shape == (2, 8, 8, 1)


def test_pixel_export_loads_in_ddpm_pipeline(ray_cluster, tmp_path):
    _, store, _ = train(tmp_path, "model.class_conditional=false", "train.steps=2")
    pipe = DDPMPipeline.from_pretrained(store.path("train", "model"))
    images = pipe(batch_size=2, num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 8, 8, 1)
