"""Stage `report`: one self-contained `<run>/report.html` per run (images as data URIs).

`collect(store, ...)` reads whatever artifacts exist (a missing stage is simply left out);
`render(report)` is pure and turns that into HTML. Sections: stages (counts, timings),
selection picture, class weights, training curves, samples, metrics, per-class metrics,
compute per stage with the saving against all the data for the same epochs (an estimate), and
versus a full-data baseline run when `report.baseline_run` is set, the sweep (`<run>/tune/`:
results table, Pareto plot, best config, when `dedt-ray tune` ran there), the study
(`<run>/study/`: curves, speed-up table, when `dedt-ray study` ran there), the resolved config.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import posixpath
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow.fs as pafs

from dedt_ray.artifacts import parquet_rows
from dedt_ray.config import Config, dump_config
from dedt_ray.stages import STAGES, StageContext
from dedt_ray.store import MANIFEST, RunStore

log = logging.getLogger("dedt_ray")

REPORT = "report.html"
STAGE_ORDER = tuple(STAGES)  # the pipeline's order
COUNT_KEYS = ("rows", "kept", "skipped", "real", "steps", "images_seen")


@dataclass
class RunArtifacts:
    """What one run directory holds (each part None / empty when its stage did not run)."""

    root: str
    manifests: dict[str, dict[str, Any]] = field(default_factory=dict)
    select_png: bytes | None = None
    select_duplicates_png: bytes | None = None  # select/duplicates.png when dedup removed rows
    reweight_pngs: dict[str, bytes] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    curves: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # <stage>/curve.parquet
    metrics: dict[str, Any] | None = None
    per_class: dict[str, Any] | None = None
    samples_png: bytes | None = None
    tune_rows: list[dict[str, Any]] = field(default_factory=list)  # tune/results.parquet
    tune_png: bytes | None = None
    tune_best_yaml: str | None = None
    study: dict[str, Any] | None = None  # study/summary.json (`dedt-ray study`)
    study_png: bytes | None = None


@dataclass
class Report:
    run: RunArtifacts
    config_yaml: str
    baseline: RunArtifacts | None = None
    baseline_note: str | None = None
    created: str = ""


# -- reading -------------------------------------------------------------------------------
def _maybe_bytes(store: RunStore, *parts: str) -> bytes | None:
    return store.read_bytes(*parts) if store.exists(*parts) else None


def read_history(store: RunStore) -> list[dict[str, Any]]:
    """The trainer's metrics history (`train/metrics.parquet`: step, loss, lr, ...) as rows."""
    data = _maybe_bytes(store, "train", "metrics.parquet")
    if data is None:
        return []
    return parquet_rows(data, store.uri(store.path("train", "metrics.parquet")))


def read_run(store: RunStore, skip: tuple[str, ...] = ("report",)) -> RunArtifacts:
    """Every artifact the report shows, from one run directory."""
    art = RunArtifacts(root=store.uri(store.root))
    for name in store.list():
        if name in skip or name.startswith((".", "_")):
            continue
        manifest = store.manifest(name) if store.exists(name, MANIFEST) else None
        if manifest is not None:
            art.manifests[name] = manifest
    if "select" in art.manifests:
        art.select_png = _maybe_bytes(store, "select", "examples.png")
        art.select_duplicates_png = _maybe_bytes(store, "select", "duplicates.png")
    if "reweight" in art.manifests:
        for name in store.list("reweight"):
            if name.lower().endswith(".png"):
                art.reweight_pngs[name] = store.read_bytes("reweight", name)
    if "train" in art.manifests:
        art.history = read_history(store)
    for stage in ("train", "tdc"):
        data = _maybe_bytes(store, stage, "curve.parquet") if stage in art.manifests else None
        if data is not None:
            art.curves[stage] = parquet_rows(data, store.uri(store.path(stage, "curve.parquet")))
    if "evaluate" in art.manifests:
        if store.exists("evaluate", "metrics.json"):
            art.metrics = store.read_json("evaluate", "metrics.json")
        if store.exists("evaluate", "per_class.json"):
            art.per_class = store.read_json("evaluate", "per_class.json")
        art.samples_png = _maybe_bytes(store, "evaluate", "samples.png")
    results = _maybe_bytes(store, "tune", "results.parquet")
    if results is not None:
        art.tune_rows = parquet_rows(results, store.uri(store.path("tune", "results.parquet")))
        art.tune_png = _maybe_bytes(store, "tune", "pareto.png")
        best = _maybe_bytes(store, "tune", "best.yaml")
        art.tune_best_yaml = best.decode() if best is not None else None
    if store.exists("study", "summary.json"):
        art.study = store.read_json("study", "summary.json")
        art.study_png = _maybe_bytes(store, "study", "curves.png")
    return art


