"""Checks the CLI runs before any cluster work, so a wrong path fails in a second, not a minute
into Ray work: exit code 2 with the key or path and what to do.

Cheap checks always run (data.path, the run directory); the ones that need an encoder's
weights run only for the stages that will actually run (`pipeline.pending_stages`).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from pathlib import Path

from dedt_ray.config import Config, ConfigError
from dedt_ray.store import RunStore

FOLDER_SOURCES = ("image_folder", "cifar10")  # data.source values whose data.path is a folder


def check_data_path(cfg: Config) -> None:
    """data.path exists and is a folder where the source reads a folder."""
    path, source = cfg.data.path, cfg.data.source
    if not path:
        return
    if "://" in path:
        check_uri(path, "data.path")
        return
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"data.path: {path} does not exist; give the folder or file to read")
    if source in FOLDER_SOURCES and not p.is_dir():
        raise ConfigError(
            f"data.path: {path} is a file, but data.source={source} reads a folder "
            + ("(cifar-10-batches-py)" if source == "cifar10" else "(one sub-folder per class)")
        )
    if source == "parquet":
        check_parquet_rows(p)
    if source == "image_folder" and not _has_image_file(p):
        from dedt_ray.data.images import IMAGE_EXTENSIONS

        raise ConfigError(
            f"data.path: no image files in {path} (looked for {', '.join(IMAGE_EXTENSIONS)}, "
            "directly or one folder down)"
        )


def check_parquet_rows(path: Path) -> None:
    """A parquet file or folder with at least one row (read from the footers only)."""
    import pyarrow.dataset as pads

    try:
        rows = pads.dataset(str(path), format="parquet").count_rows()
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        reason = _first_line(exc)
        raise ConfigError(f"data.path: {path} is not readable as parquet: {reason}") from None
    if rows == 0:
        raise ConfigError(f"data.path: {path} holds no parquet rows; point it at the data")


def _has_image_file(root: Path) -> bool:
    """Whether the folder or one of its sub-folders holds a file with an image extension."""
    from dedt_ray.data.images import IMAGE_EXTENSIONS

    suffixes = {f".{e}" for e in IMAGE_EXTENSIONS}
    for folder in [root, *(d for d in root.iterdir() if d.is_dir())]:
        if any(f.suffix.lower() in suffixes for f in folder.iterdir() if f.is_file()):
            return True
    return False


def check_uri(uri: str, key: str) -> None:
    """The URI's filesystem opens (credentials, bucket) and the path exists."""
    import pyarrow.fs as pafs

    try:
        fs, path = pafs.FileSystem.from_uri(uri)
        info = fs.get_file_info(path)
    except (OSError, ValueError) as exc:
        reason = f"{_first_line(exc)}{_credentials(uri)}"
        raise ConfigError(f"{key}: cannot open {uri}: {reason}") from None
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"{key}: {uri} does not exist")


def _credentials(uri: str) -> str:
    if uri.startswith("s3://"):
        return " (set AWS credentials: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"
    if uri.startswith("gs://"):
        return " (set GOOGLE_APPLICATION_CREDENTIALS or `gcloud auth application-default login`)"
    return ""


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def open_run_dir(run_dir: str) -> RunStore:
    """The run directory, created and proven writable (a probe file written and deleted)."""
    try:
        store = RunStore(run_dir)
        probe = f".write-test-{uuid.uuid4().hex[:8]}"
        store.write_bytes(b"", probe)
        store.fs.delete_file(store.path(probe))
    except (OSError, ValueError) as exc:
        fix = _credentials(run_dir) if "://" in run_dir else " (check its permissions)"
        raise ConfigError(
            f"--run-dir: cannot write to {run_dir}: {_first_line(exc)}{fix}; "
            "or choose another --run-dir"
        ) from None
    return store


def check_weights(cfg: Config, stages: Sequence[str]) -> None:
    """The weights the stages about to run need: the encoder's, Inception's for evaluate."""
    if "embed" in stages and cfg.embed.model:
        from dedt_ray.encoders import locate_model

        try:
            locate_model(cfg.embed.encoder, cfg.embed.model)
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError(
                f"embed.model: {exc}. Put the weights there, or set embed.model to their path "
                "(docs/encoders.md)"
            ) from None
    if "evaluate" in stages and cfg.evaluate.feature_space == "inception":
        from dedt_ray.encoders.inception import weights_path

        try:
            weights_path(cfg.evaluate.inception_weights)
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError(
                f"evaluate.inception_weights: {exc}. Give the file's path, or set "
                "evaluate.feature_space=auto to fall back to a classifier space "
                "(docs/evaluate.md)"
            ) from None


def check_inputs(cfg: Config, stages: Sequence[str]) -> None:
    """What can be known wrong before the cluster starts: data.path, the weights `stages`
    need, the reweight settings."""
    check_data_path(cfg)
    check_weights(cfg, stages)
    from dedt_ray.reweight.checks import check_reweight

    check_reweight(cfg)  # reference.pretrained is a diffusers UNet folder; batch sizes
