"""`dedt-ray fid` (one run through a subprocess, the rest through `cli.main` in this process:
the same code and exit codes without a new interpreter's imports each), and its FID against
the pytorch-fid package itself.

The Inception weights are pytorch-fid's network with random weights, saved with torch.save
where torch.hub (and so pytorch-fid) looks for `pt_inception-2015-12-05-6726825d.pth`: in the
hub cache of a temporary TORCH_HOME. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dedt_ray.encoders.inception import WEIGHTS_FILE

from tiny_models import save_dinov2, save_inception

REPO = Path(__file__).resolve().parents[1]
# pytorch-fid + torchvision installed apart from the project's environment (see the file)
REFERENCE = Path(os.environ.get("DEDT_FID_REFERENCE", REPO / ".venv" / "fid-reference"))
N = 16  # images per side: small, the network at 299 px is the cost


def _images(n: int, seed: int, shift: float) -> np.ndarray:
    """uint8 [n, 32, 32, 3]: smooth random colour gradients plus noise."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.0, 1.0, 32)[None, :, None, None]
    base = rng.uniform(0, 255, (n, 1, 1, 3)) * (1 - ramp) + shift * ramp
    noisy = base + rng.normal(0, 20, (n, 32, 32, 3))
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def _save_pngs(images: np.ndarray, folder: Path, prefix: str = "img") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{prefix}{i:03d}.png")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fid")
    torch_home = root / "torch"
    save_inception(torch_home / "hub" / "checkpoints" / WEIGHTS_FILE)
    real, fake = _images(N, seed=0, shift=40.0), _images(N, seed=1, shift=220.0)
    _save_pngs(real, root / "real")
    _save_pngs(fake, root / "fake")
    np.savez(root / "fake.npz", images=fake, labels=np.zeros(N, np.int64))
    half = N // 2  # the same images in one sub-folder per class, one class at 24 px
    _save_pngs(fake[:half], root / "classes" / "a")
    small = [np.asarray(Image.fromarray(im).resize((24, 24))) for im in fake[half:]]
    _save_pngs(np.stack(small), root / "classes" / "b")
    np.savez(root / "bad.npz", pixels=fake)
    _save_pngs(real[:1], root / "one")
    return {"root": root, "torch_home": torch_home, "dinov2": save_dinov2(root / "dinov2")}


