"""Quality along training: a Ray actor that scores the EMA weights a trainer sends it.

`make_scorer(cfg, store, ...)` (called by a training stage through `StageContext.curve_scorer`,
which the pipeline fills) resolves the evaluate stage's feature space, computes the real
features once per run (cached under `<run>/curve/`), measures the noise floor (real images in
place of generated ones, at the curve's sample count), and starts a `CurveScorer` actor. Rank 0
of the trainer calls `submit` every `train.eval_every` steps (waiting only where the points
are scored in turn: `scoring_threads`): the actor samples
`train.eval_samples` images (DDIM, `train.eval_steps` steps) and measures the Frechet and
kernel distances while the workers go on: `submit` queues the point for the actor's one scoring
thread and returns, so points are scored in turn and `status` answers at once whether the curve
has flattened (`curves.convergence`); `finish` waits for the pending scores and returns the
points. The actor warms up (a scratch model sampled and scored) before training starts, so the
first points do not pay for first-call work beside a busy trainer. A point is also appended to
`<run>/_ray/<name>-curve.json`, so a resumed run keeps its earlier points.

Composite models (TDC: one model per timestep group) send one submission per part (`key`); a
point is scored when every part has sent that step, from `assemble(parts)`.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from dedt_ray.config import Config, hash_json
from dedt_ray.evaluate.curves import convergence, noise
from dedt_ray.evaluate.features import FeatureExtractor, FeatureSpace
from dedt_ray.evaluate.fid import FeatureStats, frechet_distance
from dedt_ray.evaluate.kid import kernel_distance
from dedt_ray.store import RunStore

log = logging.getLogger("dedt_ray")
CACHE = "curve"


@dataclass(frozen=True)
class CurveSettings:
    """What one curve point measures."""

    samples: int
    steps: int  # DDIM steps
    patience: int
    seed: int = 0
    kid_subsets: int = 20

    @classmethod
    def from_config(cls, cfg: Config) -> CurveSettings:
        tc = cfg.train
        return cls(tc.eval_samples, tc.eval_steps, tc.patience, cfg.evaluate.seed)


@dataclass
class RealSide:
    """The real images in the feature space: statistics of all, a subset for KID."""

    mean: np.ndarray
    cov: np.ndarray
    subset: np.ndarray
    count: int
    noise_floor: float  # FD of `samples` real images against the other real images


class CurveScorer:
    """The actor (see the module docstring). `model_cfg` / `spec` build each part's model
    through the submitted `source` (a trainer `ModelSource`)."""

    def __init__(
        self, space: FeatureSpace, real: RealSide, settings: CurveSettings, metric: str,
        kernel: str, model_cfg: dict, spec: dict, classes: list[int] | None, parts: int = 1,
        assemble: Callable[[list[Any]], Any] | None = None, log_path: str | None = None,
        points: list[dict] | None = None, device: str = "cpu", threads: int = 1,
        in_turn: bool = False,
    ) -> None:  # fmt: skip
        import torch

        import dedt_ray.diffusion.sampling  # noqa: F401 - now, not at the first point
        from dedt_ray.config import ModelConfig
        from dedt_ray.diffusion.models import ModelSpec, build_noise_scheduler, sampling_scheduler

        self.threads, self.in_turn = threads, in_turn
        torch.set_num_threads(threads)
        self.space, self.real, self.settings = space, real, settings
        self.metric, self.kernel = metric, kernel
        self.model_cfg, self.spec, self.classes = model_cfg, spec, classes
        self._cfg = ModelConfig.model_validate(model_cfg)
        self._spec = ModelSpec(**{k: v for k, v in spec.items() if k != "null_class"})
        self._scheduler = sampling_scheduler(build_noise_scheduler(self._cfg), "ddim")
        self.parts, self.assemble, self.device = parts, assemble, device
        self.log_path = log_path
        self.extract = FeatureExtractor(space, device)
        self._points: list[dict] = list(points or [])
        self._pending: dict[int, dict[int, tuple[dict, dict, Any]]] = {}
        self._latest: dict[int, tuple[dict, dict, Any]] = {}  # each part's newest submission
        self._busy = 0  # points queued or being scored
        self._errors: list[str] = []
        self._lock = threading.Condition()
        self._warm_up()
        self._queue: queue.Queue[tuple[int, list, dict]] = queue.Queue()
        threading.Thread(target=self._score_queued, daemon=True, name="curve-scorer").start()

    # -- calls ---------------------------------------------------------------------------
    def submit(self, point: dict, weights: dict, source: Any, key: int = 0) -> None:
        """Queue the weights at `point["step"]` for scoring (or hold them until every part has
        come) and return."""
        with self._lock:
            step = int(point["step"])
            parts = self._pending.setdefault(step, {})
            parts[key] = (point, weights, source)
            if key not in self._latest or self._latest[key][0]["step"] <= step:
                self._latest[key] = parts[key]
            if len(parts) == self.parts:
                del self._pending[step]
                self._enqueue(step, parts, point)
            while self.in_turn and self._busy:  # scored before the trainer goes on
                self._lock.wait()

    def _enqueue(self, step: int, parts: dict[int, tuple[dict, dict, Any]], head: dict) -> None:
        self._busy += 1  # under the lock
        self._queue.put((step, [parts[k] for k in sorted(parts)], head))

    def _score_queued(self) -> None:
        import torch

        torch.set_num_threads(self.threads)  # a thread's own setting under OpenMP
        while True:
            step, parts, head = self._queue.get()
            try:
                self._score_point(step, parts, head)
            finally:
                with self._lock:
                    self._busy -= 1
                    self._lock.notify_all()

    def _score_point(self, step: int, parts: list[tuple[dict, dict, Any]], head: dict) -> None:
        try:
            row = self._score(parts, head)
            with self._lock:
                self._points.append(row)
                self._points.sort(key=lambda r: r["step"])
                self._write()
        except Exception as exc:  # nobody waits on a submission: keep the error for finish()
            log.exception("curve: scoring step %s failed", step)
            with self._lock:
                self._errors.append(f"step {step}: {type(exc).__name__}: {exc}")

    def status(self) -> dict[str, Any]:
        """Whether the curve has flattened, its noise, and its points so far."""
        with self._lock:
            points = list(self._points)
        sigma = self.noise(points)
        stop, why = convergence([p[self.metric] for p in points], sigma, self.settings.patience)
        return {"stop": stop, "why": why, "noise": sigma, "points": len(points),
                "metric": self.metric, "kernel": self.kernel, "in_turn": self.in_turn}  # fmt: skip

    def finish(self, steps: list[int], timeout: float = 900.0) -> list[dict]:
        """Every point, once the points of `steps` (what the trainer submitted) are scored.
        Training is over, so a composite step some parts never reached (their epoch budget
        ended sooner) is scored with those parts' final weights, as the model then was."""
        with self._lock:
            for step, parts in sorted(self._pending.items()):
                head = next(iter(parts.values()))[0]  # a part that did reach this step
                for key, newest in self._latest.items():
                    parts.setdefault(key, newest)
                self._enqueue(step, parts, head)
            self._pending.clear()
        deadline = time.monotonic() + timeout
        with self._lock:
            while not self._done(steps) and time.monotonic() < deadline:
                self._lock.wait(timeout=1.0)
            if not self._done(steps):
                log.warning("curve: steps %s were never scored", sorted(set(steps) - self._seen()))
            if self._errors:
                raise RuntimeError(f"curve scoring failed: {'; '.join(self._errors[:3])}")
            return list(self._points)

    def _seen(self) -> set[int]:
        return {int(p["step"]) for p in self._points} | {int(e.split(":")[0].split()[1])
                                                         for e in self._errors}  # fmt: skip

    def _done(self, steps: list[int]) -> bool:
        return not self._busy and set(map(int, steps)) <= self._seen()

    def noise(self, points: list[dict]) -> float:
        return noise([p[f"{self.metric}_half_a"] for p in points],
                     [p[f"{self.metric}_half_b"] for p in points])  # fmt: skip

    # -- scoring -------------------------------------------------------------------------
    def _warm_up(self) -> None:
        """Sample and score a few images from a scratch model, so that imports, first-call
        kernels and the feature extractor's first run happen now; a broken setup fails here."""
        from dedt_ray.diffusion.models import build_unet

        model = build_unet(self._cfg, self._spec).to(self.device).eval()
        self._sample_and_measure(model, samples=4, steps=2)

    def _sample_and_measure(self, model: Any, samples: int, steps: int) -> dict[str, float]:
        import torch

        from dedt_ray.diffusion.sampling import generate

        labels = None
        if self.classes:
            labels = [self.classes[i % len(self.classes)] for i in range(samples)]
        gen = torch.Generator().manual_seed(self.settings.seed)
        with torch.no_grad():
            images = generate(model, self._scheduler, labels, steps, 1.0, gen, num_samples=samples)
        return self._distances(self.extract(images).astype(np.float64))

    def _model(self, parts: list[tuple[dict, dict, Any]]) -> Any:
        models = []
        for _, weights, source in parts:
            model = source.build(self._cfg, self._spec)
            model.load_state_dict(weights)
            models.append(model.to(self.device).eval())
        return self.assemble(models) if self.assemble is not None else models[0]

    def _score(self, parts: list[tuple[dict, dict, Any]], head: dict) -> dict[str, Any]:
        started, s = time.perf_counter(), self.settings
        distances = self._sample_and_measure(self._model(parts), s.samples, s.steps)
        point = {k: v for k, v in head.items() if k not in ("flops", "offset")}
        point["train_flops"] = sum(p[0]["flops"] for p in parts) + parts[0][0].get("offset", 0)
        point.update(distances, eval_seconds=time.perf_counter() - started)
        point["noise_floor"] = self.real.noise_floor
        return point

    def _distances(self, feats: np.ndarray) -> dict[str, float]:
        r = self.real
        out = {self.metric: _fd(feats, r.mean, r.cov)}
        half = len(feats) // 2
        out[f"{self.metric}_half_a"] = _fd(feats[:half], r.mean, r.cov)
        out[f"{self.metric}_half_b"] = _fd(feats[half:], r.mean, r.cov)
        size = min(len(feats), len(r.subset), 1000)
        mean, std, _ = kernel_distance(r.subset, feats, self.settings.kid_subsets, size,
                                       self.settings.seed)  # fmt: skip
        out[f"{self.kernel}_mean"], out[f"{self.kernel}_std"] = mean, std
        return out

    def _write(self) -> None:
        if self.log_path is None:
            return
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(self.log_path)
        with fs.open_output_stream(path) as f:
            f.write(json.dumps(self._points).encode())


