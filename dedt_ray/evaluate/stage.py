"""Stage `evaluate`: sample the exported model on Ray actors and measure it against the real data.

1. Feature space: Inception-v3 pool3 from a local weights file (FID), else - or when
   `evaluate.feature_space=classifier` - a small CNN trained on the real images (a Ray task;
   cached under `<run>/classifier/<name>-<key>/`, reused on rerun), giving `FD_<name>`;
   plus the `evaluate.extra_spaces` (CLIP / DINOv2 / ViT from local weights, `FD_<name>`).
2. Real features: source -> feature networks (Ray Data actor pool) -> streaming statistics.
3. Generated features: label shares -> `ShareSampler` actors (ray.util.ActorPool, a GPU
   each when the cluster has them) -> streaming statistics + grid images.
4. evaluate/metrics.json (with a note when a metric's network is the selection encoder),
   per_class.json, samples.png.
"""

from __future__ import annotations

import io
import logging
import time
from typing import Any

import numpy as np
import ray
import ray.data
import ray.util

from dedt_ray.artifacts import export_classes, model_dir
from dedt_ray.config import Config, hash_json
from dedt_ray.data import open_source
from dedt_ray.diffusion.card import metrics_section, update_card
from dedt_ray.evaluate.classifier import config_bytes, to_bytes, train_classifier
from dedt_ray.evaluate.features import (
    INCEPTION,
    FeatureExtractor,
    FeatureSpace,
    classifier_name,
)
from dedt_ray.evaluate.generation import ShareSampler, plan_shares, samples_grid
from dedt_ray.evaluate.spaces import confound_notes, extra_spaces, selection_encoder
from dedt_ray.evaluate.streaming import (
    FeatureAccumulator,
    MetricSettings,
    Reservoir,
    compute_metrics,
    id_keys,
    json_number,
)
from dedt_ray.progress import Progress
from dedt_ray.runtime import cluster_gpus, use_actor_threads
from dedt_ray.stages import StageContext
from dedt_ray.store import RunStore

log = logging.getLogger("dedt_ray")

MODEL = model_dir("train")
ROUTED = model_dir("tdc")  # the TDC routed export, evaluated instead when tdc ran
METRICS, PER_CLASS, SAMPLES = "metrics.json", "per_class.json", "samples.png"
CLASSIFIER_DIR = "classifier"
# per-class statistics hold a D x D matrix per class and side; above this, they are skipped
PER_CLASS_BYTES = 4 * 2**30
GRID_CELL_PX = 32  # samples.png enlarges small images to about this many pixels


# -- model info ----------------------------------------------------------------------------
def model_parts(inputs: dict[str, str]) -> tuple[str, ...]:
    """The model to evaluate: the TDC routed export when the tdc stage is an input."""
    return ROUTED if "tdc" in inputs else MODEL


model_classes = export_classes  # (class indices or None, class names, dedt_model.json)


# -- feature space -------------------------------------------------------------------------
def inception_available(weights: str | None) -> bool:
    from dedt_ray.encoders.inception import weights_path

    try:
        weights_path(weights)
    except (FileNotFoundError, ValueError):
        return False
    return True


def _train_task(images: np.ndarray, labels: np.ndarray, num_classes: int, epochs: int, seed: int,
                use_gpu: bool) -> tuple[bytes, dict[str, Any]]:  # fmt: skip
    import torch

    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    model, config = train_classifier(
        images, labels, num_classes, epochs=epochs, seed=seed, device=device
    )
    return to_bytes(model), config


def _real_training_images(cfg: Config) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """Up to `classifier_max_images` labelled real images (a seeded random subset)."""
    ev = cfg.evaluate
    source = open_source(cfg.data)
    keep = Reservoir(ev.classifier_max_images)
    for batch in source.dataset.iter_batches(batch_size=1024, batch_format="numpy"):
        labelled = batch["label"] >= 0
        if labelled.any():
            ids = batch["id"][labelled]
            keep.add(id_keys(ids, ev.seed), batch["image"][labelled], batch["label"][labelled])
    if not len(keep):
        raise ValueError(
            "evaluate.feature_space=classifier needs labelled real images (all labels are -1); "
            "give evaluate.inception_weights for FID instead (see docs/evaluate.md)"
        )
    return keep.rows, keep.labels, source.classes