def dedt_fid(inputs: dict[str, Path], *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TORCH_HOME": str(inputs["torch_home"])}
    return subprocess.run(
        [sys.executable, "-m", "dedt_ray.cli", "fid", *args],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=600,
    )  # fmt: skip


@pytest.fixture
def fid_here(inputs: dict[str, Path], capsys: pytest.CaptureFixture, monkeypatch):
    """`dedt-ray fid ARGS` through `cli.main` in this process: its exit code (argparse's usage
    errors included) and what it printed, as a CompletedProcess."""
    from dedt_ray.cli import main

    monkeypatch.setenv("TORCH_HOME", str(inputs["torch_home"]))

    def run(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        try:
            code = main(["fid", *args])
        except SystemExit as exc:
            code = exc.code
        out = capsys.readouterr()
        return subprocess.CompletedProcess(["fid", *args], code, out.out, out.err)

    return run


def last_json(out: subprocess.CompletedProcess) -> dict:
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def folders(inputs: dict[str, Path]) -> dict:
    """`dedt-ray fid real fake` with a DINOv2 extra space, pytorch-fid's formula (the default):
    run once, read by the folder and the pytorch-fid tests."""
    root = inputs["root"]
    extra = f"evaluate.extra_spaces=[{{encoder: dinov2, model: '{inputs['dinov2']}'}}]"
    out = dedt_fid(inputs, str(root / "real"), str(root / "fake"), extra)
    assert "FID" in out.stdout.splitlines()[3]  # the readable summary comes first
    return last_json(out)


@pytest.mark.slow
def test_fid_folders_npz_and_extra_space(inputs: dict[str, Path], folders: dict, fid_here) -> None:
    root, result = inputs["root"], folders
    for key in ("FID", "KID_mean", "KID_std", "precision", "recall", "FD_dinov2",
                "KD_dinov2_mean"):  # fmt: skip
        assert isinstance(result[key], float), key
    assert result["FID"] > 0 and result["KID_mean"] > 0 and result["FD_dinov2"] > 0
    assert result["real"]["count"] == result["generated"]["count"] == N
    assert result["kid_subset_size"] == N and result["nearest_k"] == 3
    assert result["frechet"] == "sqrtm (pytorch-fid)"

    # the same images from a samples.npz (array order, not file order): the same features, so
    # the same KID and k-NN metrics; `--frechet svd` (a quarter of sqrtm's time at 2048-d)
    # gives the same FID here within 1e-5 (measured: 6e-7 relative on these 16 images a side)
    from_npz = last_json(fid_here(str(root / "real"), str(root / "fake.npz"), "--frechet", "svd"))
    for key in ("KID_mean", "precision", "recall"):
        assert from_npz[key] == pytest.approx(result[key], rel=1e-6, abs=1e-9), key
    assert from_npz["frechet"] == "svd (nuclear norm)"
    assert from_npz["FID"] == pytest.approx(result["FID"], rel=1e-5)

    classes = last_json(fid_here(str(root / "real"), str(root / "classes"), "--frechet", "svd"))
    assert classes["generated"]["count"] == N and np.isfinite(classes["FID"])


def test_fid_bad_inputs_exit_2(inputs: dict[str, Path], fid_here) -> None:
    root = inputs["root"]
    cases = [
        ([str(root / "nowhere"), str(root / "fake")], "nowhere: no such file or folder"),
        ([str(root / "real"), str(root / "bad.npz")], "needs `images` or `mu` + `sigma`"),
        ([str(root / "one"), str(root / "fake")], "needs at least 2 images"),
        ([str(root / "real"), str(root / "fake"), "train.steps=3"], "only evaluate.*"),
        ([str(root / "real"), str(root / "fake"), "evaluate.nearest_k=0"], "nearest_k"),
        ([str(root / "real"), str(root / "fake"), "evaluate.inception_weights=/no/w.pth"],
         "never downloaded"),
        ([str(root / "real"), str(root / "fake"), "evaluate.feature_space=classifier"],
         "labelled training set"),
        ([str(root / "real")], "PATH_B"),
        ([str(root / "real"), str(root / "fake"), "--frechet", "eig"], "invalid choice"),
    ]  # fmt: skip
    for i, (args, message) in enumerate(cases):
        out = dedt_fid(inputs, *args) if i == 0 else fid_here(*args)  # the first as a user
        assert out.returncode == 2, (args, out.stderr)
        assert message in out.stderr and not out.stdout.strip(), (args, out.stderr)


REFERENCE_SCRIPT = """
import sys
import numpy as np
import torch

# torchvision's CUDA wheel beside CPU torch: declare the two ops its import registers fake
# kernels for (never called here), as in tests/fid-reference.txt
lib = torch.library.Library("torchvision", "DEF")
lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
from pytorch_fid import fid_score

real, fake, stats = sys.argv[1:4]
fid_score.save_fid_stats([real, stats], batch_size=10, device="cpu", dims=2048, num_workers=0)
# its own statistics file for the real side: the real images go through Inception once
print(fid_score.calculate_fid_given_paths([stats, fake], 10, "cpu", 2048, num_workers=0))
"""


@pytest.mark.slow
@pytest.mark.skipif(
    not (REFERENCE / "pytorch_fid").is_dir(),
    reason=f"pytorch-fid reference not installed: pip install --no-deps --upgrade --target "
    f"{REFERENCE} -r tests/fid-reference.txt",
)
def test_fid_matches_pytorch_fid(inputs: dict[str, Path], folders: dict, fid_here) -> None:
    """Same images, same weights file: pytorch-fid's FID and ours agree within 1e-3."""
    root = inputs["root"]
    stats = root / "real_stats.npz"
    path = os.pathsep.join([str(REFERENCE), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "TORCH_HOME": str(inputs["torch_home"]), "PYTHONPATH": path}
    ref = subprocess.run(
        [sys.executable, "-c", REFERENCE_SCRIPT, str(root / "real"), str(root / "fake"),
         str(stats)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert ref.returncode == 0, ref.stderr
    theirs = float(ref.stdout.strip().splitlines()[-1])
    ours = folders["FID"]  # `dedt-ray fid real fake`
    print(f"pytorch-fid {theirs!r}, dedt-ray fid {ours!r}, relative {abs(ours / theirs - 1):.3g}")
    assert ours == pytest.approx(theirs, rel=1e-3)
    # pytorch-fid's statistics file on one side: FID only, the same value (the file read right;
    # the formula is checked above, so the faster one here)
    from_stats = last_json(fid_here(str(stats), str(root / "fake"), "--frechet", "svd"))
    assert from_stats["FID"] == pytest.approx(theirs, rel=1e-3)
    assert from_stats["KID_mean"] is None and "FID only" in from_stats["notes"][0]
