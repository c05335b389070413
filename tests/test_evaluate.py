"""Evaluation: feature spaces, streaming metrics, sampling shares, and the `evaluate` stage."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dedt_ray.config import load_config
from dedt_ray.evaluate import (
    FeatureAccumulator,
    FeatureExtractor,
    FeatureSpace,
    MetricSettings,
    Reservoir,
    ShareSampler,
    classifier_name,
    compute_metrics,
    conform_images,
    kernel_distance,
    kernel_name,
    metric_name,
    plan_shares,
    samples_grid,
    train_classifier,
)
from dedt_ray.evaluate.classifier import SmallCNN, from_bytes, to_bytes
from dedt_ray.runtime import local_cores
from dedt_ray.store import RunStore

from runs import copy_run
from tiny_models import save_clip, save_dinov2, save_inception


def save_tiny_model(directory: Path, num_classes: int | None, seed: int = 0) -> None:
    """A random tiny UNet in the trainer's export layout (unet/, scheduler/, dedt_model.json)."""
    from diffusers import DDPMScheduler, UNet2DModel

    from dedt_ray.diffusion.export import save_export

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        num_class_embeds=num_classes + 1 if num_classes else None,
    )
    scheduler = DDPMScheduler(num_train_timesteps=100, clip_sample=False)
    info = {
        "num_classes": num_classes or 0,
        "null_class": num_classes,
        "class_conditional": bool(num_classes),
        "classes": [f"c{i}" for i in range(num_classes)] if num_classes else None,
        "steps": 10,
        "images_seen": 640,
        "flops": 1.5e9,
    }
    save_export(str(directory), unet, scheduler, info)