def classifier_space(cfg: Config, store: RunStore, gpus: float) -> tuple[FeatureSpace, str]:
    """The fallback feature space: load the cached classifier or train one. (space, how)."""
    ev, data = cfg.evaluate, cfg.data
    name = classifier_name(data.source, data.path)
    key = hash_json(
        {"data": data.model_dump(mode="json"), "epochs": ev.classifier_epochs,
         "max_images": ev.classifier_max_images, "seed": ev.seed, "version": 1}
    )  # fmt: skip
    folder = (CLASSIFIER_DIR, f"{name}-{key}")
    channels = 1 if data.mode == "L" else 3
    if store.exists(*folder, "config.json") and store.exists(*folder, "model.safetensors"):
        config = store.read_json(*folder, "config.json")
        weights = store.read_bytes(*folder, "model.safetensors")
        how = "reused"
    else:
        images, labels, classes = _real_training_images(cfg)
        num_classes = len(classes) if classes else int(labels.max()) + 1
        log.info(
            "evaluate: training the %s feature classifier on %d real images", name, len(labels)
        )
        task = ray.remote(_train_task).options(num_cpus=1, num_gpus=gpus)
        weights, config = ray.get(
            task.remote(images, labels, num_classes, ev.classifier_epochs, ev.seed, gpus > 0)
        )
        config = {**config, "name": name, "key": key, "classes": classes}
        store.write_bytes(weights, *folder, "model.safetensors")
        store.write_bytes(config_bytes(config), *folder, "config.json")  # last: marks complete
        how = "trained"
    space = FeatureSpace(
        "classifier", name, channels, data.image_size, classifier=(weights, config)
    )
    return space, f"{how} ({store.uri(store.path(*folder))})"


def resolve_feature_space(cfg: Config, store: RunStore, gpus: float) -> tuple[FeatureSpace, str]:
    """`auto`: Inception when its weights file is found, else the classifier fallback."""
    ev, data = cfg.evaluate, cfg.data
    channels = 1 if data.mode == "L" else 3
    choice = ev.feature_space
    if choice == "auto":
        choice = INCEPTION if inception_available(ev.inception_weights) else "classifier"
        if choice == "classifier":
            log.warning(
                "evaluate: Inception weights %r not found; measuring in the fallback classifier "
                "feature space (FD_<name>, not FID). See docs/evaluate.md for real FID.",
                ev.inception_weights,
            )
    if choice == INCEPTION:
        from dedt_ray.encoders.inception import weights_path

        path = str(weights_path(ev.inception_weights))  # raises a clear FileNotFoundError
        return FeatureSpace(INCEPTION, INCEPTION, channels, data.image_size, weights=path), path
    return classifier_space(cfg, store, gpus)


# -- real side -----------------------------------------------------------------------------
def _subsample(batch: dict[str, np.ndarray], seed: int, fraction: float) -> dict[str, np.ndarray]:
    keys = id_keys(batch["id"], seed)
    keep = keys < fraction
    return {"id": batch["id"][keep], "label": batch["label"][keep], "image": batch["image"][keep]}


class _Featurize:
    """Ray Data actor: real images -> features `feature_<i>` in each space (+ reservoir keys)."""

    def __init__(
        self, spaces: list[FeatureSpace], use_gpu: bool, batch_size: int, seed: int,
        threads: int | None, actors: int,
    ) -> None:  # fmt: skip
        import torch

        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        if device == "cpu":
            use_actor_threads(threads, actors)
        self.extractors = [FeatureExtractor(space, device, batch_size) for space in spaces]
        self.seed = seed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {"label": batch["label"], "key": id_keys(batch["id"], self.seed + 1)}
        for i, extract in enumerate(self.extractors):
            out[f"feature_{i}"] = extract(batch["image"])
        return out


