"""Security defaults, as behaviour:

- the local cluster the tool starts listens on loopback only;
- a cluster started as docs/cluster.md says (token auth on) refuses a client without the
  token or with a wrong one;
- no file the project reads is unpickled: a file crafted to run code when unpickled (it
  creates a marker file), put wherever the project reads one, never runs. The one library
  that must unpickle, Ray Tune restoring a sweep, gets only a sweep folder this user wrote and
  nobody else can change (docs/tune.md).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dedt_ray.config import load_config
from dedt_ray.store import RunStore

from runs import copy_run

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json, os, psutil, ray
from dedt_ray.runtime import init_ray
init_ray(num_cpus=1, progress=False)
ours = {p.pid for p in psutil.Process().children(recursive=True)} | {os.getpid()}
listening = sorted({c.laddr.ip for c in psutil.net_connections("tcp")
                    if c.status == "LISTEN" and c.pid in ours})
print(json.dumps({"gcs": ray.get_runtime_context().gcs_address,
                  "nodes": [n["NodeManagerAddress"] for n in ray.nodes()],
                  "listening": listening}))
ray.shutdown()
"""


@pytest.mark.slow
def test_local_cluster_binds_to_loopback():
    """A new local cluster listens on loopback only, also when a dead `ray start` cluster
    left its address behind (ignored with a warning, not waited on)."""
    tmp = tempfile.mkdtemp(prefix="dr", dir="/tmp")  # short: Ray's unix socket paths
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = tmp  # no cluster `ray start`ed by someone else is found
    # ... but a stale one: `ray start` ended without `ray stop`, nothing listens there
    os.makedirs(os.path.join(tmp, "ray"))
    Path(tmp, "ray", "ray_current_cluster").write_text(f"127.0.0.1:{_free_port()}")
    try:
        out = subprocess.run(
            [sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True,
            text=True, timeout=300,
        )  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "nothing listens there" in out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["gcs"].startswith("127.0.0.1:") and seen["nodes"] == ["127.0.0.1"]
    assert seen["listening"], "no listening socket found"
    assert all(ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1") for ip in seen["listening"])


# -- token authentication -------------------------------------------------------------------
CLIENT = """
import ray, sys
ray.init(address=sys.argv[1], log_to_driver=False)
print("answer", ray.get(ray.remote(lambda: 6 * 7).remote()))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    ray = str(Path(sys.executable).with_name("ray"))
    return subprocess.run([ray, *args], env=env, capture_output=True, text=True, timeout=120)


def _client(address: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", CLIENT, address], env=env, capture_output=True, text=True,
        timeout=180,
    )  # fmt: skip


@pytest.mark.slow
def test_token_cluster_refuses_clients_without_the_token(tmp_path):
    """docs/cluster.md: `ray get-auth-token --generate`, `export RAY_AUTH_MODE=token`,
    `ray start --head`. Each home folder stands for a machine (~/.ray/auth_token)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "HOME"}
    homes = {name: tmp_path / name for name in ("head", "stranger", "other")}
    for home in homes.values():
        home.mkdir()
    generated = {
        name: _ray("get-auth-token", "--generate", env={**base, "HOME": str(homes[name])})
        for name in ("head", "other")
    }
    tokens = {name: (homes[name] / ".ray" / "auth_token").read_text().strip() for name in generated}
    assert tokens["head"] and tokens["other"] and tokens["head"] != tokens["other"]

    port = _free_port()
    ray_tmp = tempfile.mkdtemp(prefix="drtok", dir="/tmp")  # short: Ray's socket paths
    token_env = {**base, "HOME": str(homes["head"]), "RAY_AUTH_MODE": "token"}
    head = subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
         "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=1",
         "--include-dashboard=false", f"--dashboard-agent-listen-port={_free_port()}",
         f"--temp-dir={ray_tmp}", "--disable-usage-stats"],
        env=token_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    address = f"127.0.0.1:{port}"
    try:
        deadline, good = time.time() + 120, None
        while time.time() < deadline:  # the head takes a few seconds to come up
            good = _client(address, token_env)
            if good.returncode == 0 or head.poll() is not None:
                break
            time.sleep(2)
        assert good is not None and good.returncode == 0, good.stderr[-3000:]
        assert "answer 42" in good.stdout  # the token holder gets in: the cluster works
        # a refused client retries for ~20 s by default; 3 tries are enough to see why
        stranger = {**base, "HOME": str(homes["stranger"]), "RAY_gcs_server_port_wait_time_s": "3"}
        wrong = {**stranger, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": tokens["other"]}
        for env in (stranger, wrong):  # no token anywhere; another cluster's token
            refused = _client(address, env)
            assert refused.returncode != 0 and "answer" not in refused.stdout
            assert "AuthenticationError" in refused.stderr, refused.stderr[-3000:]
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops what it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)