def _blobs(n_per_class: int, classes: int = 3, size: int = 8, seed: int = 0):
    """Images whose class is the bright quadrant (easily separable), uint8 NHWC grey."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    h = size // 2
    for c in range(classes):
        img = rng.integers(0, 60, (n_per_class, size, size, 1), dtype=np.uint8)
        r, q = divmod(c, 2)
        img[:, r * h : (r + 1) * h, q * h : (q + 1) * h] += 180
        images.append(img)
        labels.append(np.full(n_per_class, c))
    return np.concatenate(images), np.concatenate(labels)


def _classifier_space(seed: int = 0) -> FeatureSpace:
    torch.manual_seed(seed)
    net = SmallCNN(1, 3, 8, width=8, feature_dim=16).eval()
    config = {"in_channels": 1, "num_classes": 3, "input_size": 8, "width": 8, "feature_dim": 16}
    return FeatureSpace("classifier", "toy-cnn", 1, 8, classifier=(to_bytes(net), config))


# -- pure pieces ---------------------------------------------------------------------------
def test_metric_names_carry_the_feature_space() -> None:
    assert metric_name("inception", "inception") == "FID"
    assert metric_name("classifier", "digits-cnn") == "FD_digits-cnn"
    assert metric_name("dinov2", "dinov2") == "FD_dinov2"
    assert kernel_name("inception", "inception") == "KID"
    assert kernel_name("clip", "clip-l14") == "KD_clip-l14"
    assert _classifier_space().metric == "FD_toy-cnn" and _classifier_space().kernel == "KD_toy-cnn"
    assert classifier_name("digits", None) == "digits-cnn"
    assert classifier_name("cifar10", "/data/cifar-10-batches-py") == "cifar10-cnn"
    assert classifier_name("image_folder", "/data/My Pets/") == "my-pets-cnn"
    assert classifier_name("parquet", "s3://b/x/train.parquet") == "train-cnn"


def test_conform_images() -> None:
    rgb = np.zeros((2, 4, 4, 3), np.uint8)
    rgb[..., 0] = 200  # pure red: PIL's L = 0.299 * 200 = 59.8
    grey = conform_images(rgb, 4, 1)
    assert grey.shape == (2, 4, 4, 1) and (grey == 60).all()
    assert conform_images(grey, 4, 3).shape == (2, 4, 4, 3)
    up = conform_images(np.full((1, 4, 4, 1), 77, np.uint8), 8, 1)
    assert up.shape == (1, 8, 8, 1) and (up == 77).all()  # constant stays constant
    with pytest.raises(ValueError, match="uint8"):
        conform_images(np.zeros((1, 4, 4, 1), np.float32), 4, 1)


def test_reservoir_is_order_independent() -> None:
    rng = np.random.default_rng(0)
    keys, rows = rng.random(500), rng.standard_normal((500, 3))
    labels = rng.integers(0, 5, 500)
    a, b = Reservoir(40), Reservoir(40)
    for chunk in np.array_split(np.arange(500), 7):
        a.add(keys[chunk], rows[chunk], labels[chunk])
    for chunk in np.array_split(np.arange(500)[::-1], 3):
        b.add(keys[chunk], rows[chunk], labels[chunk])
    smallest = np.argsort(keys)[:40]
    for res in (a, b):
        assert len(res) == 40
        np.testing.assert_array_equal(res.rows, rows[smallest])
        np.testing.assert_array_equal(res.labels, labels[smallest])


def test_compute_metrics_identical_shifted_and_too_few(one_thread: None) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((600, 4))
    y = np.repeat([0, 1, 2], 200)
    keys = rng.random(600)

    def acc(feats, labels, batches=5, **kw):
        out = FeatureAccumulator(subset_size=300, **kw)
        for idx in np.array_split(np.arange(len(feats)), batches):
            out.add(feats[idx], labels[idx], keys[idx])
        return out

    real = acc(x, y, halves=True)
    assert real.count == 600 and real.class_counts == {0: 200, 1: 200, 2: 200}
    np.testing.assert_allclose(real.total.cov, np.cov(x, rowvar=False), rtol=1e-9)
    settings = MetricSettings(nearest_k=3, kid_subsets=10, kid_subset_size=100)
    same, rows, notes = compute_metrics(
        real, acc(x.copy(), y, batches=2), "FD_toy", "KD_toy", settings
    )
    assert abs(same["FD_toy"]) < 1e-8 and abs(same["FD_toy_class_mean"]) < 1e-8
    assert same["precision"] == 1.0 and same["recall"] == 1.0 and same["coverage"] == 1.0
    assert 0 < same["FD_toy_real_halves"] < 1.0  # sampling noise of two halves of 600
    assert not notes and [r["label"] for r in rows] == [0, 1, 2]
    # KID on the reservoirs (300 rows each, subsets of 100): about 0 for the same data
    assert abs(same["KD_toy_mean"]) < 3 * same["KD_toy_std"] + 1e-12
    assert same["KD_toy_mean"] == kernel_distance(real.subset.rows, real.subset.rows, 10, 100)[0]

    shifted = x.copy()
    shifted[y == 1] += 2.0  # class 1 moves by 2 in each of 4 dims: FD 16 for that class
    m, rows, _ = compute_metrics(real, acc(shifted, y), "FD_toy", "KD_toy", settings)
    by_class = {r["label"]: r["value"] for r in rows}
    assert by_class[1] == pytest.approx(16.0, rel=1e-6) and abs(by_class[0]) < 1e-8
    assert m["FD_toy_class_mean"] == pytest.approx(16.0 / 3, rel=1e-6)
    assert m["FD_toy"] > 1.0 and m["precision"] < 1.0
    kid_by_class = {r["label"]: r["kid"] for r in rows}
    assert kid_by_class[1] > 10 * max(abs(kid_by_class[0]), abs(kid_by_class[2]))
    assert m["KD_toy_mean"] > 3 * m["KD_toy_std"] > 0
    assert m["KD_toy_class_mean"] == pytest.approx(np.mean(list(kid_by_class.values())))

    tiny = FeatureAccumulator(10).add(x[:2], y[:2], keys[:2])
    m, _, notes = compute_metrics(real, tiny, "FD_toy", "KD_toy", settings)
    assert m["precision"] is None and any("precision/recall need" in n for n in notes)
    assert math.isfinite(m["FD_toy"]) and math.isfinite(m["KD_toy_mean"])
    m, _, _ = compute_metrics(real, acc(shifted, y), "FD_toy", "KD_toy", settings, manifold=False)
    assert "precision" not in m and "coverage" not in m


def test_classifier_learns_and_round_trips(one_thread: None) -> None:
    images, labels = _blobs(40)
    kwargs = {"epochs": 4, "batch_size": 16, "width": 8, "feature_dim": 16, "seed": 0}
    model, config = train_classifier(images, labels, 3, **kwargs)
    assert config["train_accuracy"] > 0.9 and config["val_accuracy"] > 0.9
    assert config["val_images"] == 12 and config["train_images"] == 108
    _, config2 = train_classifier(images, labels, 3, **kwargs)
    assert config2["train_loss"] == config["train_loss"]  # seeded: the same run twice

    space = FeatureSpace("classifier", "blobs-cnn", 1, 8, classifier=(to_bytes(model), config))
    feats = FeatureExtractor(space, batch_size=16)(images)
    assert feats.shape == (120, 16) and feats.dtype == np.float32
    with torch.no_grad():
        direct = model.features(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1)
    np.testing.assert_allclose(feats, direct.numpy(), rtol=1e-5, atol=1e-6)
    reloaded = from_bytes(to_bytes(model), config)
    pairs = zip(reloaded.state_dict().values(), model.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    # generated images at another size/channel count are conformed before the network
    rgb16 = np.repeat(np.kron(images[:4], np.ones((1, 2, 2, 1), np.uint8)), 3, axis=-1)
    assert FeatureExtractor(space)(rgb16).shape == (4, 16)

    with pytest.raises(ValueError, match="labelled"):
        train_classifier(images, np.full(120, -1), 3)


def test_plan_shares() -> None:
    shares = plan_shares([0, 1, 2], per_class=5, total=None, share_size=4, seed=3, grid_columns=2)
    assert [s.count for s in shares] == [4, 4, 4, 3]
    labels = [label for s in shares for label in s.labels]
    assert labels == [0] * 5 + [1] * 5 + [2] * 5
    assert len({s.seed for s in shares}) == 4
    assert [s.seed for s in shares] == [
        s.seed for s in plan_shares([0, 1, 2], 5, None, 4, 3, 2)
    ]  # stable
    grid = [(s.index, p) for s in shares for p in s.grid]  # first 2 of each class
    assert grid == [(0, 0), (0, 1), (1, 1), (1, 2), (2, 2), (2, 3)]
    unconditional = plan_shares(None, 5, total=7, share_size=5, seed=0, grid_columns=1)
    assert [s.count for s in unconditional] == [5, 2] and unconditional[0].labels is None
    with pytest.raises(ValueError):
        plan_shares(None, 5, None, 5, 0, 1)


def test_samples_grid_one_row_per_class() -> None:
    images = np.stack([np.full((2, 2, 1), v, np.uint8) for v in (10, 11, 20)])
    grid = samples_grid(images, np.array([1, 1, 2]), columns=3, rows=[0, 1, 2])
    assert grid.shape == (9, 2, 2, 1)
    values = grid[:, 0, 0, 0].tolist()
    assert values == [255, 255, 255, 10, 11, 255, 20, 255, 255]


def test_share_sampler_deterministic_and_flops(tmp_path: Path, one_thread: None) -> None:
    save_tiny_model(tmp_path / "model", num_classes=3)
    space = _classifier_space()
    sampler = ShareSampler(str(tmp_path / "model"), "ddim", 2, 1.0, space)
    share = plan_shares([0, 1, 2], 2, None, 6, seed=0, grid_columns=1)[0]
    a, b = sampler.run(share), sampler.run(share)
    np.testing.assert_array_equal(a["features"], b["features"])
    assert a["features"].shape == (6, 16) and a["labels"].tolist() == [0, 0, 1, 1, 2, 2]
    assert a["grid_images"].shape == (3, 8, 8, 1) and a["grid_labels"].tolist() == [0, 1, 2]
    other = plan_shares([0, 1, 2], 2, None, 6, seed=1, grid_columns=1)[0]
    assert not np.array_equal(sampler.run(other)["features"], a["features"])

    save_tiny_model(tmp_path / "uncond", num_classes=None)
    plain = ShareSampler(str(tmp_path / "uncond"), "ddpm", 2, 1.0, space)
    out = plain.run(plan_shares(None, 0, total=3, share_size=3, seed=0, grid_columns=2)[0])
    assert out["features"].shape == (3, 16) and out["labels"].tolist() == [-1, -1, -1]

    two_steps = sampler.flops_per_image()
    assert two_steps > 0
    four = ShareSampler(str(tmp_path / "model"), "ddim", 4, 1.0, space).flops_per_image()
    guided = ShareSampler(str(tmp_path / "model"), "ddim", 2, 3.0, space).flops_per_image()
    assert four == pytest.approx(2 * two_steps, rel=0.02)
    assert guided == pytest.approx(2 * two_steps, rel=0.02)  # conditional + unconditional pass


def test_actor_threads_share_the_node() -> None:
    from dedt_ray.runtime import actor_threads

    assert actor_threads(None, 1) == local_cores()
    assert actor_threads(None, 2 * local_cores()) == 1  # never 0
    assert actor_threads(3, 1) == 3  # the configured count, whatever the node


# -- the stage -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def evaluated(trained, tmp_path_factory):
    """One conditional evaluate run on 8 px digits of the session's trained tiny model
    (fallback feature space, plus tiny random CLIP and DINOv2 spaces; the data embedded
    for selection with that DINOv2, a real embed run), then a rerun."""
    from dedt_ray.pipeline import run_stage

    root = tmp_path_factory.mktemp("eval")
    clip, dinov2 = save_clip(root / "clip"), save_dinov2(root / "dinov2")
    store = copy_run(trained, root / "run", "train")
    cfg = load_config(
        None,
        ["data.image_size=8", "data.limit=400", "evaluate.samples_per_class=12",
         "evaluate.num_inference_steps=2", "evaluate.classifier_epochs=2",
         "evaluate.batch_size=64", "evaluate.grid_columns=6", "evaluate.nearest_k=3",
         "evaluate.kid_subsets=20", "evaluate.inception_weights=/nonexistent/pt_inception.pth",
         f"evaluate.extra_spaces=[{{encoder: clip, model: '{clip}'}}, "
         f"{{encoder: dinov2, model: '{dinov2}'}}]",
         "embed.encoder=dinov2", f"embed.model={dinov2}"],
    )  # fmt: skip
    run_stage("embed", cfg, store)
    warnings = _Records()
    logging.getLogger("dedt_ray").addHandler(warnings)
    try:
        first = run_stage("evaluate", cfg, store)
    finally:
        logging.getLogger("dedt_ray").removeHandler(warnings)
    metrics = store.read_json("evaluate", "metrics.json")
    weights = next(Path(store.path("classifier")).glob("*/model.safetensors"))
    stamp = os.stat(weights).st_mtime_ns
    again = run_stage("evaluate", cfg, store, force=True)
    return {
        "store": store, "cfg": cfg, "first": first, "again": again, "metrics": metrics,
        "weights": weights, "stamp": stamp, "warnings": warnings.messages,
    }  # fmt: skip


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_evaluate_stage_metrics(evaluated) -> None:
    store, m = evaluated["store"], evaluated["metrics"]
    assert m["metric"] == "FD_digits-cnn" and m["feature_space"]["kind"] == "classifier"
    assert not any("FID" in key or "KID" in key for key in m["metrics"])  # never, in a fallback
    spaces = (
        "FD_clip",
        "KD_clip_mean",
        "KD_clip_std",
        "FD_clip_real_halves",
        "FD_dinov2",
        "KD_dinov2_mean",
        "KD_dinov2_std",
        "FD_dinov2_real_halves",
    )
    assert set(m["metrics"]) == {
        "FD_digits-cnn", "FD_digits-cnn_class_mean", "FD_digits-cnn_real_halves",
        "KD_digits-cnn_mean", "KD_digits-cnn_std", "KD_digits-cnn_class_mean",
        "precision", "recall", "density", "coverage", *spaces,
    }  # fmt: skip
    values = m["metrics"]
    assert all(isinstance(v, float) and math.isfinite(v) for v in values.values())
    for k in ("precision", "recall", "coverage"):
        assert 0.0 <= values[k] <= 1.0
    # random weights are far from the data; two halves of the real data are close
    for fd in ("FD_digits-cnn", "FD_clip", "FD_dinov2"):
        assert values[fd] > 3 * values[f"{fd}_real_halves"]
    for kd in ("KD_digits-cnn", "KD_clip", "KD_dinov2"):
        assert values[f"{kd}_mean"] > 3 * values[f"{kd}_std"]
    assert [s["metric"] for s in m["extra_spaces"]] == ["FD_clip", "FD_dinov2"]
    assert m["samples"]["kid_subset_size"] == 120 and m["samples"]["kid_subsets"] == 20
    assert m["samples"]["generated"] == 120 and m["samples"]["real"] == 400
    assert m["sampling"]["flops_per_image"] > 0 and m["sampling"]["num_inference_steps"] == 2
    # Ray starts the 1-CPU sampler actor with one OpenMP thread; it takes its share of the node
    assert m["sampling"]["actors"] == 1
    assert m["sampling"]["threads_per_actor"] == local_cores()
    assert m["feature_space"]["val_accuracy"] > 0.5  # the classifier learnt the digits

    per_class = store.read_json("evaluate", "per_class.json")
    assert per_class["metric"] == "FD_digits-cnn"
    assert [c["label"] for c in per_class["classes"]] == list(range(10))
    assert all(c["generated"] == 12 and c["real"] > 10 for c in per_class["classes"])
    names = store.read_json("train", "model", "dedt_model.json")["classes"]  # the export's
    assert [c["name"] for c in per_class["classes"]] == names == [str(i) for i in range(10)]
    assert all(math.isfinite(c["kid"]) for c in per_class["classes"])
    assert sum(c["real"] for c in per_class["classes"]) == 400

    png = Image.open(io.BytesIO(store.read_bytes("evaluate", "samples.png")))
    cell = 8 * 4  # 8 px enlarged 4x, tiled by diffusers' make_image_grid (no padding)
    assert png.height == 10 * cell  # one row per class
    assert png.width > 6 * cell  # six columns plus the class-name margin
    assert evaluated["first"]["metric"] == "FD_digits-cnn"
    assert "FD_digits-cnn" in evaluated["first"]["summary"]


def test_evaluate_warns_when_a_metric_uses_the_selection_encoder(evaluated) -> None:
    """Selection with DINOv2 and an FD_dinov2 in the same weights: a note and a log warning,
    for that space only."""
    notes = evaluated["metrics"]["notes"]
    confounded = [n for n in notes if "selection encoder" in n]
    assert len(confounded) == 1 and confounded[0].startswith("FD_dinov2 and KD_dinov2")
    assert any("FD_dinov2 and KD_dinov2" in w for w in evaluated["warnings"])
    assert not any("FD_clip" in n or "FD_digits-cnn" in n for n in confounded)


def test_evaluate_rerun_reuses_classifier_and_is_deterministic(evaluated) -> None:
    store = evaluated["store"]
    again = store.read_json("evaluate", "metrics.json")
    assert again["feature_space"]["source"].startswith("reused")
    assert evaluated["metrics"]["feature_space"]["source"].startswith("trained")
    assert os.stat(evaluated["weights"]).st_mtime_ns == evaluated["stamp"]
    assert json.loads((evaluated["weights"].parent / "config.json").read_text())["name"] == (
        "digits-cnn"
    )
    assert again["metrics"] == evaluated["metrics"]["metrics"]  # same seeds, same numbers
    assert evaluated["again"]["output_id"] != evaluated["first"]["output_id"]


def test_evaluate_then_report_numbers_match(evaluated) -> None:
    from test_report import parse_tables

    from dedt_ray.pipeline import run_stage

    store = evaluated["store"]
    run_stage("report", evaluated["cfg"], store)
    page = Path(store.path("report.html")).read_text()
    tables = parse_tables(page)
    metrics = store.read_json("evaluate", "metrics.json")["metrics"]
    shown = {row[0][0]: row[1] for row in tables["metrics"]}
    assert set(shown) == set(metrics)
    for name, value in metrics.items():
        assert float(shown[name][0]) == pytest.approx(value, rel=1e-5)
        assert float(shown[name][1]) == value  # data-value holds the exact number
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)  # not the images' bytes
    assert "FID" not in text.replace("not FID", "")
    assert "FD_dinov2 and KD_dinov2 are measured with the selection encoder" in page


def test_auto_picks_inception_when_its_weights_exist(
    tmp_path: Path, one_thread: None, inception_file: Path
) -> None:
    """With the weights file present, `auto` measures real FID (random weights here)."""
    from dedt_ray.evaluate.stage import resolve_feature_space

    weights = inception_file
    cfg = load_config(None, ["data.image_size=8", f"evaluate.inception_weights={weights}"])
    store = RunStore(str(tmp_path / "run"))
    space, source = resolve_feature_space(cfg, store, 0.0)
    assert (space.kind, space.metric, source) == ("inception", "FID", str(weights))
    images, _ = _blobs(1)
    feats = FeatureExtractor(space)(images[:2])
    assert feats.shape == (2, 2048) and np.isfinite(feats).all() and feats.std() > 0
    assert not store.exists("classifier")  # no fallback classifier was trained


def test_inception_requested_but_missing(tmp_path: Path) -> None:
    from dedt_ray.evaluate.stage import resolve_feature_space

    cfg = load_config(
        None, ["evaluate.feature_space=inception", "evaluate.inception_weights=/no/such.pth"]
    )
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        resolve_feature_space(cfg, RunStore(str(tmp_path / "run")), 0.0)


def test_confound_warning_for_inception_selection(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, inception_file: Path
) -> None:
    """embed.encoder=inception with FID's own weights file (or a copy of it) is flagged."""
    import shutil

    from dedt_ray.evaluate.spaces import confound_notes, same_weights, selection_encoder
    from dedt_ray.evaluate.stage import resolve_feature_space, selection_notes

    weights = inception_file
    copy = shutil.copy(weights, tmp_path / "copy.pth")
    other = save_inception(tmp_path / "other" / "other.pth", seed=1)
    cfg = load_config(
        None,
        ["data.image_size=8", f"evaluate.inception_weights={weights}",
         "embed.encoder=inception", f"embed.model={copy}"],
    )  # fmt: skip
    store = RunStore(str(tmp_path / "run"))
    space, _ = resolve_feature_space(cfg, store, 0.0)
    with caplog.at_level(logging.WARNING, logger="dedt_ray"):
        notes = selection_notes(cfg, store, [space])  # no embed manifest: the config says
    assert len(notes) == 1 and notes[0].startswith("FID and KID are measured with")
    assert "Kynkaanniemi" in notes[0] and any("FID and KID" in r.message for r in caplog.records)

    assert same_weights("inception", str(weights), "inception", str(weights))
    assert not same_weights("inception", str(other), "inception", str(weights))
    assert not same_weights("clip", str(weights), "inception", str(weights))
    # weights not on this machine: their names decide
    assert same_weights("inception", "/elsewhere/pt_inception.pth", "inception", str(weights))
    assert not confound_notes(("inception", str(other)), [space])
    assert not confound_notes(None, [space])

    # the embed manifest (what ran) wins over the config; no selection, no confound
    assert selection_encoder(cfg, {"encoder": "clip", "model": "/m/clip"}) == ("clip", "/m/clip")
    assert selection_encoder(cfg, None) == ("inception", str(copy))
    unselected = load_config(None, ["select.enabled=false"])
    assert selection_encoder(unselected, {"encoder": "inception", "model": "x"}) is None


