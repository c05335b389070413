"""report.html: self-contained, missing stages left out, numbers equal the JSON artifacts.

The run reported is the session's real `trained` run (embed -> select -> reference ->
reweight -> train) with an evaluate stage written by hand (its values pick the formatting
cases: None, long decimals); test_evaluate.py reports a real evaluate run too."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dedt_ray.config import load_config
from dedt_ray.report import REPORT, collect, render, stage_flops
from dedt_ray.report import run as report_run
from dedt_ray.stages import StageContext
from dedt_ray.store import RunStore

from runs import copy_run


class _Tables(HTMLParser):
    """Rows of every <table id=...>: each cell as (text, data-value or None)."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[tuple[str, str | None]]]] = {}
        self._table: str | None = None
        self._row: list[tuple[str, str | None]] | None = None
        self._cell: list[str] | None = None
        self._value: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table":
            self._table = a.get("id") or f"table{len(self.tables)}"
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self._row = []
        elif tag == "td" and self._row is not None:
            self._cell, self._value = [], a.get("data-value")

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            self._row.append(("".join(self._cell).strip(), self._value))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            if self._row:  # header rows have no <td>
                self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def parse_tables(page: str) -> dict[str, list[list[tuple[str, str | None]]]]:
    parser = _Tables()
    parser.feed(page)
    return parser.tables


