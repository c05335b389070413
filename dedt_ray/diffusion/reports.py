"""What the driver does with a training run's reports while `fit` waits: a progress bar and
metrics tracking (TensorBoard event files, MLflow).

Ray Train V2 calls a `UserCallback` on its controller actor, not in the driver, so
`ReportRelay` puts each report's scalar metrics on a Ray queue and a thread in the driver
hands them to the sinks:

    with relay_reports([TrainProgress(steps, "train"), TensorBoardSink(dir)]) as relay:
        TorchTrainer(..., run_config=RunConfig(callbacks=[relay])).fit()

A sink has `on_report(metrics)` and `close()`. `ScalingConfig(num_workers=0)` (the loop in
this process) calls no callbacks: `local_reports` gives the loop a hook that feeds the sinks
and the callbacks itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from ray.train import UserCallback

from dedt_ray.progress import Progress

log = logging.getLogger("dedt_ray")


class Sink(Protocol):
    def on_report(self, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class ReportRelay(UserCallback):
    """Puts rank 0's scalar metrics of every report on a queue (runs on the controller)."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def after_report(self, run_context: Any, metrics: list[dict], checkpoint: Any) -> None:
        self.queue.put(_scalars(metrics[0] if metrics else {}))


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def _deliver(sinks: Sequence[Sink], metrics: dict[str, float]) -> None:
    for sink in sinks:
        try:
            sink.on_report(metrics)
        except Exception as exc:  # a tracking hiccup must not stop training
            log.warning("%s: %s", type(sink).__name__, exc)


@contextlib.contextmanager
def relay_reports(sinks: Sequence[Sink]) -> Iterator[ReportRelay | None]:
    """A `ReportRelay` whose reports reach `sinks` in this process until the block ends
    (None and nothing started when there are no sinks)."""
    if not sinks:
        yield None
        return
    from ray.util.queue import Empty, Queue

    queue = Queue(actor_options={"num_cpus": 0})
    done = threading.Event()

    def drain() -> None:
        while True:
            try:
                _deliver(sinks, queue.get(timeout=0.2))
            except Empty:
                if done.is_set():
                    return
            except Exception:  # the queue actor is gone (driver shutting down)
                return

    thread = threading.Thread(target=drain, name="dedt-ray-reports", daemon=True)
    thread.start()
    try:
        yield ReportRelay(queue)
    finally:
        done.set()
        thread.join(timeout=10)
        for sink in sinks:
            sink.close()
        with contextlib.suppress(Exception):
            queue.shutdown()


@contextlib.contextmanager
def local_reports(
    sinks: Sequence[Sink], callbacks: Sequence[UserCallback] = ()
) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A hook for in-process training (`TrainJob.on_report`): each report's scalars go to
    `sinks` and the report to `callbacks`' `after_report`, as Ray Train's controller would
    call them; the sinks close when the block ends."""

    def hook(metrics: dict[str, Any]) -> None:
        _deliver(sinks, _scalars(metrics))
        for callback in callbacks:
            callback.after_report(None, [metrics], None)

    try:
        yield hook
    finally:
        for sink in sinks:
            sink.close()


class TrainProgress:
    """The steps of a training run as a progress bar (a log line per report off a terminal)."""

    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc = total, desc
        self.progress: Progress | None = None

    def on_report(self, metrics: dict[str, float]) -> None:
        if self.progress is None:  # created on the first report: after Ray Train's start-up
            self.progress = Progress(self.total, self.desc, unit="step", every=1)
        self.progress.update_to(
            int(metrics.get("step", 0)),
            loss=metrics.get("loss", float("nan")),
            **({"img/s": round(metrics["images_per_s"])} if "images_per_s" in metrics else {}),
        )

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()


class TensorBoardSink:
    """Scalars as TensorBoard event files in `logdir` (tensorboardX, which Ray Tune brings)."""

    def __init__(self, logdir: str) -> None:
        self.logdir = logdir
        self.writer: Any = None

    def on_report(self, metrics: dict[str, float]) -> None:
        if self.writer is None:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(self.logdir)
        step = int(metrics.get("step", 0))
        for key, value in metrics.items():
            if key != "step":
                self.writer.add_scalar(f"train/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class MLflowSink:
    """Metrics (and the run's settings as params) as one MLflow run, through `MlflowClient`
    with an explicit tracking URI (`mlflow_uri`): no global MLflow state."""

    def __init__(
        self, tracking_uri: str, experiment: str, run_name: str, params: dict[str, Any]
    ) -> None:
        self.tracking_uri, self.experiment, self.run_name = tracking_uri, experiment, run_name
        self.params = params
        self.client: Any = None
        self.run_id: str | None = None

    def _start(self) -> None:
        from mlflow.tracking import MlflowClient

        if not log.isEnabledFor(logging.DEBUG):  # its database set-up lines only with -v
            logging.getLogger("mlflow").setLevel(logging.WARNING)

        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        found = self.client.get_experiment_by_name(self.experiment)
        experiment_id = (
            found.experiment_id if found else self.client.create_experiment(self.experiment)
        )
        run = self.client.create_run(experiment_id, run_name=self.run_name)
        self.run_id = run.info.run_id
        from mlflow.entities import Param

        params = [Param(k, str(v)[:500]) for k, v in sorted(self.params.items())]
        if params:
            self.client.log_batch(self.run_id, params=params)

    def on_report(self, metrics: dict[str, float]) -> None:
        if self.client is None:
            self._start()
        from mlflow.entities import Metric

        step, now = int(metrics.get("step", 0)), int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in metrics.items() if k != "step"]
        self.client.log_batch(self.run_id, metrics=batch)

    def close(self) -> None:
        if self.client is not None and self.run_id is not None:
            self.client.set_terminated(self.run_id)


def mlflow_uri(tracking_uri: str | None, run_root: str) -> str:
    """`train.tracking_uri`, else a local SQLite store `<run>/mlruns/mlflow.db` (MLflow 3
    keeps its plain-folder store in maintenance mode; SQLite is its local default now)."""
    if tracking_uri:
        return tracking_uri
    os.makedirs(os.path.join(run_root, "mlruns"), exist_ok=True)
    return "sqlite:///" + os.path.join(run_root, "mlruns", "mlflow.db")
