"""An `s3://` run directory: the default pipeline (tiny budgets, TDC and DoReMi on) written to a
real S3-compatible server (moto in server mode) that the test starts on loopback. The job runs
as users run it (`python jobs/full_pipeline.py`, its own local Ray cluster), with the endpoint
and credentials only in the environment, as pyarrow's S3 filesystem reads them."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pytest

from dedt_ray.artifacts import read_class_weights
from dedt_ray.smoke import SMOKE_EVALUATE, SMOKE_MODEL
from dedt_ray.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "dedt-test"
RUN = f"{BUCKET}/runs/default"
ROWS = 150
PIPELINE = [  # the default config, tiny budgets, every stage but latents enabled
    *SMOKE_MODEL,
    *SMOKE_EVALUATE,
    f"data.limit={ROWS}",
    "reweight.enabled=true",
    "reference.steps=2",
    "reweight.steps=2",
    "train.steps=8",
    "train.checkpoint_every=4",
    "model.num_train_timesteps=100",
    "tdc.enabled=true",
    # the default config's in-process training: its loop writes each checkpoint to the bucket
    # (`worker.persist_checkpoint`); Ray Train workers would cost a worker-group start per
    # training run (5 here, 20-30 s each on 2 cores)
    "train.num_workers=0",
    "tdc.rounds=1",
    "tdc.score_steps=1",
    "tdc.score_images=16",
    "tdc.finetune_steps=2",  # more than 8 train.steps' budget leaves: a warning, not an error
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3_server() -> Iterator[dict[str, str]]:
    """A moto S3 server on 127.0.0.1 with one bucket; yields the environment that points
    pyarrow (and so Ray Data, Ray Train and every stage) at it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "dedt-test-key",
        "AWS_SECRET_ACCESS_KEY": "dedt-test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    s3 = _s3(env, allow_bucket_creation=True)
    s3.create_dir(BUCKET)
    try:
        yield env
    finally:
        server.stop()


def _s3(env: dict[str, str], **kw: bool) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(
        access_key=env["AWS_ACCESS_KEY_ID"],
        secret_key=env["AWS_SECRET_ACCESS_KEY"],
        endpoint_override=env["AWS_ENDPOINT_URL"].removeprefix("http://"),
        scheme="http",
        region=env["AWS_DEFAULT_REGION"],
        **kw,
    )