def _png(color: tuple[int, int, int], size: tuple[int, int] = (60, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def _history(store: RunStore, steps: int, scale: float) -> None:
    rows = [
        {"step": s, "loss": scale / s, "lr": 1e-3 * min(1, s / 3), "images_seen": 64 * s}
        for s in range(1, steps + 1)
    ]
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    store.write_bytes(sink.getvalue().to_pybytes(), "train", "metrics.parquet")


def _train_manifest(store: RunStore, images: int, flops: float, wall: float) -> None:
    store.write_manifest(
        "train",
        {"stage": "train", "output_id": "t", "seconds": wall + 2.0, "rows": images // 10,
         "steps": 10, "images_seen": images, "flops": flops, "train_wall_seconds": wall,
         "final_loss": 0.0312, "started": "2026-01-01T00:00:00+00:00", "summary": "10 steps"},
    )  # fmt: skip


UPSTREAM = ("embed", "select", "reference", "reweight", "train")


@pytest.fixture
def full_run(trained, tmp_path: Path) -> tuple[RunStore, str]:
    """A run directory with every artifact the report shows, plus a baseline run that
    trained twice the FLOPs in 2.5 times the wall time."""
    store = copy_run(trained, tmp_path / "run", *UPSTREAM)
    store.write_manifest("evaluate", {"output_id": "v", "seconds": 7.0, "rows": 120})
    metrics = {
        "metric": "FD_digits-cnn",
        "metrics": {"FD_digits-cnn": 12.345678912, "FD_digits-cnn_class_mean": 30.1,
                    "FD_digits-cnn_real_halves": 0.8123456, "precision": 0.625,
                    "recall": 0.4, "density": 1.0625, "coverage": None},
        "feature_space": {"kind": "classifier", "name": "digits-cnn", "metric": "FD_digits-cnn",
                          "key": "k1", "feature_dim": 128, "val_accuracy": 0.97},
        "samples": {"generated": 120, "real": 400},
        "sampling": {"scheduler": "ddim", "num_inference_steps": 2, "guidance_scale": 1.0,
                     "flops_per_image": 22953984},
        "notes": ["a note"],
    }  # fmt: skip
    store.write_json(metrics, "evaluate", "metrics.json")
    store.write_json(
        {"metric": "FD_digits-cnn", "classes": [
            {"label": 0, "name": "zero", "value": 11.5, "real": 40, "generated": 12},
            {"label": 1, "name": "one", "value": None, "real": 1, "generated": 12}]},
        "evaluate", "per_class.json",
    )  # fmt: skip
    store.write_bytes(_png((20, 160, 20), (80, 80)), "evaluate", "samples.png")

    base = RunStore(str(tmp_path / "baseline"))
    train = store.manifest("train")
    _train_manifest(base, 2 * train["images_seen"], 2 * train["flops"],
                    2.5 * train["train_wall_seconds"])  # fmt: skip
    _history(base, 20, 2.0)
    store_metrics = {**metrics, "metrics": {**metrics["metrics"], "FD_digits-cnn": 10.0}}
    base.write_json(store_metrics, "evaluate", "metrics.json")
    base.write_manifest("evaluate", {"output_id": "bv", "seconds": 7.0})
    return store, str(tmp_path / "baseline")


def test_report_sections_and_numbers_match_json(full_run) -> None:
    store, baseline = full_run
    cfg = load_config(None, [f"report.baseline_run={baseline}"])
    manifest = report_run(cfg, store, StageContext())
    assert manifest["stages"] == [*UPSTREAM, "evaluate"]  # in DAG order
    page = Path(store.path(REPORT)).read_text()

    # self-contained: no external resources, every image a decodable PNG data URI
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", page)
    assert "url(" not in page and "<script" not in page and "<link" not in page
    sources = re.findall(r'<img[^>]*src="([^"]+)"', page)
    weight_plots = [n for n in store.list("reweight") if n.endswith(".png")]
    assert len(weight_plots) == 2  # selection, weight plots, loss curve, samples:
    assert len(sources) == 1 + len(weight_plots) + 1 + 1
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    for section in ("stages", "selection", "class-weights", "training", "samples", "metrics",
                    "per-class", "compute", "config"):  # fmt: skip
        assert f'<section id="{section}">' in page

    tables = parse_tables(page)
    metrics = store.read_json("evaluate", "metrics.json")["metrics"]
    shown = {row[0][0]: row[1] for row in tables["metrics"]}
    assert list(shown) == list(metrics)
    for name, value in metrics.items():
        text, exact = shown[name]
        if value is None:
            assert text == "n/a" and exact is None
        else:
            assert float(text) == pytest.approx(value, rel=1e-5) and float(exact) == value

    per_class = store.read_json("evaluate", "per_class.json")["classes"]
    assert len(tables["per-class"]) == len(per_class)
    for row, want in zip(tables["per-class"], per_class, strict=True):
        assert int(row[0][0]) == want["label"] and row[1][0] == want["name"]
        assert (row[2][0] == "n/a") if want["value"] is None else float(row[2][0]) == want["value"]
        assert int(row[3][0]) == want["real"] and int(row[4][0]) == want["generated"]

    stages = {row[0][0]: [c[1] for c in row] for row in tables["stages"]}  # exact values
    assert list(stages) == [*UPSTREAM, "evaluate"]
    select, embed, train = (store.manifest(s) for s in ("select", "embed", "train"))
    assert repr(select["kept"]) in stages["select"] and repr(embed["seconds"]) in stages["embed"]

    compute = {row[0][0]: row[1:] for row in tables["compute"]}
    flops = compute["training FLOPs"]
    assert float(flops[0][1]) == train["flops"] and float(flops[1][1]) == 2 * train["flops"]
    assert float(flops[2][1]) == pytest.approx(2.0)  # baseline / this run
    assert float(compute["training wall seconds"][2][1]) == pytest.approx(2.5)
    assert float(compute["FD_digits-cnn"][0][0]) == pytest.approx(12.345678912, rel=1e-5)
    assert float(compute["FD_digits-cnn"][1][0]) == 10.0
    assert f"baseline_run: {baseline}" in page  # the resolved config is shown
    assert "not FID" in page  # the fallback space is labelled as such


def test_report_leaves_out_missing_stages(tmp_path: Path) -> None:
    store = RunStore(str(tmp_path / "empty"))
    cfg = load_config(None, [f"report.baseline_run={tmp_path / 'nowhere'}"])
    page = render(collect(store, "seed: 0\n", cfg.report.baseline_run))
    assert "<img" not in page and "<table" not in page
    assert '<section id="config">' in page and "not found" in page
    assert not (tmp_path / "nowhere").exists()  # a missing baseline is not created

    _train_manifest(store, 64, 1e9, 1.0)  # only a train manifest, no history file
    page = render(collect(store, "seed: 0\n"))
    assert '<section id="training">' in page and "<img" not in page
    assert '<section id="metrics">' not in page
    # compute per stage is always there; the saving needs the data's size (embed)
    assert '<table id="compute-stages">' in page and 'id="compute-saving"' not in page


def test_report_stage_rerenders_every_time(ray_cluster, full_run) -> None:
    from dedt_ray.pipeline import run_stage

    store, _ = full_run
    cfg = load_config(None, [])
    first = run_stage("report", cfg, store)
    page = Path(store.path(REPORT)).read_text()
    assert 'id="compute-saving"' in page and "(estimate)" in page  # without a baseline too
    assert '<table id="compute">' not in page  # the measured comparison needs a baseline
    store.write_manifest("tune", {"output_id": "x", "seconds": 1.0, "summary": "a new stage"})
    second = run_stage("report", cfg, store)
    assert not second.get("skipped_stage") and second["output_id"] != first["output_id"]
    assert "a new stage" in Path(store.path(REPORT)).read_text()


def screenshot(html_path: Path, png: Path, profile: Path) -> Image.Image:
    """Headless Chromium screenshot of a local HTML file (no network, no GPU)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium
    subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", f"--user-data-dir={profile}", f"--screenshot={png}",
         "--window-size=1200,3000", html_path.as_uri()],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return Image.open(png).convert("RGB")


@pytest.mark.skipif(
    not (shutil.which("chromium") or shutil.which("chromium-browser")), reason="no chromium"
)
def test_report_renders_in_headless_chromium(full_run, tmp_path: Path) -> None:
    store, baseline = full_run
    # solid colours in the run's images, so the screenshot can find them
    store.write_bytes(_png((200, 30, 30)), "select", "examples.png")
    store.write_bytes(_png((30, 30, 200)), "reweight", "class_weights.png")
    report_run(load_config(None, [f"report.baseline_run={baseline}"]), store, StageContext())
    shot = screenshot(Path(store.path(REPORT)), tmp_path / "shot.png", tmp_path / "profile")
    assert shot.size == (1200, 3000)
    pixels = np.asarray(shot, dtype=np.int16)
    ink = (pixels < 200).any(axis=-1)
    assert ink.mean() > 0.01  # text and images were drawn
    assert ink[:300].any() and ink[1500:].any()  # content from the top to far down the page
    # the embedded images rendered: their solid colours appear on screen
    for color in ((200, 30, 30), (30, 30, 200), (20, 160, 20)):
        assert (np.abs(pixels - np.array(color)).sum(axis=-1) < 12).sum() > 500


def test_tune_section_from_results(tmp_path: Path) -> None:
    """A run directory with sweep output gets the trials table, Pareto plot and best config."""
    store = RunStore(str(tmp_path / "sweep"))
    rows = [
        {"trial_id": "a", "status": "done", "quality": 3.5, "metric_name": "FD_digits-cnn",
         "train_flops": 2e12, "train_rows": 900, "pareto": True, "param.select.keep_ratio": 0.5},
        {"trial_id": "b", "status": "stopped", "quality": None, "metric_name": None,
         "train_flops": 1e12, "train_rows": 300, "pareto": None, "param.select.keep_ratio": 0.2},
    ]  # fmt: skip
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    store.write_bytes(sink.getvalue().to_pybytes(), "tune", "results.parquet")
    store.write_bytes(_png((20, 160, 20)), "tune", "pareto.png")
    store.write_text("# best of 1\nselect:\n  keep_ratio: 0.5\n", "tune", "best.yaml")
    page = render(collect(store, "seed: 0\n"))
    table = parse_tables(page)["tune"]
    assert [r[0][0] for r in table] == ["a", "b"]
    assert table[0][2] == ("3.5", "3.5") and table[1][1][0] == "stopped"
    assert "1 evaluated" in page and "keep_ratio: 0.5" in page
    assert "Pareto front" in page and page.count("data:image/png") == 1
    assert '<section id="tune">' not in render(collect(RunStore(str(tmp_path / "x")), ""))


def test_compute_per_stage_and_saving_estimate_without_baseline(full_run) -> None:
    """Issue 18 item 12: compute per stage and the saving against all the data for the same
    epochs, in every report (no baseline run here), labelled an estimate."""
    store, _ = full_run
    store.write_manifest(
        "reference", {"output_id": "f", "seconds": 4.0, "rows": 640, "flops": 1.0e11}
    )
    train = {**store.manifest("train"), "seconds": 42.0, "flops": 3.2e12, "rows": 640,
             "train_wall_seconds": 40.0}  # fmt: skip
    store.write_manifest("train", train)
    total = store.manifest("embed")["rows"]
    others = sum(  # the copied run's own reweight / tdc compute counts too
        stage_flops(n, store.manifest(n)) or 0.0 for n in ("reweight", "tdc") if store.manifest(n)
    )
    page = render(collect(store, "seed: 0\n"))
    assert "estimate" in page and '<table id="compute">' not in page
    tables = parse_tables(page)
    per_stage = {row[0][0]: [c[0] for c in row[1:]] for row in tables["compute-stages"]}
    assert per_stage["train"] == ["42", "3.2e+12"] and per_stage["reference"] == ["4", "1e+11"]
    assert float(per_stage["embed"][1]) == store.manifest("embed")["flops"]  # the encoder's
    assert per_stage["select"][1] == "n/a"  # selection counts none
    saving = {row[0][0]: [float(c[1]) for c in row[1:]] for row in tables["compute-saving"]}
    # 640 of `total` images for the same epochs; all of them costs total/640 as much
    this, full, saved = saving["training FLOPs"]
    assert this == pytest.approx(3.2e12 + 1.0e11 + others, rel=1e-5)
    assert full == pytest.approx(3.2e12 * total / 640, rel=1e-5)
    assert saved == pytest.approx(1 - this / full)
    seconds = saving["wall seconds"]  # select + reference + reweight + tdc + train
    spent = sum(m["seconds"] for m in map(store.manifest, ("select", "reweight", "tdc")) if m)
    assert seconds[0] == pytest.approx(spent + 4.0 + 42.0)
    assert seconds[1] == pytest.approx(42 + 40 * (total / 640 - 1))