def real_features(
    cfg: Config, spaces: list[FeatureSpace], gpus: float, per_class: bool
) -> list[FeatureAccumulator]:
    """Stream the real images through the feature networks: one accumulator per space
    (per-class statistics in the first, the headline space, only)."""
    ev = cfg.evaluate
    source = open_source(cfg.data)
    ds = source.dataset
    if ev.max_real is not None:
        n = source.info.get("inputs") or ds.count()
        if n > ev.max_real:
            ds = ds.map_batches(
                _subsample, fn_kwargs={"seed": ev.seed, "fraction": ev.max_real / n},
                batch_size=1024,
            )  # fmt: skip
    ds = ds.map_batches(
        _Featurize,
        fn_constructor_kwargs={
            "spaces": spaces, "use_gpu": gpus > 0, "batch_size": ev.batch_size, "seed": ev.seed,
            "threads": ev.threads_per_actor, "actors": ev.actors,
        },
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=ev.actors),
        num_gpus=gpus,
        batch_size=ev.batch_size,
        batch_format="numpy",
    )  # fmt: skip
    accs = [
        FeatureAccumulator(ev.manifold_samples, per_class=per_class and i == 0, halves=True)
        for i in range(len(spaces))
    ]
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i, acc in enumerate(accs):
            acc.add(np.asarray(batch[f"feature_{i}"]), batch["label"], batch["key"])
    if accs[0].count < 2:
        raise ValueError(f"only {accs[0].count} real images: nothing to measure against")
    return accs


# -- generated side ------------------------------------------------------------------------
def generated_features(
    cfg: Config, store: RunStore, spaces: list[FeatureSpace], gpus: float,
    classes: list[int] | None, per_class: bool, n_real_classes: int,
    model: tuple[str, ...] = MODEL,
) -> tuple[list[FeatureAccumulator], np.ndarray, np.ndarray, dict[str, Any]]:  # fmt: skip
    """Sample the shares on an actor pool. (one accumulator per space, grid images, grid
    labels, how it ran: FLOPs per image, seconds, actors, torch threads of a CPU actor)."""
    ev = cfg.evaluate
    total = ev.num_samples or ev.samples_per_class * max(1, n_real_classes)
    shares = plan_shares(
        classes, ev.samples_per_class, total, ev.batch_size, ev.seed, ev.grid_columns
    )
    sampler = ray.remote(ShareSampler).options(num_cpus=1, num_gpus=gpus)
    device = "cuda" if gpus > 0 else "cpu"
    count = min(ev.actors, len(shares))
    actors = [
        sampler.remote(
            store.uri(store.path(*model)),
            ev.scheduler,
            ev.num_inference_steps,
            ev.guidance_scale,
            spaces,
            device,
            ev.batch_size,
            ev.threads_per_actor,
            count,
        )  # fmt: skip
        for _ in range(count)
    ]
    conditional = per_class and classes is not None
    accs = [
        FeatureAccumulator(ev.manifold_samples, per_class=conditional and i == 0)
        for i in range(len(spaces))
    ]
    grid_images, grid_labels, threads = [], [], None
    started = time.time()
    try:
        flops = ray.get(actors[0].flops_per_image.remote())
        pool = ray.util.ActorPool(actors)
        with Progress(len(shares), "evaluate: sampling", unit="batch") as progress:
            for i, out in enumerate(pool.map(lambda actor, share: actor.run.remote(share), shares)):
                for acc, features in zip(accs, out["all_features"], strict=True):
                    acc.add(features, out["labels"], out["keys"])
                grid_images.append(out["grid_images"])
                grid_labels.append(out["grid_labels"])
                threads = out["threads"]  # the same on every actor
                progress.update_to(i + 1, images=accs[0].count)
    finally:
        for actor in actors:
            ray.kill(actor)
    run = {
        "flops_per_image": flops,
        "seconds": round(time.time() - started, 3),
        "actors": count,
        "threads_per_actor": threads if device == "cpu" else None,
    }
    return accs, np.concatenate(grid_images), np.concatenate(grid_labels), run