def test_extra_spaces_config_and_missing_weights(tmp_path: Path) -> None:
    from dedt_ray.config import ConfigError
    from dedt_ray.evaluate.spaces import extra_spaces

    dinov2 = save_dinov2(tmp_path / "dinov2")
    cfg = load_config(None, [f"evaluate.extra_spaces=[{{encoder: dinov2, model: '{dinov2}'}}]"])
    (space,) = extra_spaces(cfg.evaluate, 1, 8)
    assert (space.kind, space.metric, space.kernel) == ("dinov2", "FD_dinov2", "KD_dinov2")
    feats = FeatureExtractor(space)(_blobs(2)[0])  # grey 8 px, conformed and repeated to RGB
    assert feats.shape == (6, 32) and np.isfinite(feats).all()

    twice = f"[{{encoder: dinov2, model: '{dinov2}'}}, {{encoder: dinov2, model: x}}]"
    with pytest.raises(ConfigError, match="unique, dinov2 repeats"):
        load_config(None, [f"evaluate.extra_spaces={twice}"])
    named = f"[{{encoder: dinov2, model: '{dinov2}'}}, {{encoder: dinov2, model: x, name: d2}}]"
    assert [e.label for e in load_config(None, [f"evaluate.extra_spaces={named}"]).evaluate
            .extra_spaces] == ["dinov2", "d2"]  # fmt: skip
    with pytest.raises(ConfigError, match="extra_spaces"):
        load_config(None, ["evaluate.extra_spaces=[{encoder: inception, model: x}]"])
    absent = f"[{{encoder: clip, model: '{tmp_path}/no'}}]"
    missing = load_config(None, [f"evaluate.extra_spaces={absent}"])
    with pytest.raises(FileNotFoundError, match=r"extra_spaces\[0\].model.*never downloaded"):
        extra_spaces(missing.evaluate, 1, 8)