# -- nothing unpickles a file ---------------------------------------------------------------
class Plant:
    """Unpickling this creates `marker`: what a crafted file could do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def crafted(marker: Path) -> dict[str, bytes]:
    """The crafted file in every pickle-based format: a plain pickle, a torch.save zip (a
    `.pt`/`.bin`/`.pth`), a NumPy object array (`.npy`)."""
    torch_file, npy = io.BytesIO(), io.BytesIO()
    torch.save({"weight": Plant(marker)}, torch_file)
    np.save(npy, np.array([Plant(marker)], dtype=object), allow_pickle=True)
    return {
        "pickle": pickle.dumps(Plant(marker), protocol=2),
        "torch": torch_file.getvalue(),
        "npy": npy.getvalue(),
    }


def pickled_column(marker: Path, n: int) -> pa.Array:
    """A column of Ray Data's pickled-object extension type (it unpickles on to_pylist)."""
    from ray.data._internal.object_extensions.arrow import ArrowPythonObjectArray

    return ArrowPythonObjectArray.from_objects([Plant(marker)] * n)


@pytest.fixture
def marker(tmp_path) -> Path:
    """The marker file a crafted file would create; it must not exist after the test."""
    path = tmp_path / "code-ran"
    yield path
    assert not path.exists(), "a crafted file was unpickled"


def test_the_crafted_files_do_run_code_when_unpickled(tmp_path):
    """The control: each payload does what the other tests check never happens."""
    path = tmp_path / "ran"
    payloads = crafted(path)
    for load in (
        lambda: pickle.loads(payloads["pickle"]),
        lambda: torch.load(io.BytesIO(payloads["torch"]), weights_only=False),
        lambda: np.load(io.BytesIO(payloads["npy"]), allow_pickle=True),
        lambda: pa.table({"x": pickled_column(path, 1)}).to_pylist(),
    ):
        load()
        assert path.exists()
        path.unlink()


def test_cifar_batches(ray_cluster, tmp_path, marker):
    from dedt_ray.data import open_source

    payloads = crafted(marker)
    for name, payload in [("data_batch_1", "pickle"), ("data_batch_1", "torch"),
                          ("batches.meta", "pickle")]:  # fmt: skip
        folder = tmp_path / f"cifar-{name}-{payload}"
        folder.mkdir()
        (folder / name).write_bytes(payloads[payload])
        with pytest.raises((ValueError, FileNotFoundError)):
            open_source(load_config(None, ["data.source=cifar10", f"data.path={folder}"]).data)


