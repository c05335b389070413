"""`dedt-ray fid REAL GENERATED [evaluate.key=value ...]`: FID, KID and k-NN metrics of two
image sets, in this process (no Ray).

Each side is an image folder (flat, or one sub-folder per class: the classes are pooled), a
`.npz` with `images` (uint8 [N, H, W] or [N, H, W, C], as `dedt-ray sample` writes), or a
pytorch-fid statistics `.npz` (`mu`, `sigma`: FID only). FID follows pytorch-fid: images
converted to RGB by PIL, a float bilinear resize to 299 px, its Inception weights file
(`evaluate.inception_weights`) and its Frechet formula (`scipy.linalg.sqrtm`; `--frechet svd`:
the evaluate stage's nuclear norm, more accurate below 2,048 images a side). KID and the
k-NN metrics use a seeded random subset of `evaluate.manifold_samples` per side, as the
evaluate stage does. A readable summary goes to stdout, then, as its last line, one JSON
object. Exit codes: 0 done, 2 bad paths, files or arguments (the message on stderr).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from dedt_ray.evaluate.features import FeatureExtractor, FeatureSpace
    from dedt_ray.evaluate.streaming import FeatureAccumulator

log = logging.getLogger("dedt_ray")

# pytorch-fid's extensions (matched here case-insensitively)
EXTENSIONS = {"bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp"}
SUMMARY_KEYS = ("precision", "recall", "density", "coverage")


class InputError(ValueError):
    """A path, file or argument that cannot be measured: exit code 2."""


@dataclass
class Side:
    """One input: image files, an image array, or pytorch-fid statistics."""

    path: str
    files: list[Path] | None = None
    images: np.ndarray | None = None
    mu: np.ndarray | None = None
    sigma: np.ndarray | None = None

    @property
    def count(self) -> int | None:
        if self.files is not None:
            return len(self.files)
        return None if self.images is None else len(self.images)

    def batches(self, size: int) -> Iterator[tuple[list[str], list[np.ndarray]]]:
        """(names, uint8 RGB HxWx3 images) in batches of `size`."""
        n = self.count or 0
        for start in range(0, n, size):
            stop = min(n, start + size)
            if self.files is not None:
                chunk = self.files[start:stop]
                yield [str(f) for f in chunk], [_read_image(f) for f in chunk]
            else:
                yield [str(i) for i in range(start, stop)], list(_rgb(self.images[start:stop]))


def add_parser(sub: Any) -> None:
    """Register `fid` on the CLI's subparsers."""
    p = sub.add_parser(
        "fid",
        help="FID / KID / precision-recall of two image folders or .npz files",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("real", metavar="PATH_A", help="real (reference) images: folder or .npz")
    p.add_argument("generated", metavar="PATH_B", help="generated images: folder or .npz")
    p.add_argument("overrides", nargs="*", metavar="evaluate.key=value", help="evaluate.* keys")
    p.add_argument("--config", help="YAML config whose evaluate section to start from")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument(
        "--frechet", choices=["sqrtm", "svd"], default="sqrtm",
        help="Tr sqrt(S1 S2) as pytorch-fid computes it (sqrtm, default) or as a nuclear norm "
        "(svd: the evaluate stage's; more accurate on fewer than 2,048 images a side, faster)",
    )  # fmt: skip


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as err:
        raise InputError(f"{path}: not a readable image ({err})") from err


def _rgb(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W] / [N, H, W, 1|3|4] -> [N, H, W, 3] (grey repeated, alpha dropped)."""
    x = images[..., None] if images.ndim == 3 else images
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return x[..., :3]


def _image_files(folder: Path) -> list[Path]:
    """Images in `folder` and in its immediate sub-folders (one per class), sorted."""
    files = [f for f in folder.iterdir() if f.is_file()]
    for sub in sorted(d for d in folder.iterdir() if d.is_dir()):
        files += [f for f in sub.iterdir() if f.is_file()]
    return sorted(f for f in files if f.suffix.lower().lstrip(".") in EXTENSIONS)


def _load_npz(path: Path) -> Side:
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = set(f.files)
            if "images" in keys:
                images = f["images"]
                if (
                    images.dtype != np.uint8
                    or images.ndim not in (3, 4)
                    or (images.ndim == 4 and images.shape[-1] not in (1, 3, 4))
                ):
                    raise InputError(
                        f"{path}: `images` must be uint8 [N, H, W] or [N, H, W, 1|3|4], got "
                        f"{images.dtype} {list(images.shape)}"
                    )
                return Side(str(path), images=images)
            if {"mu", "sigma"} <= keys:
                return Side(str(path), mu=f["mu"].astype(np.float64),
                            sigma=f["sigma"].astype(np.float64))  # fmt: skip
    except (OSError, ValueError) as err:
        if isinstance(err, InputError):
            raise
        raise InputError(f"{path}: not a readable .npz ({err})") from err
    raise InputError(f"{path}: needs `images` or `mu` + `sigma`, has {sorted(keys)}")


def load_side(path: str) -> Side:
    """An input path as a `Side`; raises InputError naming the path."""
    p = Path(path).expanduser()
    if p.is_dir():
        files = _image_files(p)
        if len(files) < 2:
            raise InputError(
                f"{path}: needs at least 2 images ({', '.join(sorted(EXTENSIONS))}), "
                f"has {len(files)}"
            )
        return Side(path, files=files)
    if p.is_file() and p.suffix.lower() == ".npz":
        side = _load_npz(p)
        if side.images is not None and len(side.images) < 2:
            raise InputError(f"{path}: needs at least 2 images, has {len(side.images)}")
        return side
    if p.is_file():
        raise InputError(f"{path}: expected an image folder or a .npz file")
    raise InputError(f"{path}: no such file or folder")


def evaluate_config(config: str | None, overrides: list[str]) -> Any:
    """The evaluate section from `--config` (or the defaults) and `evaluate.*` overrides."""
    from dedt_ray.config import load_config

    wrong = [o for o in overrides if not o.startswith("evaluate.")]
    if wrong:
        raise InputError(f"only evaluate.* overrides apply here, got {', '.join(wrong)}")
    ev = load_config(config, overrides).evaluate
    if ev.feature_space == "classifier":
        raise InputError(
            "evaluate.feature_space=classifier needs a labelled training set; `dedt-ray fid` "
            "measures in Inception space (and evaluate.extra_spaces)"
        )
    return ev


def feature_spaces(ev: Any) -> list[FeatureSpace]:
    """Inception (pytorch-fid's weights file) first, then `evaluate.extra_spaces`."""
    from dedt_ray.encoders.inception import weights_path
    from dedt_ray.evaluate.features import INCEPTION, FeatureSpace
    from dedt_ray.evaluate.spaces import extra_spaces

    try:
        weights = str(weights_path(ev.inception_weights))
        extras = extra_spaces(ev, 3, 224)
    except (FileNotFoundError, ValueError) as err:
        raise InputError(str(err)) from err
    return [FeatureSpace(INCEPTION, INCEPTION, 3, 299, weights=weights), *extras]


def accumulate(side: Side, extractors: list[FeatureExtractor], ev: Any) -> list[FeatureAccumulator]:
    """Features of every image of a side, one accumulator per space (images of one size are
    encoded together; sizes may differ between images)."""
    from dedt_ray.evaluate.streaming import FeatureAccumulator, id_keys

    accs = [FeatureAccumulator(ev.manifold_samples, per_class=False) for _ in extractors]
    for names, images in side.batches(ev.batch_size):
        keys = id_keys(names, ev.seed)
        labels = np.full(len(names), -1, np.int64)
        for shape in sorted({im.shape for im in images}):
            idx = [i for i, im in enumerate(images) if im.shape == shape]
            batch = np.stack([images[i] for i in idx])
            for acc, extract in zip(accs, extractors, strict=True):
                acc.add(extract.encode(batch), labels[idx], keys[idx])
    return accs


def measure(
    real: Side,
    fake: Side,
    spaces: list[FeatureSpace],
    ev: Any,
    device: str,
    frechet: Literal["sqrtm", "svd"] = "sqrtm",
) -> tuple[dict[str, float | None], list[str]]:
    """The metrics of every space; with a statistics file on either side, FID only."""
    from dedt_ray.evaluate.features import FeatureExtractor
    from dedt_ray.evaluate.streaming import MetricSettings, compute_metrics

    settings = MetricSettings.from_config(ev, frechet=frechet)
    if real.mu is not None or fake.mu is not None:
        return _fid_from_stats(real, fake, spaces, ev, device, frechet)
    extractors = [FeatureExtractor(s, device, ev.batch_size) for s in spaces]
    reals, fakes = accumulate(real, extractors, ev), accumulate(fake, extractors, ev)
    metrics: dict[str, float | None] = {}
    notes: list[str] = []
    for i, (space, r, f) in enumerate(zip(spaces, reals, fakes, strict=True)):
        more, _, more_notes = compute_metrics(
            r, f, space.metric, space.kernel, settings, manifold=i == 0
        )
        metrics.update(more)
        notes += more_notes
    return metrics, notes


def _fid_from_stats(
    real: Side, fake: Side, spaces: list[FeatureSpace], ev: Any, device: str, frechet: str
) -> tuple[dict[str, float | None], list[str]]:
    from dedt_ray.evaluate.features import FeatureExtractor
    from dedt_ray.evaluate.fid import frechet_distance

    stats = []
    for side in (real, fake):
        if side.mu is None:
            extractor = FeatureExtractor(spaces[0], device, ev.batch_size)
            acc = accumulate(side, [extractor], ev)[0]
            side = Side(side.path, mu=acc.total.mean, sigma=acc.total.cov)
        if side.mu.shape != (2048,) or side.sigma.shape != (2048, 2048):
            raise InputError(
                f"{side.path}: mu {side.mu.shape} / sigma {side.sigma.shape} are not 2048-d "
                "Inception pool3 statistics"
            )
        stats += [side.mu, side.sigma]
    metrics: dict[str, float | None] = {"FID": frechet_distance(*stats, method=frechet)}
    metrics.update(dict.fromkeys(["KID_mean", "KID_std", *SUMMARY_KEYS]))
    notes = ["a statistics file (mu, sigma) gives FID only: KID and the k-NN metrics need images"]
    if len(spaces) > 1:
        notes.append("evaluate.extra_spaces are skipped with a statistics file")
    return metrics, notes


def _summary(
    result: dict[str, Any], spaces: list[FeatureSpace], ev: Any, notes: list[str]
) -> list[str]:
    def num(key: str) -> str:
        value = result.get(key)
        return "n/a" if value is None else f"{value:.6g}"

    def side(key: str) -> str:
        count = result[key]["count"]
        return f"{result[key]['path']} ({'statistics' if count is None else f'{count} images'})"

    lines = [f"real:      {side('real')}", f"generated: {side('generated')}",
             f"Inception weights: {spaces[0].weights}"]  # fmt: skip
    for space in spaces:
        kid = f"{num(space.kernel + '_mean')} +- {num(space.kernel + '_std')}"
        lines.append(f"{space.metric:<12} {num(space.metric)}")
        lines.append(f"{space.kernel:<12} {kid} (subsets of {result['kid_subset_size']})")
    for key in SUMMARY_KEYS:
        k = ev.nearest_k if key in ("precision", "recall") else ev.coverage_k
        lines.append(f"{key:<12} {num(key)} (k={k})")
    return lines + [f"note: {note}" for note in notes]


def main(args: argparse.Namespace) -> int:
    from dedt_ray.evaluate.streaming import json_number

    try:
        ev = evaluate_config(args.config, args.overrides)
        real, fake = load_side(args.real), load_side(args.generated)
        spaces = feature_spaces(ev)
    except ValueError as err:  # InputError, ConfigError
        print(f"error: {err}", file=sys.stderr)
        return 2
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        metrics, notes = measure(real, fake, spaces, ev, device, args.frechet)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    counts = [min(ev.manifold_samples, s.count) for s in (real, fake) if s.count]
    result: dict[str, Any] = {k: json_number(v) for k, v in metrics.items()}
    result.update(
        real={"path": real.path, "count": real.count},
        generated={"path": fake.path, "count": fake.count},
        feature_spaces=[s.describe() for s in spaces],
        kid_subset_size=min([ev.kid_subset_size, *counts]) if len(counts) == 2 else None,
        kid_subsets=ev.kid_subsets,
        nearest_k=ev.nearest_k,
        coverage_k=ev.coverage_k,
        frechet="sqrtm (pytorch-fid)" if args.frechet == "sqrtm" else "svd (nuclear norm)",
        notes=notes,
    )
    print("\n".join(_summary(result, spaces, ev, notes)))
    print(json.dumps(result))
    return 0
