"""Issue 18, a new user's first hour: failures that say what to do, run directories that
recover, a quiet console, a conventional CLI, exports diffusers can sample, true docs.

The CLI tests run `python -m dedt_ray.cli` in a subprocess and check exit code, stdout and
stderr. The fast ones need no Ray cluster; the slow ones train tiny models."""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, UNet2DModel

from dedt_ray.config import load_config
from dedt_ray.diffusion.card import parse_sections, update_card
from dedt_ray.diffusion.export import ExportDamaged, load_export, save_export
from dedt_ray.diffusion.models import sampling_scheduler
from dedt_ray.diffusion.pipeline import MODULE_FILE, DedtRayPipeline
from dedt_ray.diffusion.sampling import generate
from dedt_ray.smoke import SMOKE_EVALUATE, SMOKE_MODEL
from dedt_ray.store import RunStore

ROOT = Path(__file__).resolve().parents[1]
NO_RAY = {"RAY_ADDRESS": "127.0.0.1:1"}  # any attempt to reach a cluster fails


def cli(*args: str, env: dict[str, str] | None = None, timeout: int = 300):
    return subprocess.run(
        [sys.executable, "-m", "dedt_ray.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )


# -- 1, 2: bad data and run directories fail up front, naming the thing -----------------------
def test_bad_data_paths_exit_2_before_any_ray_work(tmp_path):
    png = tmp_path / "a.png"
    png.write_bytes(b"not an image")
    empty = tmp_path / "empty"
    empty.mkdir()
    pq.write_table(pa.table({"image": pa.array([], pa.binary())}), tmp_path / "empty.parquet")
    run = str(tmp_path / "run")
    cases = [
        (["data.source=image_folder", f"data.path={png}"], "is a file"),
        (["data.source=image_folder", f"data.path={tmp_path / 'missing'}"], "does not exist"),
        (["data.source=image_folder", f"data.path={empty}"], "no image files"),
        (["data.source=parquet", f"data.path={tmp_path / 'empty.parquet'}"], "no parquet rows"),
    ]
    for overrides, message in cases:
        proc = cli("embed", "--run-dir", run, *overrides, env=NO_RAY)
        assert proc.returncode == 2, proc.stderr
        assert "data.path" in proc.stderr and message in proc.stderr
        assert str(tmp_path) in proc.stderr and proc.stdout == ""
    assert not Path(run).exists()


def test_bad_run_dir_and_missing_weights_exit_2(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    proc = cli("embed", "--run-dir", str(blocker / "run"), env=NO_RAY)
    assert proc.returncode == 2 and "--run-dir: cannot write to" in proc.stderr
    proc = cli(
        "embed", "--run-dir", "s3://dedt-ray-no-such-bucket-7f3a/run",
        env={**NO_RAY, "AWS_EC2_METADATA_DISABLED": "true"}, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "s3://dedt-ray-no-such-bucket-7f3a/run" in proc.stderr
    assert "AWS credentials" in proc.stderr and "Traceback" not in proc.stderr
    # the cifar10 preset without its Inception weights: named before any cluster work
    data = tmp_path / "cifar-10-batches-py"
    data.mkdir()
    proc = cli(
        "run", "--config", "configs/cifar10.yaml", "--run-dir", str(tmp_path / "c10"),
        f"data.path={data}", f"embed.model={tmp_path / 'pt_inception.pth'}", env=NO_RAY,
    )  # fmt: skip
    assert proc.returncode == 2 and "embed.model" in proc.stderr
    assert "pt_inception.pth" in proc.stderr and "Put the weights there" in proc.stderr


@pytest.mark.slow
def test_no_decodable_image_names_the_files_and_leaves_no_stage(tmp_path):
    data = tmp_path / "images" / "cat"
    data.mkdir(parents=True)
    (data / "a.png").write_bytes(b"")
    (data / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    run = tmp_path / "run"
    proc = cli("embed", "--run-dir", str(run), "data.source=image_folder",
               f"data.path={tmp_path / 'images'}", "data.image_size=8")  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")][-1]
    assert f"no decodable images in {tmp_path / 'images'} (2 skipped: cat/a.png: zero bytes" in line
    assert "cat/b.png" in line and "Traceback" not in proc.stderr
    assert not (run / "embed").exists()  # no half-written stage


# -- 3: an unreadable manifest means "not done", with a warning naming it -------------------
def test_corrupted_manifest_is_a_warning_and_the_stage_reruns(tmp_path, caplog):
    from dedt_ray.pipeline import pending_stages

    store = RunStore(str(tmp_path / "run"))
    store.write_manifest("embed", {"key": "k", "output_id": "x"})
    store.write_text('{"key": "k", "outp', "embed", "_manifest.json")  # truncated
    with caplog.at_level(logging.WARNING, logger="dedt_ray"):
        assert store.manifest("embed") is None
    assert str(tmp_path / "run" / "embed" / "_manifest.json") in caplog.text
    assert "not done" in caplog.text
    assert pending_stages(load_config(None, []), store, only=["embed"]) == ["embed"]
    # through the CLI, with and without --force (the report stage needs no cluster)
    (tmp_path / "run" / "config.yaml").write_text("seed: 0\n")
    for extra in ([], ["--force"]):
        proc = cli("report", "--run-dir", store.root, *extra, env=NO_RAY)
        assert proc.returncode == 0, proc.stderr
        assert (
            "_manifest.json is unreadable" in proc.stderr and "JSONDecodeError" not in proc.stdout
        )


# -- 5: exports carry checksums; a flipped bit is named -----------------------------------------
def tiny_unet(classes: int | None = 3, seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2, num_class_embeds=classes,
    ).eval()  # fmt: skip


def export(tmp_path: Path, name: str = "model", classes: int | None = 3, unet=None) -> str:
    folder = str(tmp_path / name)
    k = classes - 1 if classes else 0  # the last class embedding is the null class
    info = {"num_classes": k, "classes": ["a", "b"][:k], "sample_size": 8, "channels": 1,
            "steps": 4, "flops": 1e9}  # fmt: skip
    save_export(folder, unet or tiny_unet(classes), DDPMScheduler(num_train_timesteps=50), info)
    return folder


def test_flipped_bit_in_an_export_is_named(tmp_path):
    folder = export(tmp_path)
    info = json.loads(Path(folder, "dedt_model.json").read_text())
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert {weights, "unet/config.json", "scheduler/scheduler_config.json"} <= set(info["sha256"])
    Path(folder, "README.md").write_text("edited")  # the card is documentation: unchecked
    load_export(folder)
    data = bytearray(Path(folder, weights).read_bytes())
    data[-100] ^= 0x01
    Path(folder, weights).write_bytes(bytes(data))
    with pytest.raises(ExportDamaged, match=re.escape(os.path.join(folder, weights))):
        load_export(folder)
    # `dedt-ray sample` says so in one line, with the traceback only under -v
    proc = cli("sample", "--model", folder, "--num", "2", "--steps", "1")
    assert proc.returncode == 1 and "is damaged" in proc.stderr and weights in proc.stderr
    assert "Traceback" not in proc.stderr and "-v shows the traceback" in proc.stderr
    assert proc.stdout == ""
    proc = cli("-v", "sample", "--model", folder, "--num", "2", "--steps", "1")
    assert proc.returncode == 1 and "Traceback" in proc.stderr


# -- 6, 9: strict config, conventional CLI ------------------------------------------------------
def test_strict_config_and_the_config_command(tmp_path):
    proc = cli("config", "train.steps=true")
    assert proc.returncode == 2 and proc.stdout == ""
    assert "train.steps" in proc.stderr and "got True" in proc.stderr
    assert "from the override 'train.steps=true'" in proc.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("select:\n  enabled: 1\n")
    proc = cli("config", "--config", str(bad))
    assert proc.returncode == 2 and "select.enabled" in proc.stderr and str(bad) in proc.stderr
    proc = cli("config", "--config", "configs/default.yaml", "train.lr=1e-3", "train.steps=20")
    assert proc.returncode == 0 and proc.stderr == ""
    path = tmp_path / "resolved.yaml"  # what `config` prints loads back
    path.write_text(proc.stdout)
    resolved = load_config(path)
    assert resolved.train.lr == 1e-3 and resolved.train.steps == 20
    assert resolved.embed.encoder == "random_projection"  # from configs/default.yaml


def test_version_verbosity_flags_and_errors_on_stderr():
    from dedt_ray import cli as cli_module

    proc = cli("--version")
    assert (
        proc.returncode == 0 and proc.stdout.strip() == f"dedt-ray {cli_module.package_version()}"
    )
    assert re.fullmatch(r"dedt-ray \d+\.\d+\.\d+\S*", proc.stdout.strip())
    for flags in (["-q", "sample"], ["sample", "-v"]):
        assert cli_module.build_parser().parse_args([*flags, "--model", "x"]).command == "sample"
    args = cli_module.build_parser().parse_args(["-v", "train", "-q"])
    assert args.verbose == 1 and args.quiet == 1
    proc = cli("sample", "--model", "/nowhere/model")
    assert proc.returncode == 2 and proc.stdout == "" and "not an exported model" in proc.stderr


def test_one_line_error_from_a_ray_traceback():
    from dedt_ray.cli import one_line

    wrapped = RuntimeError(
        'ray::run() (pid=1, ip=127.0.0.1)\n  File "x.py", line 3, in run\n'
        "    raise ValueError('no decodable images in /d (1 skipped: a.png: zero bytes)')\n"
        "ValueError: no decodable images in /d (1 skipped: a.png: zero bytes)"
    )
    assert (
        one_line(wrapped) == "ValueError: no decodable images in /d (1 skipped: a.png: zero bytes)"
    )
    assert one_line(KeyError("k")) == "KeyError: 'k'"


# -- 7: warm-up is capped in every trainer ----------------------------------------------------
def test_warmup_is_capped_so_a_short_run_reaches_the_peak_lr(caplog):
    from dedt_ray.diffusion.core import build_lr_scheduler
    from dedt_ray.diffusion.models import ModelSpec
    from dedt_ray.diffusion.trainer import make_job

    cfg = load_config(None, ["train.steps=20", "train.use_gpu=false"])  # warm-up 100 (default)
    with caplog.at_level(logging.WARNING, logger="dedt_ray"):
        job = make_job(cfg, ModelSpec(8, 1, 0), np.zeros(4, np.int64), None, "key")
    assert "train.warmup_steps=100" in caplog.text and job.train["warmup_steps"] == 2
    tc = job.train_cfg
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=tc.lr)
    sched = build_lr_scheduler(opt, tc.lr_schedule, tc.warmup_steps, tc.steps)
    lrs = []
    for _ in range(tc.steps):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert max(lrs) == pytest.approx(cfg.train.lr)  # leaves warm-up (it never did at 100)
    default = make_job(load_config(None, ["train.use_gpu=false"]), ModelSpec(8, 1, 0),
                       np.zeros(4, np.int64), None, "key")  # fmt: skip
    assert default.train["warmup_steps"] == 100  # 10% of 1000: unchanged


# -- 8: progress: a bar on a terminal, a line per N steps in a log -----------------------------
def test_progress_lines_off_a_terminal_and_a_bar_on_one(caplog, capsys):
    from dedt_ray.progress import Progress

    with caplog.at_level(logging.INFO, logger="dedt_ray"):
        with Progress(100, "train", every=25, bar=False) as progress:
            for step in range(10, 101, 10):
                progress.update_to(step, loss=0.5)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [f"train: step {n}/100 loss 0.5" for n in (30, 60, 90, 100)]
    with caplog.at_level(logging.INFO, logger="dedt_ray"), Progress(4, "sample", bar=True) as bar:
        for n in range(1, 5):
            bar.update_to(n)
    err = capsys.readouterr().err
    assert "sample" in err and "4/4" in err and "100%" in err


# -- 11: a diffusers pipeline and a model card in every export ---------------------------------
def test_diffusers_pipeline_samples_conditional_exports_offline(tmp_path):
    folder = export(tmp_path)
    index = json.loads(Path(folder, "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_dedt_ray", "DedtRayPipeline"]
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    assert type(pipe).__name__ == "DedtRayPipeline" and pipe.num_classes == 2
    pipe.set_progress_bar_config(disable=True)
    out = pipe(class_labels=[0, 1], guidance_scale=2.0, scheduler="ddim", num_inference_steps=3,
               generator=torch.Generator().manual_seed(0), output_type="uint8").images  # fmt: skip
    unet, sched, _, _ = load_export(folder)
    want = generate(unet, sampling_scheduler(sched, "ddim"), [0, 1], 3, 2.0,
                    torch.Generator().manual_seed(0))  # fmt: skip
    assert np.array_equal(out, want)  # the pipeline is the project's sampler
    pil = DedtRayPipeline.from_pretrained(folder)(batch_size=3, num_inference_steps=2).images
    assert len(pil) == 3 and pil[0].size == (8, 8)
    with pytest.raises(ValueError, match="not classes of this model"):
        pipe(class_labels=[2], num_inference_steps=1)
    Path(folder, MODULE_FILE).write_text("import os\nos.system('echo owned')\n")
    with pytest.raises(ValueError, match="not the file dedt-ray writes"):
        DedtRayPipeline.from_pretrained(folder)
    # an unconditional export stays a plain DDPMPipeline folder
    plain = export(tmp_path, "plain", classes=None)
    assert json.loads(Path(plain, "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    assert type(DiffusionPipeline.from_pretrained(plain)).__name__ == "DDPMPipeline"


def test_routed_tdc_export_loads_in_the_pipeline(tmp_path):
    from dedt_ray.tdc.routing import RoutedUNet, scheduler_config

    sched = DDPMScheduler(num_train_timesteps=50)
    routed = RoutedUNet([tiny_unet(3, 0), tiny_unet(3, 1)], [(0, 25), (25, 50)],
                        scheduler_config(sched))  # fmt: skip
    folder = export(tmp_path, "routed", unet=routed)
    assert json.loads(Path(folder, "model_index.json").read_text())["unet"] == [
        "dedt_ray.tdc.routing", "RoutedUNet"]  # fmt: skip
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    assert isinstance(pipe.unet, RoutedUNet)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # the diffusers way
    images = pipe(class_labels=[1, 0], num_inference_steps=4, output_type="np").images
    assert images.shape == (2, 8, 8, 1) and 0.0 <= images.min() <= images.max() <= 1.0


def test_model_card_has_hub_metadata_and_stage_sections(tmp_path):
    folder = export(tmp_path)
    text = Path(folder, "README.md").read_text()
    import yaml

    meta = yaml.safe_load(text.split("---")[1])
    assert meta["library_name"] == "diffusers"
    assert meta["pipeline_tag"] == "unconditional-image-generation"
    assert {"dedt-ray", "class-conditional"} <= set(meta["tags"])
    assert "trust_remote_code=True" in text and "optimizer steps | 4" in text
    store = RunStore(str(tmp_path))
    info = json.loads(Path(folder, "dedt_model.json").read_text())
    for value in ("1.5", "2.5"):  # the evaluate stage updates its section, never repeats it
        update_card(store, ("model",), {"Metrics": f"| FD | {value} |"}, info)
    sections = parse_sections(Path(folder, "README.md").read_text())
    assert list(sections) == ["Model", "Usage", "Training compute", "Metrics"]
    assert sections["Metrics"] == "| FD | 2.5 |"
    load_export(folder)  # the card is outside the checksums


# -- 14: metrics tracking ------------------------------------------------------------------------
def read_tensorboard(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars of TensorBoard event files (TFRecord framing, protobuf events)."""
    import struct

    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def test_tracking_sinks_write_tensorboard_and_mlflow(tmp_path):
    from dedt_ray.diffusion.reports import MLflowSink, TensorBoardSink, local_reports

    history = [{"step": s, "loss": 1.0 / s, "lr": 1e-3} for s in (2, 4, 6)]
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with local_reports(
        [
            TensorBoardSink(str(tmp_path / "tb")),
            MLflowSink(mlflow_uri, "run", "train", {"train.lr": 1e-3}),
        ]
    ) as hook:
        for row in history:  # what in-process training hands the hook at each report
            hook(row)
    scalars = read_tensorboard(tmp_path / "tb")
    assert scalars["train/loss"] == [(2, 0.5), (4, 0.25), (6, pytest.approx(1 / 6))]
    check_mlflow(mlflow_uri, "run", "train", [2, 4, 6])


def check_mlflow(uri: str, experiment: str, run_name: str, steps: list[int]) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    run = next(r for r in runs if r.info.run_name == run_name)
    assert run.info.status == "FINISHED" and "train.lr" in run.data.params
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == steps


# -- 16: the docs' links resolve -------------------------------------------------------------------
def test_docs_links_resolve_and_methods_is_there():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert ROOT / "docs" / "methods.md" in pages
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.name}: broken link {target}"
        assert "shared/methods.md" not in page.read_text(), page.name
    methods = (ROOT / "docs" / "methods.md").read_text()
    for needle in ("arXiv 2409.19128", "arXiv 2312.13307", "softmax", "SNR", "Min-SNR"):
        assert needle in methods


# -- slow: a real tiny run ---------------------------------------------------------------------
TINY_TRAIN = [
    "data.image_size=8", "data.limit=64", "model.block_out_channels=[8,16]",
    "model.norm_num_groups=4", "model.attention_head_dim=4", "model.mid_attention=false",
    "model.attention_levels=[false,false]", "train.steps=6", "train.batch_size=8",
    "train.warmup_steps=0", "train.log_every=2", "train.checkpoint_every=2",
    "train.keep_checkpoints=3", "train.threads_per_worker=1", "train.num_workers=0",
    "train.use_gpu=false", "train.tracking=[tensorboard,mlflow]", "select.enabled=false",
    "reweight.enabled=false",
]  # fmt: skip


@pytest.mark.slow
def test_truncated_checkpoint_falls_back_and_force_starts_clean(ray_cluster, tmp_path, caplog):
    """Items 4, 5, 11, 14 on a real in-process run (the default config's): resume past a
    truncated checkpoint, --force discards the in-progress state, the manifest records the
    export's checksums, the card has the training sections, and the history reached
    TensorBoard and MLflow (from Ray Train workers while they train: test_train_ray.py)."""
    from dedt_ray.diffusion.state import checkpoint_dirs
    from dedt_ray.pipeline import run_stage
    from dedt_ray.store import RAY_STATE

    store = RunStore(str(tmp_path / "run"))
    flag = tmp_path / "fail"
    failing = load_config(None, [*TINY_TRAIN, "train.fail_at_step=5", f"train.fail_flag={flag}"])
    flag.touch()
    with pytest.raises(Exception, match="injected failure"):
        run_stage("train", failing, store)
    assert not store.exists("train")  # nothing half-written
    (run_name,) = [n for n in store.list(RAY_STATE) if n.startswith("train-")]
    ckpts = checkpoint_dirs(store.list(RAY_STATE, run_name))
    assert ckpts == ["checkpoint_00000002", "checkpoint_00000004"]
    tensors = Path(store.path(RAY_STATE, run_name, ckpts[-1], "state.safetensors"))
    tensors.write_bytes(tensors.read_bytes()[: tensors.stat().st_size // 2])  # truncated
    with caplog.at_level(logging.WARNING, logger="dedt_ray"):
        resumed = run_stage("train", failing, store)  # the flag is gone: it runs through
    assert resumed["resumed_at"] == [2]  # the newest checkpoint that loads
    assert "checkpoint_00000004" in caplog.text and "damaged" in caplog.text

    flag.touch()
    with pytest.raises(Exception, match="injected failure"):
        run_stage("train", failing, store, force=True)
    assert store.exists(RAY_STATE, run_name)  # in-progress state at step 4 ...
    clean = run_stage("train", failing, store, force=True)
    assert clean["resumed_at"] == [] and clean["steps"] == 6  # ... discarded by --force
    assert not store.exists(RAY_STATE, run_name)

    folder = store.path("train", "model")
    info = json.loads(Path(folder, "dedt_model.json").read_text())
    assert clean["export_sha256"] == info["sha256"]
    assert "unet/diffusion_pytorch_model.safetensors" in info["sha256"]
    sections = parse_sections(Path(folder, "README.md").read_text())
    assert "all 64 source images" in sections["Data selection"]
    assert "Class weights" not in sections  # no reweight stage ran
    scalars = read_tensorboard(Path(store.path("tensorboard", "train")))
    assert [s for s, _ in scalars["train/loss"]] == [2, 4, 6]  # the clean run only
    check_mlflow(f"sqlite:///{store.path('mlruns', 'mlflow.db')}", "run", "train", [2, 4, 6])


SMOKE_RUN = [
    *SMOKE_MODEL, *SMOKE_EVALUATE, "data.limit=150", "select.keep_ratio=0.5",
    "train.steps=20", "train.log_every=5", "train.checkpoint_every=20",
]  # fmt: skip


@pytest.mark.slow
def test_console_under_a_terminal_noop_rerun_and_ctrl_c(tmp_path):
    """Items 8, 9, 10: progress bars and few lines on a pseudo-terminal; a finished run
    reruns without a cluster (a stage command without --config uses the run's config.yaml);
    Ctrl-C exits 130 saying how to resume (the stage command retrains only: embed and select
    stay as the first run left them)."""
    if shutil.which("script") is None:
        pytest.skip("no `script` to make a pseudo-terminal")
    run = tmp_path / "run"
    command = shlex.join(
        [sys.executable, "-m", "dedt_ray.cli", "run", "--run-dir", str(run), *SMOKE_RUN]
    )
    proc = subprocess.run(["script", "-qec", command, "/dev/null"], capture_output=True,
                          text=True, timeout=900, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:]
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", proc.stdout)
    assert re.search(r"train: 100%\|.*\| 20/20", text)  # the training bar
    assert re.search(r"evaluate: sampling: 100%\|", text)  # the sampling bar
    for chatter in ("Reporting training result", "RayTrainWorker", "streaming_executor",
                    "install accelerate", "INFO worker.py"):  # fmt: skip
        assert chatter not in text
    assert len(text.replace("\r", "\n").strip().split("\n")) < 40

    # no-op rerun: no --config, no Ray (RAY_ADDRESS points nowhere), every stage skipped
    proc = cli("train", "--run-dir", str(run), env=NO_RAY)
    assert proc.returncode == 0, proc.stderr
    assert "up to date, skipped" in proc.stdout
    proc = cli("run", "--run-dir", str(run), env=NO_RAY)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("up to date, skipped") == 4  # embed select train evaluate
    assert "report" in proc.stdout

    # a Ctrl-C-able child however pytest was started: a background job of a non-interactive
    # shell (`pytest &`) has SIGINT ignored, and children inherit an ignored signal; one with a
    # handler in this process starts with the default (Python's KeyboardInterrupt)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        child = subprocess.Popen(
            [sys.executable, "-m", "dedt_ray.cli", "train", "--run-dir", str(run), "--force"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )  # fmt: skip
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)
    seen = ""
    deadline = time.time() + 300
    while "worker(s)" not in seen and time.time() < deadline:  # the line before Ray Train's fit
        seen += child.stderr.readline()
    # Ctrl-C while the workers start: Ray Train's fit, on the main thread, would take SIGINT
    # over and exit 1 saying nothing
    child.send_signal(signal.SIGINT)
    try:
        _, err = child.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        child.kill()
        _, err = child.communicate()
    assert child.returncode == 130, seen + err
    assert "rerun the same command to resume" in err and "Traceback" not in err