def _fd(feats: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> float:
    stats_ = FeatureStats().update(feats)
    return float(frechet_distance(stats_.mean, stats_.cov, mean, cov))


# -- the factory (driver side) ------------------------------------------------------------------
def noise_floor(
    rows: np.ndarray, labels: np.ndarray, samples: int, classes: list[int] | None, seed: int,
    total: tuple[np.ndarray, np.ndarray, int] | None = None,
) -> float:  # fmt: skip
    """What a curve point measures, with real images in place of generated ones: FD of
    `samples` real rows, drawn with the class counts of a point's labels (classes in turn), or
    at random when unconditional, against the other real images: the rest of `total` (mean,
    covariance, count of every real image, `rows` among them: what a point is measured
    against; default: `rows` themselves). NaN when a class has too few rows, or fewer than
    `samples` would be left on the other side."""
    rng = np.random.default_rng(seed)
    if classes:
        counts = np.bincount(np.arange(samples) % len(classes), minlength=len(classes))
        picked = []
        for cls, n in zip(classes, counts, strict=True):
            of_class = np.flatnonzero(labels == cls)
            if len(of_class) < n:
                return float("nan")
            picked.append(rng.choice(of_class, n, replace=False))
        a = np.concatenate(picked)
    else:
        a = rng.permutation(len(rows))[:samples]
    if total is None:
        every = FeatureStats().update(rows)
        total = (every.mean, every.cov, every.count)
    mean, cov, count = total
    n, rest = len(a), count - len(a)
    if rest < samples:
        return float("nan")
    # the drawn rows taken out of the total's statistics (Chan et al.'s update, inverted)
    drawn = FeatureStats().update(rows[a])
    rest_mean = (count * mean - n * drawn.mean) / rest
    delta = drawn.mean - rest_mean
    m2 = (count - 1) * cov - (n - 1) * drawn.cov - np.outer(delta, delta) * n * rest / count
    return float(frechet_distance(drawn.mean, drawn.cov, rest_mean, m2 / (rest - 1)))


def real_side(
    cfg: Config, store: RunStore, space: FeatureSpace, gpus: float,
    classes: list[int] | None = None,
) -> RealSide:  # fmt: skip
    """The real features' statistics and KID subset (with its labels), computed once per run
    and cached; the noise floor for a curve scored over `classes` (`noise_floor`)."""
    import io

    from dedt_ray.evaluate.stage import real_features

    ev = cfg.evaluate
    key = hash_json(
        {"space": space.describe(), "data": cfg.data.model_dump(mode="json"),
         "max_real": ev.max_real, "subset": ev.manifold_samples, "version": 2}
    )  # fmt: skip
    name = f"real-{key}.npz"
    if store.exists(CACHE, name):
        with np.load(io.BytesIO(store.read_bytes(CACHE, name))) as z:
            mean, cov, subset, labels, count = (z[k] for k in ("mean", "cov", "subset",
                                                               "labels", "count"))  # fmt: skip
    else:
        acc = real_features(cfg, [space], gpus, per_class=False)[0]
        mean, cov, count = acc.total.mean, acc.total.cov, acc.count
        subset, labels = np.asarray(acc.subset.rows, np.float64), acc.subset.labels
        buf = io.BytesIO()
        np.savez(buf, mean=mean, cov=cov, subset=subset, labels=labels, count=count)
        store.write_bytes(buf.getvalue(), CACHE, name)
    floor = noise_floor(subset, labels, cfg.train.eval_samples, classes, ev.seed,
                        total=(mean, cov, int(count)))  # fmt: skip
    return RealSide(mean, cov, subset, int(count), floor)


def scoring_threads(cfg: Config, gpus: float) -> tuple[bool, int]:
    """(in turn, the scorer's torch threads). An in-process trainer on CPU whose threads fill
    the cores (`train.threads_per_worker`, default all) leaves nothing to overlap: a point's
    sampling beside its spinning OpenMP threads slows the trainer more than the point costs, so
    points are scored in turn, with the trainer's threads; otherwise the scorer goes on beside
    the trainer, on the cores it leaves (one thread beside Ray Train workers or on a GPU)."""
    if cfg.train.num_workers != 0 or gpus > 0:
        return False, 1
    from dedt_ray.runtime import local_cores

    cores = local_cores()
    trainer = cfg.train.threads_per_worker or cores
    if trainer >= cores:
        return True, trainer
    return False, cores - trainer


def make_scorer(
    cfg: Config,
    store: RunStore,
    spec: dict,
    classes: list[int] | None,
    name: str,
    parts: int = 1,
    assemble: Callable[[list[Any]], Any] | None = None,
    model_cfg: dict | None = None,
) -> Any:
    """Start the curve actor for the run `name` (e.g. "train-<key>"); see the module docstring.
    Earlier points of the same run (a resumed stage) are loaded from `<run>/_ray/`."""
    import ray

    from dedt_ray.evaluate.stage import resolve_feature_space
    from dedt_ray.runtime import cluster_gpus

    ev = cfg.evaluate
    gpus = ev.gpus_per_actor if ev.gpus_per_actor is not None else min(1.0, cluster_gpus())
    space, _ = resolve_feature_space(cfg, store, gpus)
    real = real_side(cfg, store, space, gpus, classes)
    log_path = store.uri(store.path("_ray", f"{name}-curve.json"))
    points = store.read_json("_ray", f"{name}-curve.json") if store.exists(
        "_ray", f"{name}-curve.json") else []  # fmt: skip
    store.fs.create_dir(posixpath.dirname(store.path("_ray", "x")), recursive=True)
    options: dict[str, Any] = {"num_cpus": 0, "num_gpus": gpus, "max_concurrency": 2}
    in_turn, threads = scoring_threads(cfg, gpus)
    in_driver = ray.get_runtime_context().get_task_id() is None
    if cfg.train.num_workers == 0 and not in_turn and in_driver:
        # beside a trainer in this driver: the scorer at the driver's priority, not at Ray
        # workers' default niceness (15), where it is starved until training ends
        options["runtime_env"] = {"env_vars": {"RAY_worker_niceness": str(os.nice(0))}}
    actor = ray.remote(CurveScorer).options(**options)
    scorer = actor.remote(
        space, real, CurveSettings.from_config(cfg), space.metric, space.kernel,
        model_cfg or cfg.model.model_dump(mode="json"), spec, classes, parts, assemble,
        log_path, points, "cuda" if gpus > 0 else "cpu", threads, in_turn,
    )  # fmt: skip
    # ready (imports done, a warm-up point scored) before training starts: its start beside a
    # CPU trainer's spinning threads slows the trainer more than it waits here; a scorer that
    # cannot start fails here
    ray.get(scorer.status.remote())
    return scorer