def _open_existing(root: str) -> RunStore | None:
    """A RunStore for an existing directory (RunStore itself would create a missing one)."""
    if "://" in root:
        fs, path = pafs.FileSystem.from_uri(root)
    else:
        fs, path = pafs.LocalFileSystem(), posixpath.abspath(root)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return None
    return RunStore(root)


def collect(store: RunStore, config_yaml: str, baseline_run: str | None = None) -> Report:
    report = Report(
        run=read_run(store),
        config_yaml=config_yaml,
        created=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )
    if baseline_run:
        base = _open_existing(baseline_run)
        if base is None:
            report.baseline_note = f"baseline run {baseline_run} not found"
        else:
            report.baseline = read_run(base)
    return report


# -- formatting ----------------------------------------------------------------------------
def fmt(value: Any) -> str:
    """Numbers as they appear in the tables (and parse back): ints whole, floats to 6 digits."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.6g}"
    return str(value)


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _td(value: Any) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f'<td class="num" data-value="{_e(repr(value))}">{_e(fmt(value))}</td>'
    return f"<td>{_e(fmt(value))}</td>"


def _table(table_id: str, header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_td(v) for v in row) + "</tr>" for row in rows)
    return f'<table id="{_e(table_id)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _img(png: bytes, alt: str, pixelated: bool = False) -> str:
    data = base64.b64encode(png).decode()
    cls = ' class="pixelated"' if pixelated else ""
    return f'<img{cls} alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _section(section_id: str, title: str, body: str) -> str:
    return f'<section id="{_e(section_id)}"><h2>{_e(title)}</h2>{body}</section>'


def _ratio(base: Any, this: Any) -> float | None:
    if not isinstance(base, int | float) or not isinstance(this, int | float) or not this:
        return None
    return float(base) / float(this)


# -- sections ------------------------------------------------------------------------------
def _stage_names(manifests: dict[str, Any]) -> list[str]:
    known = [s for s in STAGE_ORDER if s in manifests]
    return known + sorted(s for s in manifests if s not in STAGE_ORDER)


def _count(value: Any) -> Any:
    return value if isinstance(value, int | float) and not isinstance(value, bool) else ""


def stages_section(run: RunArtifacts) -> str:
    """One row per completed stage: counts from its manifest (blank where it has none)."""
    if not run.manifests:
        return ""
    names = _stage_names(run.manifests)
    keys = [k for k in COUNT_KEYS if any(_count(run.manifests[n].get(k)) != "" for n in names)]
    rows = []
    for name in names:
        m = run.manifests[name]
        started = str(m.get("started", ""))[:19].replace("T", " ")
        counts = [_count(m.get(k)) for k in keys]
        rows.append([name, *counts, _count(m.get("seconds")), started, m.get("summary", "")])
    header = ["stage", *keys, "seconds", "started (UTC)", "summary"]
    return _section("stages", "Stages", _table("stages", header, rows))


def selection_section(run: RunArtifacts) -> str:
    m = run.manifests.get("select")
    if m is None:
        return ""
    body = f"<p>{_e(m.get('summary', ''))}</p>"
    if run.select_png:
        body += _img(run.select_png, "selection examples")
    if run.select_duplicates_png:
        body += _img(run.select_duplicates_png, "near-duplicate pairs removed")
    per_class = m.get("per_class") or []
    if per_class:
        rows = [[c.get("label"), c.get("n"), c.get("kept")] for c in per_class]
        body += _table("select-classes", ["class", "images", "kept"], rows)
    return _section("selection", "Selection", body)


def reweight_section(run: RunArtifacts) -> str:
    if not run.reweight_pngs:
        return ""
    body = "".join(
        f"<figure>{_img(png, name)}<figcaption>{_e(name)}</figcaption></figure>"
        for name, png in sorted(run.reweight_pngs.items())
    )
    summary = run.manifests.get("reweight", {}).get("summary")
    return _section(
        "class-weights", "Class weights", (f"<p>{_e(summary)}</p>" if summary else "") + body
    )


def loss_png(history: list[dict[str, Any]], baseline: list[dict[str, Any]] | None) -> bytes | None:
    """Loss (and learning rate, when logged) against step; the baseline's loss dashed."""
    rows = [r for r in history if r.get("step") is not None and r.get("loss") is not None]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_lr = any(r.get("lr") is not None for r in rows)
    fig, axes = plt.subplots(1, 2 if has_lr else 1, figsize=(9 if has_lr else 5.5, 3.2),
                             squeeze=False)  # fmt: skip
    ax = axes[0, 0]
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="this run")
    base = [r for r in (baseline or []) if r.get("step") is not None and r.get("loss") is not None]
    if base:
        ax.plot([r["step"] for r in base], [r["loss"] for r in base], "--", label="baseline")
        ax.legend(fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    if all(r["loss"] > 0 for r in rows):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if has_lr:
        lr_rows = [r for r in rows if r.get("lr") is not None]
        axes[0, 1].plot(
            [r["step"] for r in lr_rows], [r["lr"] for r in lr_rows], color="tab:orange"
        )
        axes[0, 1].set_xlabel("step")
        axes[0, 1].set_ylabel("learning rate")
        axes[0, 1].grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def training_section(run: RunArtifacts, baseline: RunArtifacts | None) -> str:
    m = run.manifests.get("train")
    if m is None:
        return ""
    body = f"<p>{_e(m.get('summary', ''))}</p>"
    png = loss_png(run.history, baseline.history if baseline else None)
    if png:
        body += _img(png, "training loss")
    keys = ("steps", "images_seen", "flops", "train_wall_seconds", "images_per_s", "final_loss")
    rows = [[k, m.get(k)] for k in keys if k in m]
    if rows:
        body += _table("training", ["quantity", "value"], rows)
    return _section("training", "Training", body + curve_html(run))


def curve_html(run: RunArtifacts) -> str:
    """Quality along training (train.eval_every): the metric against training FLOPs."""
    curve = (run.manifests.get("train") or {}).get("curve")
    if not run.curves or not curve or not curve.get("metric"):
        return ""
    from dedt_ray.plots import curves_png

    names = {"train": "train", "tdc": "TDC stage 2 (routed model)"}
    png = curves_png({names[k]: v for k, v in run.curves.items()}, curve["metric"],
                     curve.get("noise_floor"))  # fmt: skip
    stopped = run.manifests["train"].get("stopped")
    text = (
        f"<h3>Quality along training</h3><p>{_e(curve['metric'])} of the EMA model every "
        f"evaluation ({curve['points']} points; noise of one evaluation {fmt(curve['noise'])}, "
        f"real vs real at the same sample count {fmt(curve.get('noise_floor'))}). "
        + (f"Stopped early: {_e(stopped)}." if stopped else "")
        + "</p>"
    )
    return text + _img(png, "quality against training FLOPs")


def samples_section(run: RunArtifacts) -> str:
    if not run.samples_png:
        return ""
    caption = ""
    if run.metrics:
        s = run.metrics.get("sampling", {})
        caption = (
            f"<p>Generated samples, one row per class: {_e(s.get('scheduler'))}, "
            f"{_e(s.get('num_inference_steps'))} steps, guidance {_e(s.get('guidance_scale'))}.</p>"
        )
    return _section("samples", "Samples", caption + _img(run.samples_png, "samples", True))


def _space_note(space: dict[str, Any]) -> str:
    if space.get("kind") == "inception":
        return "Inception-v3 pool3 features (pytorch-fid weights): FID proper."
    acc = space.get("val_accuracy")
    acc_text = f", held-out accuracy {fmt(acc)}" if acc is not None else ""
    return (
        f"Fallback feature space {space.get('name')!s}: the {space.get('feature_dim')}-d "
        f"penultimate layer of a small CNN trained on the real images{acc_text}. "
        f"{space.get('metric')} is a Frechet distance in that space, not FID, and is only "
        "comparable with values from the same classifier."
    )


def metrics_section(run: RunArtifacts) -> str:
    m = run.metrics
    if not m:
        return ""
    space = m.get("feature_space", {})
    body = f"<p>{_e(_space_note(space))}</p>"
    body += _table(
        "metrics", ["metric", "value"], [[k, v] for k, v in m.get("metrics", {}).items()]
    )
    samples, sampling = m.get("samples", {}), m.get("sampling", {})
    rows = [[f"samples.{k}", v] for k, v in samples.items()]
    rows += [[f"sampling.{k}", v] for k, v in sampling.items()]
    body += "<h3>Samples and sampling cost</h3>" + _table("sampling", ["quantity", "value"], rows)
    for note in m.get("notes", []):
        body += f'<p class="note">{_e(note)}</p>'
    return _section("metrics", "Metrics", body)


def per_class_section(run: RunArtifacts) -> str:
    pc = run.per_class
    if not pc or not pc.get("classes"):
        return ""
    metric = pc.get("metric", "distance")
    rows = [
        [c.get("label"), c.get("name"), c.get("value"), c.get("real"), c.get("generated")]
        for c in pc["classes"]
    ]
    table = _table("per-class", ["class", "name", metric, "real", "generated"], rows)
    return _section("per-class", f"Per-class {metric}", table)


def stage_flops(name: str, m: dict[str, Any]) -> float | None:
    """FLOPs a stage itself counted (training: forward + backward; evaluate: sampling), not
    what it reads from upstream; None where it counts none (select, report)."""
    flops = m.get("flops")
    if isinstance(flops, int | float) and not isinstance(flops, bool):
        return float(flops)
    if name == "reweight" and isinstance(flops, dict):  # its reference part is the reference's
        return float(sum(v for k, v in flops.items() if k != "reference_training"))
    training = m.get("training_flops")
    if isinstance(training, dict):  # tdc: pruning search + stage-2 fine-tunes
        return float(training.get("search_flops", 0) + training.get("stage2_flops", 0))
    if isinstance(m.get("flops_per_image"), int | float) and isinstance(m.get("rows"), int):
        return float(m["flops_per_image"] * m["rows"])
    return None


def saving_estimate(manifests: dict[str, dict[str, Any]]) -> dict[str, float] | None:
    """This run's training compute against training on all the data for the same epochs, at
    the train stage's measured FLOPs per step and images per second (an estimate)."""
    train = manifests.get("train")
    total = (manifests.get("embed") or manifests.get("select") or {}).get("rows")
    if not train or not isinstance(total, int) or not train.get("rows") or not train.get("flops"):
        return None
    scale = total / train["rows"]
    extra = ("reference", "reweight", "tdc")
    flops = train["flops"] + sum(
        stage_flops(n, manifests[n]) or 0.0 for n in extra if n in manifests
    )
    wall = train.get("train_wall_seconds") or 0.0
    seconds = sum(manifests[n].get("seconds", 0.0) for n in ("select", *extra) if n in manifests)
    seconds += train.get("seconds", 0.0)
    full_seconds = train.get("seconds", 0.0) + wall * (scale - 1.0)
    return {
        "all_rows": float(total),
        "rows": float(train["rows"]),
        "epochs": train.get("images_seen", 0) / train["rows"],
        "flops": float(flops),
        "full_flops": train["flops"] * scale,
        "seconds": float(seconds),
        "full_seconds": float(full_seconds),
    }


def compute_section(report: Report) -> str:
    """Compute per stage, the saving against all data for the same epochs (an estimate),
    and, with `report.baseline_run`, the measured comparison with that run."""
    manifests = report.run.manifests
    names = _stage_names(manifests)
    if not names:
        note = baseline_comparison(report)
        return _section("compute", "Compute", note) if note else ""
    rows = [[n, _count(manifests[n].get("seconds")), stage_flops(n, manifests[n])] for n in names]
    body = _table("compute-stages", ["stage", "seconds", "FLOPs counted"], rows)
    est = saving_estimate(manifests)
    if est is not None:
        body += (
            f"<h3>Saving against all the data (estimate)</h3><p>Training on all "
            f"{fmt(int(est['all_rows']))} images for the same {fmt(round(est['epochs'], 2))} "
            f"epochs instead of {fmt(int(est['rows']))}: the train stage's measured FLOPs per "
            "step and images per second scaled to the full data. This run counts its "
            "selection, reference, reweight and tdc compute too. An estimate, not a "
            "measurement: set <code>report.baseline_run</code> to compare with a real run.</p>"
        )
        body += _table(
            "compute-saving",
            ["quantity", "this run", "all data, same epochs (estimate)", "saving"],
            [
                ["training FLOPs", est["flops"], est["full_flops"], _saving(est, "flops")],
                ["wall seconds", est["seconds"], est["full_seconds"], _saving(est, "seconds")],
            ],
        )
    body += baseline_comparison(report)
    return _section("compute", "Compute", body)


def _saving(est: dict[str, float], key: str) -> float | None:
    full = est[f"full_{key}"]
    return 1.0 - est[key] / full if full else None


def baseline_comparison(report: Report) -> str:
    """The measured comparison with `report.baseline_run` ('' without one)."""
    if report.baseline is None:
        return f"<p class='note'>{_e(report.baseline_note)}</p>" if report.baseline_note else ""
    this, base = report.run.manifests.get("train", {}), report.baseline.manifests.get("train", {})
    rows = []
    for key, label in (
        ("rows", "training images"),
        ("images_seen", "images processed"),
        ("flops", "training FLOPs"),
        ("train_wall_seconds", "training wall seconds"),
        ("seconds", "train stage seconds"),
    ):
        if key in this or key in base:
            rows.append([label, this.get(key), base.get(key), _ratio(base.get(key), this.get(key))])
    mine, theirs = report.run.metrics or {}, report.baseline.metrics or {}
    metric = mine.get("metric")
    note = ""
    if metric and metric == theirs.get("metric"):
        rows.append([metric, mine["metrics"].get(metric), theirs["metrics"].get(metric), None])
        a, b = mine.get("feature_space", {}), theirs.get("feature_space", {})
        if a.get("kind") != "inception" and a.get("key") != b.get("key"):
            note = f"<p class='note'>{_e(metric)}: the runs used different classifiers.</p>"
    elif metric:
        note = f"<p class='note'>The baseline has no {_e(metric)} to compare with.</p>"
    return (
        f"<h3>Against the baseline run</h3><p>Baseline: {_e(report.baseline.root)}. "
        "Ratio = baseline / this run (above 1: this run used less).</p>"
        + _table("compute", ["quantity", "this run", "baseline", "ratio"], rows)
        + note
    )


TUNE_COLUMNS = ("trial_id", "status", "quality", "train_flops", "train_rows", "loss", "pareto")


def tune_section(run: RunArtifacts) -> str:
    """The sweep in `<run>/tune/`: one row per trial, the Pareto plot, the best config."""
    rows = run.tune_rows
    if not rows:
        return ""
    params = sorted({k for r in rows for k in r if k.startswith("param.")})
    cols = [c for c in TUNE_COLUMNS if any(c in r for r in rows)] + params
    done = sum(r.get("status") == "done" for r in rows)
    metric = next((r["metric_name"] for r in rows if r.get("metric_name")), "quality")
    body = (
        f"<p>{len(rows)} trials, {done} evaluated; quality = {_e(metric)}; "
        "pareto = not dominated in (quality, training FLOPs).</p>"
        + _table("tune", cols, [[r.get(c) for c in cols] for r in rows])
    )
    if run.tune_png:
        body += _img(run.tune_png, "quality vs training compute, Pareto front")
    if run.tune_best_yaml:
        body += f"<h3>Best config (tune/best.yaml)</h3><pre>{_e(run.tune_best_yaml)}</pre>"
    return _section("tune", "Sweep (dedt-ray tune)", body)


def study_section(run: RunArtifacts) -> str:
    """`dedt-ray study` (`<run>/study/`): the curves, the speed-up table, target and noise."""
    summary = run.study
    if not summary:
        return ""
    from dedt_ray.evaluate.curves import SUMMARY_HEADER, summary_rows

    floor = summary.get("noise_floor")
    best = summary.get("best") or {}
    body = (
        f"<p>Target: {_e(summary['metric'])} &le; {_e(fmt(summary['target']))}, the baseline "
        f"{_e(summary['baseline'])}'s final value (mean over seeds, "
        f"{_e(fmt(summary['baseline_final']))}) x {_e(fmt(1 + summary['tolerance']))}. "
        f"Noise floor (real vs real at the curve's sample count): {_e(fmt(floor))}. Compute: "
        "training FLOPs including selection (encoder), reference and proxy compute. Speed-up: "
        "the baseline's mean compute to target over the setting's, with a bootstrap "
        f"{_e(fmt(summary.get('level')))} interval over seeds; 0 when a seed never reached "
        "it.</p>"
    )
    if best:
        body += f"<p>{_e(best['name'])} is {_e(best['from'])} (chosen by {_e(best['by'])}).</p>"
    if run.study_png:
        body += _img(run.study_png, "metric against training FLOPs per setting, seeds shaded")
    body += _table("study", SUMMARY_HEADER, summary_rows(summary))
    failed = [(n, seed, err) for n, s in summary["settings"].items()
              for seed, err in (s.get("failed") or {}).items()]  # fmt: skip
    for name, seed, err in failed:
        body += f'<p class="note">{_e(name)} seed {_e(seed)} failed: {_e(err)}</p>'
    return _section("study", "Study (dedt-ray study)", body)


CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222;
       padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: .9em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; display: block; margin: .5em 0; }