def _fill(folder: Path, payload: bytes, extra: tuple[str, ...] = ()) -> list[Path]:
    """Every file under `folder` replaced by `payload`, plus files named `extra` beside them
    (the names libraries fall back to when their own files are missing)."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    for path in files:
        path.write_bytes(payload)
    for name in extra:
        for sub in {p.parent for p in files}:
            (sub / name).write_bytes(payload)
    return files


FALLBACK_NAMES = ("diffusion_pytorch_model.bin", "pytorch_model.bin", "model.pt", "state.pt")


@pytest.mark.parametrize("payload", ["pickle", "torch"])
def test_training_checkpoints(trained, tmp_path, marker, payload):
    """The files a resumed run reads (load_state is what restore() and fit() call)."""
    from dedt_ray.diffusion.state import load_state

    run = copy_run(trained, tmp_path / "run", "train")
    checkpoint = Path(run.path("train", "checkpoints"))
    newest = sorted(p for p in checkpoint.iterdir() if p.name.startswith("checkpoint_0"))[-1]
    assert load_state(str(newest))["step"] > 0  # readable before
    _fill(newest, crafted(marker)[payload], FALLBACK_NAMES)
    with pytest.raises(Exception):  # noqa: B017 - any refusal, as long as nothing ran
        load_state(str(newest))


@pytest.mark.parametrize("payload", ["pickle", "torch"])
def test_exports_and_user_weights(trained, tmp_path, marker, payload):
    """The train stage's export, a VAE folder, an Inception weights file: with their weights
    replaced, and with the weights removed and .bin fallbacks planted."""
    from dedt_ray.diffusion.export import load_export, load_vae
    from dedt_ray.encoders.inception import load_state_dict

    data = crafted(marker)[payload]
    for replace in (True, False):
        run = copy_run(trained, tmp_path / f"run-{replace}", "train")
        export = Path(run.path("train", "model"))
        for weights in export.rglob("*.safetensors"):
            if replace:
                weights.write_bytes(data)
            else:
                weights.unlink()
                (weights.parent / "diffusion_pytorch_model.bin").write_bytes(data)
        with pytest.raises((OSError, ValueError, pickle.UnpicklingError)):
            load_export(str(export))
        vae = tmp_path / f"vae-{replace}"
        shutil.copytree(export / "unet", vae)  # a diffusers model folder
        with pytest.raises(Exception):  # noqa: B017 - any refusal, as long as nothing ran
            load_vae(str(vae))
    pth = tmp_path / "pt_inception.pth"
    pth.write_bytes(data)
    with pytest.raises(pickle.UnpicklingError):
        load_state_dict(pth)


def test_routed_and_pruned_models(tiny_unet, tmp_path, marker):
    from dedt_ray.tdc.pruning import load_pruned, save_pruned
    from dedt_ray.tdc.routing import RoutedUNet, load_routed, save_routed

    model = tiny_unet()
    save_routed(RoutedUNet([model, model], [(0, 500), (500, 1000)]), tmp_path / "routed")
    save_pruned(model, tmp_path / "pruned")
    for payload in crafted(marker).values():
        _fill(tmp_path / "routed", payload)
        _fill(tmp_path / "pruned", payload)
        with pytest.raises(Exception):  # noqa: B017
            load_routed(tmp_path / "routed")
        with pytest.raises(Exception):  # noqa: B017
            load_pruned(tmp_path / "pruned")


def test_class_weights_and_json_artifacts(trained, tmp_path, marker):
    from dedt_ray.artifacts import read_inputs

    run = copy_run(trained, tmp_path / "run", "select", "reweight")
    Path(run.path("reweight", "class_weights.json")).write_bytes(crafted(marker)["pickle"])
    used = {"select": "s", "reweight": "r"}
    with pytest.raises((ValueError, UnicodeDecodeError)):
        read_inputs(run, used)


def test_parquet_artifacts_and_sources(ray_cluster, trained, tmp_path, marker):
    """A pickled-object column in any parquet file the project reads is refused (Ray Data's
    read_parquet refuses it by itself; these are the readers that use pyarrow directly)."""
    from dedt_ray.artifacts import read_selection
    from dedt_ray.data import open_source
    from dedt_ray.embed import read_embeddings
    from dedt_ray.report import read_run

    run = copy_run(trained, tmp_path / "run", "embed", "select", "train")
    for parts in (("embed", "embeddings.parquet"), ("select", "scores.parquet"),
                  ("train", "metrics.parquet")):  # fmt: skip
        folder = Path(run.path(*parts))
        for path in sorted(folder.glob("*.parquet")) if folder.is_dir() else [folder]:
            table = pq.read_table(path)
            note = pickled_column(marker, table.num_rows)
            pq.write_table(table.append_column("note", note), path)
    for read in (read_embeddings, read_selection, read_run):
        with pytest.raises(ValueError, match="pickled Python objects"):
            read(run)

    data = tmp_path / "images.parquet"
    pq.write_table(pa.table({"image": pickled_column(marker, 3)}), data)
    cfg = load_config(None, ["data.source=parquet", f"data.path={data}", "data.label_column=null"])
    with pytest.raises(ValueError, match="data.path.*pickled Python objects"):
        open_source(cfg.data)


def test_classifier_and_curve_caches(ray_cluster, tmp_path, marker, monkeypatch):
    """The evaluate stage's classifier cache (safetensors + JSON) and the curve scorer's
    real-feature cache (.npz)."""
    import dedt_ray.evaluate.scorer as scorer
    from dedt_ray.evaluate.features import FeatureExtractor, FeatureSpace
    from dedt_ray.evaluate.stage import classifier_space

    over = ["data.image_size=8", "data.limit=60", "evaluate.classifier_epochs=1",
            "evaluate.classifier_max_images=60"]  # fmt: skip
    cfg, store = load_config(None, over), RunStore(str(tmp_path / "run"))
    _, trained_how = classifier_space(cfg, store, 0.0)
    assert trained_how.startswith("trained")
    (weights,) = Path(store.path("classifier")).glob("*/model.safetensors")
    weights.write_bytes(crafted(marker)["pickle"])
    space, how = classifier_space(cfg, store, 0.0)
    assert how.startswith("reused")
    with pytest.raises(Exception):  # noqa: B017 - safetensors refuses the bytes
        FeatureExtractor(space)

    monkeypatch.setattr(scorer, "hash_json", lambda obj: "k")  # a known cache file name
    store.write_bytes(crafted(marker)["npy"], scorer.CACHE, "real-k.npz")
    fake = FeatureSpace("classifier", "x", 1, 8, classifier=space.classifier)
    with pytest.raises(ValueError, match="allow_pickle"):
        scorer.real_side(cfg, store, fake, 0.0)


# -- Ray Tune's sweep state: the one pickle a library must load ------------------------------
def test_sweep_state_must_be_this_users_and_private(tmp_path):
    from dedt_ray.store import check_own_files

    sweep = tmp_path / "tune" / "sweep"
    (sweep / "trial_0").mkdir(parents=True)
    for path in (sweep / "tuner.pkl", sweep / "trial_0" / "params.pkl"):
        path.write_bytes(b"x")
        path.chmod(0o644)
    for folder in (sweep, sweep / "trial_0"):
        folder.chmod(0o755)
    check_own_files(str(sweep), "a test")  # this user's, nobody else may write: trusted
    (sweep / "trial_0" / "params.pkl").chmod(0o664)
    with pytest.raises(PermissionError, match=r"params\.pkl is writable by group or others"):
        check_own_files(str(sweep), "a test")
    (sweep / "trial_0" / "params.pkl").chmod(0o644)
    sweep.chmod(0o777)
    with pytest.raises(PermissionError, match=r"sweep is writable by group or others"):
        check_own_files(str(sweep), "a test")
    sweep.chmod(0o755)
    if os.geteuid() == 0:  # only root can give a file away
        os.chown(sweep / "tuner.pkl", 65534, 65534)
        with pytest.raises(PermissionError, match=r"tuner\.pkl is owned by uid 65534"):
            check_own_files(str(sweep), "a test")


@pytest.mark.slow
def test_restoring_a_sweep_someone_else_could_write_is_refused(ray_cluster, tmp_path, marker):
    """A crafted tuner.pkl that others could have written: refused before Tune loads it."""
    from dedt_ray.smoke import SMOKE_EVALUATE, SMOKE_MODEL
    from dedt_ray.tune import run_sweep

    run = tmp_path / "run"
    state = run / "tune" / "sweep" / "tuner.pkl"
    state.parent.mkdir(parents=True)
    state.write_bytes(crafted(marker)["pickle"])
    state.chmod(0o666)
    state.parent.chmod(0o755)
    cfg = load_config(None, ["data.limit=20", "embed.encoder=pixels", *SMOKE_MODEL,
                             *SMOKE_EVALUATE, "tune.num_samples=1"])  # fmt: skip
    with pytest.raises(PermissionError, match=r"tuner\.pkl is writable by group or others"):
        run_sweep(cfg, str(run))