def _pipeline(env: dict[str, str], workdir: Path) -> subprocess.CompletedProcess:
    """`python jobs/full_pipeline.py` on the default config into s3://<RUN>, from `workdir`
    (a local `runs/` folder there would mean something was written locally)."""
    cmd = [
        sys.executable, str(ROOT / "jobs" / "full_pipeline.py"),
        "--config", str(ROOT / "configs" / "default.yaml"), "--run-dir", f"s3://{RUN}",
        *PIPELINE,
    ]  # fmt: skip
    ray_tmp = tempfile.mkdtemp(prefix="drs3", dir="/tmp")  # short: Ray's socket paths
    full = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "AWS_PROFILE")}
    full.update(env, RAY_TMPDIR=ray_tmp, PYTHONUNBUFFERED="1")  # its own local cluster
    try:
        return subprocess.run(
            cmd, cwd=workdir, env=full, capture_output=True, text=True, timeout=900
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _json(s3: pafs.S3FileSystem, *parts: str) -> dict:
    with s3.open_input_file("/".join([RUN, *parts])) as f:
        return json.loads(f.read())


def _fetch(s3: pafs.S3FileSystem, folder: str, dest: Path) -> Path:
    pafs.copy_files(f"{RUN}/{folder}", str(dest), source_filesystem=s3)
    return dest


@pytest.mark.slow
def test_default_pipeline_on_s3_then_skipped(s3_server, tmp_path):
    from dedt_ray.config import load_config
    from dedt_ray.diffusion.export import load_export
    from dedt_ray.tdc.routing import RoutedUNet

    first = _pipeline(s3_server, tmp_path)
    assert first.returncode == 0, first.stderr[-4000:]
    s3 = _s3(s3_server)
    cfg = load_config(str(ROOT / "configs" / "default.yaml"), PIPELINE)
    enabled = [name for name, stage in STAGES.items() if stage.enabled(cfg)]
    assert "tdc" in enabled and "reweight" in enabled and "latents" not in enabled
    done = {name: _json(s3, name, "_manifest.json") for name in enabled}
    assert not (tmp_path / "runs").exists()  # nothing landed in a local run directory

    # the artifacts in the bucket, read back through the same filesystem
    embeddings = pads.dataset(f"{RUN}/embed/embeddings.parquet", filesystem=s3, format="parquet")
    assert embeddings.count_rows() == done["embed"]["rows"] == ROWS
    scores = pads.dataset(f"{RUN}/select/scores.parquet", filesystem=s3).to_table()
    assert scores.num_rows == ROWS
    assert sum(scores.column("kept").to_pylist()) == done["select"]["kept"]
    weights = read_class_weights(_json(s3, "reweight", "class_weights.json"), 10)
    assert weights.sum() == pytest.approx(1.0)
    assert done["train"]["inputs"]["reweight"] == done["reweight"]["output_id"]
    assert done["train"]["steps"] == 4  # TDC stage 1: half of train.steps
    ckpts = s3.get_file_info(pafs.FileSelector(f"{RUN}/train/checkpoints"))
    assert any(i.base_name.startswith("checkpoint_0") for i in ckpts)  # the loop wrote there

    # the tdc stage: pruned models, Optuna studies and the routed export are in the bucket
    tdc = done["tdc"]
    assert tdc["model"] == f"s3://{RUN}/tdc/model" and tdc["rows"] == 2
    pruned = [g for g in tdc["groups"] if g["rounds"] > 0]
    banks = {i.base_name for i in s3.get_file_info(pafs.FileSelector(f"{RUN}/_tdc_proxy"))}
    assert pruned and all(  # each searched group's memory bank, g<group>-<key>.db
        any(b.startswith(f"g{g['group']}-") and b.endswith(".db") for b in banks) for g in pruned
    )
    routed, _, _, info = load_export(str(_fetch(s3, "tdc/model", tmp_path / "routed")))
    assert isinstance(routed, RoutedUNet) and info["tdc"] is True
    assert [list(g) for g in routed.groups] == [[g["t_lo"], g["t_hi"]] for g in tdc["groups"]]
    single, _, _, _ = load_export(str(_fetch(s3, "train/model", tmp_path / "single")))
    assert single.config.num_class_embeds == 11

    # evaluate sampled the routed model; the report was written next to the stages
    metrics = _json(s3, "evaluate", "metrics.json")
    assert metrics["model_path"] == "tdc/model"
    assert done["evaluate"]["inputs"]["tdc"] == tdc["output_id"]
    assert metrics["samples"]["generated"] == done["evaluate"]["rows"] == 2 * 10
    with s3.open_input_file(f"{RUN}/report.html") as f:
        page = f.read().decode()
    assert '<section id="metrics">' in page and f"s3://{RUN}" in page

    # the same command again: every stage is up to date (the report always re-renders)
    again = _pipeline(s3_server, tmp_path)
    assert again.returncode == 0, again.stderr[-4000:]
    redone = {name: _json(s3, name, "_manifest.json") for name in enabled}
    for name in enabled:
        same = redone[name]["started"] == done[name]["started"]
        assert same != STAGES[name].always, name


def test_staged_and_fetched_folders(s3_server, monkeypatch, tmp_path):
    """RunStore.staged uploads a temporary folder only when its block succeeds; fetched
    gives a local copy that is removed afterwards; local run directories need neither."""
    from dedt_ray.store import RunStore

    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    store = RunStore(f"s3://{BUCKET}/runs/staged")
    with store.staged("stage", "model") as folder:
        assert not folder.startswith(store.root) and os.path.isdir(folder)
        Path(folder, "weights.json").write_text('{"w": 1}')
    assert store.read_json("stage", "model", "weights.json") == {"w": 1}
    with pytest.raises(RuntimeError, match="half-written"):
        with store.staged("stage", "broken") as folder:
            Path(folder, "part.json").write_text("{}")
            raise RuntimeError("half-written")
    assert not store.exists("stage", "broken", "part.json")  # nothing uploaded
    with store.fetched("stage", "model") as local:
        assert json.loads(Path(local, "weights.json").read_text()) == {"w": 1}
    assert not os.path.exists(local)
    with pytest.raises(FileNotFoundError, match="not an existing folder"):
        with store.fetched("stage", "nothing"):
            pass
    local_store = RunStore(str(tmp_path / "run"))  # the folders themselves, no copies
    with local_store.staged("stage", "model") as folder:
        assert folder == local_store.path("stage", "model")
    with local_store.fetched("stage", "model") as local:
        assert local == folder