img.pixelated { image-rendering: pixelated; min-width: 320px; }
figure { display: inline-block; margin: 0 1em 1em 0; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: .85em; }
.note { color: #8a5300; } .meta { color: #666; }
"""


def render(report: Report) -> str:
    """The whole page; sections whose artifacts are missing are left out."""
    run = report.run
    headline = ""
    if run.metrics and run.metrics.get("metric"):
        metric = run.metrics["metric"]
        value = run.metrics.get("metrics", {}).get(metric)
        headline = f"<p class='headline'><b>{_e(metric)}</b> = {_e(fmt(value))}</p>"
    sections = [
        stages_section(run),
        selection_section(run),
        reweight_section(run),
        training_section(run, report.baseline),
        samples_section(run),
        metrics_section(run),
        per_class_section(run),
        compute_section(report),
        tune_section(run),
        study_section(run),
        _section("config", "Config", f"<pre>{_e(report.config_yaml)}</pre>"),
    ]
    body = "\n".join(s for s in sections if s)
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>dedt-ray report: {_e(run.root)}</title><style>{CSS}</style></head><body>"
        f"<h1>dedt-ray run report</h1><p class='meta'>{_e(run.root)} &middot; {_e(report.created)}"
        f"</p>{headline}\n{body}\n</body></html>\n"
    )


def run(cfg: Config, store: RunStore, ctx: StageContext) -> dict[str, Any]:
    report = collect(store, dump_config(cfg), cfg.report.baseline_run)
    page = render(report)
    store.write_text(page, REPORT)
    stages = _stage_names(report.run.manifests)
    summary = f"{REPORT} ({len(page) // 1024} KiB) over stages: {', '.join(stages) or 'none'}"
    return {"rows": len(stages), "stages": stages, "bytes": len(page), "summary": summary}
