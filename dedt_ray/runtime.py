"""Connecting to Ray: RAY_ADDRESS or a running cluster, else a local one; quiet by default.

Quiet unless the `dedt_ray` logger is at DEBUG (`dedt-ray -v`): Ray's own INFO lines, worker
and actor output (Ray Train's per-report lines, library warnings) stay in Ray's log files
under /tmp/ray/session_latest/logs; errors still reach the driver as exceptions. Ray Data's
progress bars show with -v on a terminal; dedt-ray draws its own for training and sampling.

Token authentication (on by default for local clusters since Ray 2.59) needs nothing here:
Ray reads RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or its default token file by itself.

A local cluster this module starts listens on loopback only (127.0.0.1): on Linux Ray would
otherwise bind its GCS, raylet and worker gRPC servers to every interface. Clusters that
other machines join are started with `ray start` (see docs/cluster.md), not here.
"""

from __future__ import annotations

import logging
import os
import socket
import sys

import ray
import ray.data
from ray._private import ray_constants, services

log = logging.getLogger("dedt_ray")


def chatty() -> bool:
    """Whether library and worker output is wanted (`dedt-ray -v`: dedt_ray logs at DEBUG)."""
    return log.isEnabledFor(logging.DEBUG)


def init_ray(num_cpus: int | None = None, progress: bool | None = None) -> None:
    """Connect to the cluster (idempotent) and set progress display for this driver.

    `ray.init()` without an address uses RAY_ADDRESS, then the latest cluster started on
    this machine (`ray start --head`), else starts a local one.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    verbose = chatty()
    if not verbose:  # its notes on progress bars and resources: only with -v
        logging.getLogger("ray.data").setLevel(logging.ERROR)
    if not ray.is_initialized():
        kwargs: dict = {
            "log_to_driver": verbose,
            "logging_level": logging.INFO if verbose else logging.ERROR,
        }
        if num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
        if _starts_local_cluster():
            _init_on_loopback(kwargs)
        else:
            ray.init(**kwargs)
    set_progress(sys.stderr.isatty() and verbose if progress is None else progress)


def _starts_local_cluster() -> bool:
    """Whether to start a new cluster: no RAY_ADDRESS and no live `ray start` cluster here.

    `ray start` records its address in /tmp/ray/ray_current_cluster; a cluster that ended
    without `ray stop` (a killed job, a rebooted container) leaves the file behind, and
    `ray.init()` would wait on the dead address for many minutes. With nothing at
    that address listening the file is stale: it is ignored, with a warning.
    """
    try:
        address = services.canonicalize_bootstrap_address(None)
    except ValueError:  # e.g. a ray:// client address, which ray.init handles itself
        return False
    if address is None:
        return True
    if os.environ.get(ray_constants.RAY_ADDRESS_ENVIRONMENT_VARIABLE) or _listening(address):
        return False
    log.warning(
        "ignoring %s from %s: nothing listens there (a `ray start` that ended without "
        "`ray stop`); starting a local cluster",
        address, ray._private.utils.get_ray_address_file(None),
    )  # fmt: skip
    return True


def _listening(address: str) -> bool:
    """Whether a TCP server accepts connections at host:port (within 2 s)."""
    host, port = services.parse_address(address)
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except OSError:
        return False
    return True


def _init_on_loopback(kwargs: dict) -> None:
    """Start a new local cluster bound to 127.0.0.1.

    On Linux `ray.init(_node_ip_address="127.0.0.1")` alone is rewritten to the machine's
    routable address (services.resolve_ip_for_localhost); with ENABLE_RAY_CLUSTER off (the
    macOS/Windows default, env RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) Ray keeps the loopback
    address and its servers listen on it only.
    """
    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(address="local", _node_ip_address="127.0.0.1", **kwargs)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def set_progress(enabled: bool) -> None:
    """Ray Data progress bars on a terminal; plain log lines otherwise."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = enabled
    ctx.print_on_execution_start = enabled
    ctx.enable_progress_bar_name_truncation = False


def local_cores() -> int:
    """The CPU cores this process may run on."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cores or 1


def actor_threads(threads: int | None, actors: int) -> int:
    """Torch threads of one of `actors` CPU actors on this node: `threads`, else this node's
    cores shared among them (Ray starts an actor with one OpenMP thread per CPU it reserved,
    one by default, which leaves the other cores idle while it runs the hot loop)."""
    return threads or max(1, local_cores() // max(1, actors))


def use_actor_threads(threads: int | None, actors: int) -> None:
    """Set this CPU actor's torch threads to `actor_threads(threads, actors)`."""
    import torch

    torch.set_num_threads(actor_threads(threads, actors))


def cluster_gpus() -> float:
    """GPUs the connected cluster has in total."""
    return float(ray.cluster_resources().get("GPU", 0.0))
