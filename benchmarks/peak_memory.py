"""Memory of a local Ray cluster, for benchmarks: PSS of this driver and its processes."""

from __future__ import annotations

import threading

import psutil


def ray_memory() -> int:
    """PSS of this driver and every process it started (the local Ray cluster): shared
    object-store pages are counted once, split between the processes that map them."""
    total = 0
    me = psutil.Process()
    for proc in [me, *me.children(recursive=True)]:
        try:
            total += proc.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


class PeakMemory:
    """`with PeakMemory() as m: ...` samples `ray_memory()` every `interval` seconds;
    afterwards `m.base` and `m.peak` are bytes (the peak includes the base)."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.base = self.peak = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._done.wait(self.interval):
            self.peak = max(self.peak, ray_memory())

    def __enter__(self) -> PeakMemory:
        self.base = self.peak = ray_memory()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, ray_memory())
