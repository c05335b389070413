"""Connecting to Ray: RAY_ADDRESS or a running cluster, else a local one; quiet when not a TTY.

Token authentication (on by default for local clusters since Ray 2.59) needs nothing here:
Ray reads RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or its default token file by itself.
"""

from __future__ import annotations

import logging
import os
import sys

import ray
import ray.data

log = logging.getLogger("dedt_ray")


def init_ray(num_cpus: int | None = None, progress: bool | None = None) -> None:
    """Connect to the cluster (idempotent) and set progress display for this driver.

    `ray.init()` without an address uses RAY_ADDRESS, then the latest cluster started on
    this machine (`ray start --head`), else starts a local one.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not ray.is_initialized():
        kwargs: dict = {"log_to_driver": True}
        if num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
        ray.init(**kwargs)
    set_progress(sys.stderr.isatty() if progress is None else progress)


def set_progress(enabled: bool) -> None:
    """Ray Data progress bars on a terminal; plain log lines otherwise."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = enabled
    ctx.print_on_execution_start = enabled


def cluster_gpus() -> float:
    """GPUs the connected cluster has in total."""
    return float(ray.cluster_resources().get("GPU", 0.0))
