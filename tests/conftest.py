"""Shared fixtures and builders: one small local Ray cluster per test session, quiet progress
bars, fast Ray Train health checks, one torch thread for tiny models, tiny diffusers models."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# the Train controller polls its workers every 2 s by default; tiny runs finish sooner
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# nothing reads worker logs (log_to_driver=False), yet Ray's log monitor globs the
# session's log folder every 0.1 s while it holds < 1000 files: ~35 s of CPU a suite run
os.environ.setdefault("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD", "0")
os.environ.setdefault("LOG_NAME_UPDATE_INTERVAL_S", "5")


@pytest.fixture(scope="session")
def ray_cluster():
    """A 2-CPU local Ray cluster shared by every test that needs Ray."""
    import ray
    import ray.data

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=200 * 2**20,
        log_to_driver=False,
    )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    yield ray
    ray.shutdown()


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models: one torch thread is as fast, and immune to a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_unet() -> Callable[..., Any]:
    """A seeded UNet2DModel builder: 8 px, two blocks of (16, 32) with attention in the last,
    3 classes by default (`num_class_embeds=None` for unconditional)."""

    def build(seed: int = 0, attention: bool = True, **kw: Any) -> Any:
        import torch
        from diffusers import UNet2DModel

        torch.manual_seed(seed)
        args = {
            "sample_size": 8,
            "in_channels": 1,
            "out_channels": 1,
            "block_out_channels": (16, 32),
            "layers_per_block": 1,
            "down_block_types": ("DownBlock2D", "AttnDownBlock2D" if attention else "DownBlock2D"),
            "up_block_types": ("AttnUpBlock2D" if attention else "UpBlock2D", "UpBlock2D"),
            "norm_num_groups": 8,
            "num_class_embeds": 3,
            **kw,
        }
        return UNet2DModel(**args).eval()

    return build


@pytest.fixture(scope="session")
def tiny_vae() -> Callable[..., Any]:
    """A seeded AutoencoderKL builder for 8 px images (4 latent channels, 4 px latents)."""

    def build(channels: int = 1) -> Any:
        import torch
        from diffusers import AutoencoderKL

        torch.manual_seed(0)
        return AutoencoderKL(
            in_channels=channels,
            out_channels=channels,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(8, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=8,
        )

    return build


@pytest.fixture(scope="session")
def upstream(ray_cluster, tmp_path_factory) -> Any:
    """A real embed -> select run (`runs.UPSTREAM`); copy it (`runs.copy_run`) to build on."""
    from dedt_ray.config import load_config
    from dedt_ray.pipeline import run_pipeline
    from dedt_ray.store import RunStore

    from runs import UPSTREAM

    store = RunStore(str(tmp_path_factory.mktemp("upstream") / "run"))
    run_pipeline(load_config(None, UPSTREAM), store, only=["embed", "select"])
    return store


@pytest.fixture(scope="session")
def trained(upstream, tmp_path_factory) -> Any:
    """`upstream` continued: reference -> reweight -> train (`runs.TRAINED`): one trained tiny
    model with its checkpoints, class weights and metrics. Copy it before changing it."""
    from dedt_ray.config import load_config
    from dedt_ray.pipeline import run_pipeline

    from runs import TRAINED, copy_run

    store = copy_run(upstream, tmp_path_factory.mktemp("trained") / "run", "embed", "select")
    run_pipeline(load_config(None, TRAINED), store, only=["reference", "reweight", "train"])
    return store


@pytest.fixture(scope="session")
def inception_file(tmp_path_factory) -> Any:
    """A random-weight FID Inception file saved as pytorch-fid's (torch.save of tensors)."""
    from tiny_models import save_inception

    return save_inception(tmp_path_factory.mktemp("inception") / "pt_inception.pth")