def grid_png(
    images: np.ndarray,
    labels: np.ndarray,
    columns: int,
    rows: list[int] | None,
    names: list[str] | None = None,
) -> bytes:
    """samples.png: one row per class (`rows`), the class name in a left margin."""
    from PIL import Image, ImageDraw, ImageFont

    from dedt_ray.diffusion.sampling import image_grid

    tiles = samples_grid(images, labels, columns, rows)
    scale = max(1, GRID_CELL_PX // max(1, images.shape[1]))
    grid = image_grid(tiles, ncols=columns, scale=scale).convert("RGB")
    if rows is not None:
        texts = [names[r] if names and r < len(names) else str(r) for r in rows]
        font = ImageFont.load_default(size=max(10, min(16, images.shape[1] * scale // 2)))
        draw = ImageDraw.Draw(grid)
        margin = 8 + max(int(draw.textlength(t, font=font)) for t in texts)
        labelled = Image.new("RGB", (grid.width + margin, grid.height), "white")
        labelled.paste(grid, (margin, 0))
        draw = ImageDraw.Draw(labelled)
        row_h = grid.height / len(rows)
        for i, text in enumerate(texts):
            draw.text((4, (i + 0.5) * row_h), text, fill="black", font=font, anchor="lm")
        grid = labelled
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    return buf.getvalue()


# -- the stage -----------------------------------------------------------------------------
def selection_notes(cfg: Config, store: RunStore, spaces: list[FeatureSpace]) -> list[str]:
    """Warnings (logged, and kept for metrics.json) for metrics measured with the selection
    encoder's own weights."""
    notes = confound_notes(selection_encoder(cfg, store.manifest("embed")), spaces)
    for note in notes:
        log.warning("evaluate: %s", note)
    return notes


def measure(
    spaces: list[FeatureSpace],
    reals: list[FeatureAccumulator],
    fakes: list[FeatureAccumulator],
    settings: MetricSettings,
) -> tuple[dict[str, float | None], list[dict[str, Any]], list[str]]:
    """Metrics in every space (k-NN metrics in the headline space only); per-class rows of
    the headline space."""
    metrics, rows, notes = compute_metrics(
        reals[0], fakes[0], spaces[0].metric, spaces[0].kernel, settings
    )
    for space, real, fake in zip(spaces[1:], reals[1:], fakes[1:], strict=True):
        more, _, more_notes = compute_metrics(
            real, fake, space.metric, space.kernel, settings, manifold=False
        )
        metrics.update(more)
        notes += more_notes
    return metrics, rows, notes


def name_rows(rows: list[dict[str, Any]], class_names: list[str] | None) -> None:
    """Per-class rows in place: the class name, JSON-safe values."""
    names = class_names or []
    for row in rows:
        row["name"] = names[row["label"]] if row["label"] < len(names) else str(row["label"])
        row["value"], row["kid"] = json_number(row["value"]), json_number(row["kid"])


def samples_info(
    ev: Any, real: FeatureAccumulator, fake: FeatureAccumulator, conditional: bool
) -> dict[str, Any]:
    """metrics.json's `samples`: counts, the reservoir subsets KID and the k-NN metrics used."""
    return {
        "generated": fake.count,
        "real": real.count,
        "per_class": ev.samples_per_class if conditional else None,
        "manifold_real": len(real.subset),
        "manifold_generated": len(fake.subset),
        "kid_subset_size": min(ev.kid_subset_size, len(real.subset), len(fake.subset)),
        "kid_subsets": ev.kid_subsets,
        "nearest_k": ev.nearest_k,
        "coverage_k": ev.coverage_k,
    }


def summary_text(metrics: dict[str, Any], metric: str, kernel: str) -> str:
    """`FID 12.3, KID 0.0041, precision 0.712, recall 0.655` (n/a where missing)."""
    value = metrics.get(metric)
    parts = [f"{metric} {value:.4g}" if value is not None else f"{metric} n/a"]
    if metrics.get(f"{kernel}_mean") is not None:
        parts.append(f"{kernel} {metrics[f'{kernel}_mean']:.3g}")
    for k in ("precision", "recall"):
        if metrics.get(k) is not None:
            parts.append(f"{k} {metrics[k]:.3f}")
    return ", ".join(parts)


def run(cfg: Config, store: RunStore, ctx: StageContext) -> dict[str, Any]:
    ev = cfg.evaluate
    model = model_parts(ctx.inputs)
    classes, class_names, info = export_classes(store, model)
    gpus = ev.gpus_per_actor if ev.gpus_per_actor is not None else min(1.0, cluster_gpus())
    space, space_source = resolve_feature_space(cfg, store, gpus)
    spaces = [space, *extra_spaces(ev, space.in_channels, space.image_size)]
    log.info("evaluate: feature spaces %s (%s)", ", ".join(s.metric for s in spaces), space_source)

    # per-class statistics: a D x D matrix per class and side (guard against 1000 x 2048^2)
    dim = 2048 if space.kind == INCEPTION else int(space.classifier[1]["feature_dim"])
    n_classes = len(classes) if classes is not None else 0
    per_class = classes is not None and 2 * n_classes * dim * dim * 8 <= PER_CLASS_BYTES
    notes = selection_notes(cfg, store, spaces)
    if classes is not None and not per_class:
        notes.append(f"per-class distances skipped: {n_classes} classes x {dim}^2 statistics")

    reals = real_features(cfg, spaces, gpus, per_class)
    fakes, grid_images, grid_labels, sampled = generated_features(
        cfg, store, spaces, gpus, classes, per_class, len(reals[0].class_counts), model
    )
    metrics, per_class_rows, more_notes = measure(
        spaces, reals, fakes, MetricSettings.from_config(ev)
    )
    name_rows(per_class_rows, class_names)
    result = metrics_json(cfg, spaces, space_source, dim, metrics, reals[0], fakes[0], classes,
                          sampled, gpus, info, model, notes + more_notes)  # fmt: skip
    store.write_json(result, "evaluate", METRICS)
    update_card(store, model, {"Metrics": metrics_section(result)}, info)  # the model card
    store.write_json(
        {"metric": space.metric, "feature_space": space.name, "classes": per_class_rows},
        "evaluate",
        PER_CLASS,
    )
    png = grid_png(grid_images, grid_labels, ev.grid_columns, classes, class_names)
    store.write_bytes(png, "evaluate", SAMPLES)
    return {
        "rows": fakes[0].count,
        "real": reals[0].count,
        "metric": space.metric,
        "value": result["metrics"][space.metric],
        "feature_space": space.name,
        "flops_per_image": sampled["flops_per_image"],
        "sampling_seconds": sampled["seconds"],
        "summary": f"{summary_text(result['metrics'], space.metric, space.kernel)} on "
        f"{fakes[0].count} generated vs {reals[0].count} real "
        f"({ev.scheduler} {ev.num_inference_steps} steps)",
    }


def metrics_json(
    cfg: Config, spaces: list[FeatureSpace], space_source: str, dim: int,
    metrics: dict[str, Any], real: FeatureAccumulator, fake: FeatureAccumulator,
    classes: list[int] | None, sampled: dict[str, Any], gpus: float, info: dict[str, Any],
    model: tuple[str, ...], notes: list[str],
) -> dict[str, Any]:  # fmt: skip
    """evaluate/metrics.json: the metrics and how they were measured."""
    ev, space = cfg.evaluate, spaces[0]
    return {
        "metric": space.metric,
        "metrics": {k: json_number(v) for k, v in metrics.items()},
        "feature_space": {**space.describe(), "dim": dim, "source": space_source},
        "extra_spaces": [s.describe() for s in spaces[1:]],
        "samples": samples_info(ev, real, fake, classes is not None),
        "sampling": {
            "scheduler": ev.scheduler,
            "num_inference_steps": ev.num_inference_steps,
            "guidance_scale": ev.guidance_scale,
            "class_conditional": classes is not None,
            "flops_per_image": sampled["flops_per_image"],
            "seconds": sampled["seconds"],
            "images_per_s": (
                round(fake.count / sampled["seconds"], 3) if sampled["seconds"] > 0 else None
            ),
            "actors": sampled["actors"],
            "gpus_per_actor": gpus,
            "threads_per_actor": sampled["threads_per_actor"],  # torch threads on CPU
        },
        "model": {k: info.get(k) for k in ("steps", "images_seen", "flops") if k in info},
        "model_path": "/".join(model),
        "notes": notes,
    }
