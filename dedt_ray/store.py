"""The run directory: artifacts and stage manifests on a local path or a URI (s3://, gs://).

A stage's artifacts count as complete only when its `_manifest.json` exists: a stage first
clears its folder, writes its artifacts, and writes the manifest last (atomically), so a
crash never leaves a half-written stage that looks done.

Code that needs a local folder (diffusers' `save_pretrained`, an SQLite file) goes through
`RunStore.staged` (write) and `RunStore.fetched` / `local_folder` (read): the folder itself
on a local run directory, a temporary copy on an object store.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

import pyarrow.fs as pafs

MANIFEST = "_manifest.json"
RAY_STATE = "_ray"  # in-progress Ray Train runs: `<run>/_ray/<stage>-<key>`

log = logging.getLogger("dedt_ray")


class RunStore:
    """Paths and atomic reads/writes under one run directory."""

    def __init__(self, root: str):
        if "://" in root:
            self.fs, path = pafs.FileSystem.from_uri(root)
            self.uri_prefix = root[: root.index("://") + 3]
            self.is_local = isinstance(self.fs, pafs.LocalFileSystem)
        else:
            self.fs, path = pafs.LocalFileSystem(), os.path.abspath(root)
            self.uri_prefix = ""
            self.is_local = True
        self.root = path.rstrip("/")
        self.fs.create_dir(self.root, recursive=True)

    def __repr__(self) -> str:
        return f"RunStore({self.uri(self.root)!r})"

    # paths -----------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """A path inside the run directory, in the filesystem's own form."""
        return posixpath.join(self.root, *parts)

    def uri(self, path: str) -> str:
        """The path as a URI Ray Data / pyarrow readers accept from any node."""
        return path if self.is_local else self.uri_prefix + path

    def local_path(self, *parts: str) -> str:
        """A local filesystem path (only for local run directories)."""
        if not self.is_local:
            raise ValueError(f"{self} is not on the local filesystem")
        return self.path(*parts)

    @contextlib.contextmanager
    def staged(self, *parts: str) -> Iterator[str]:
        """A local folder to write `<run>/<parts>` into: that folder on a local run directory;
        else a temporary one, uploaded there when the block ends without an error."""
        dest = self.path(*parts)
        if self.is_local:
            os.makedirs(dest, exist_ok=True)
            yield dest
            return
        with tempfile.TemporaryDirectory(prefix="dedt-staged-") as tmp:
            yield tmp
            self.fs.create_dir(dest, recursive=True)
            pafs.copy_files(tmp, dest, destination_filesystem=self.fs)

    def fetched(self, *parts: str) -> contextlib.AbstractContextManager[str]:
        """A local folder holding `<run>/<parts>` (see `local_folder`)."""
        return local_folder(self.uri(self.path(*parts)))

    # files -----------------------------------------------------------------------------
    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def write_bytes(self, data: bytes, *parts: str) -> str:
        """Write a file atomically (temp name + move where the filesystem allows it)."""
        dest = self.path(*parts)
        self.fs.create_dir(posixpath.dirname(dest), recursive=True)
        if not self.is_local:
            with self.fs.open_output_stream(dest) as f:  # object puts are atomic
                f.write(data)
            return dest
        tmp = f"{dest}.tmp-{uuid.uuid4().hex[:8]}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, dest)
        return dest

    def read_bytes(self, *parts: str) -> bytes:
        with self.fs.open_input_file(self.path(*parts)) as f:
            return f.read()

    def write_json(self, obj: Any, *parts: str) -> str:
        return self.write_bytes(json.dumps(obj, indent=2, sort_keys=False).encode(), *parts)

    def read_json(self, *parts: str) -> Any:
        return json.loads(self.read_bytes(*parts))

    def write_text(self, text: str, *parts: str) -> str:
        return self.write_bytes(text.encode(), *parts)

    def clear(self, *parts: str) -> str:
        """Delete a folder's contents (and the folder) so it can be written afresh."""
        path = self.path(*parts)
        if self.exists(*parts):
            self.fs.delete_dir(path)
        self.fs.create_dir(path, recursive=True)
        return path

    def delete(self, *parts: str) -> None:
        """Delete a folder and its contents, if it exists."""
        if self.exists(*parts):
            self.fs.delete_dir(self.path(*parts))

    def clear_run_state(self, stage: str) -> list[str]:
        """Delete the stage's in-progress Ray Train runs (`<run>/_ray/<stage>-*`); their names."""
        names = [n for n in self.list(RAY_STATE) if n == stage or n.startswith(f"{stage}-")]
        for name in names:
            self.fs.delete_dir(self.path(RAY_STATE, name))
        return names

    def list(self, *parts: str) -> list[str]:
        """Names of the files and folders directly under a folder (sorted)."""
        sel = pafs.FileSelector(self.path(*parts), allow_not_found=True)
        return sorted(posixpath.basename(i.path) for i in self.fs.get_file_info(sel))

    # manifests -------------------------------------------------------------------------
    def manifest(self, stage: str) -> dict[str, Any] | None:
        """The stage's manifest, or None when the stage has not completed.

        An unreadable manifest (not JSON, not a mapping) counts as "not done", with a warning
        naming the file: the stage then runs again."""
        if not self.exists(stage, MANIFEST):
            return None
        try:
            manifest = self.read_json(stage, MANIFEST)
        except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
            manifest = exc
        if not isinstance(manifest, dict):
            log.warning(
                "%s is unreadable (%s); treating stage %r as not done",
                self.uri(self.path(stage, MANIFEST)), manifest, stage,
            )  # fmt: skip
            return None
        return manifest

    def write_manifest(self, stage: str, manifest: dict[str, Any]) -> None:
        self.write_json(manifest, stage, MANIFEST)


@contextlib.contextmanager
def local_folder(uri: str) -> Iterator[str]:
    """A local folder with the content of the folder `uri`: the folder itself when it is a
    local path, else a temporary copy, removed when the block ends."""
    if "://" not in uri:
        yield uri
        return
    fs, path = pafs.FileSystem.from_uri(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{uri} is not an existing folder")
    tmp = tempfile.mkdtemp(prefix="dedt-fetched-")
    try:
        pafs.copy_files(path, tmp, source_filesystem=fs)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_own_files(folder: str, why: str) -> None:
    """Refuse a local folder someone else could have written: PermissionError naming the
    first path under `folder` (itself included, sorted walk) that is not owned by the current
    user or that group or others may write. `why`: what would read it (for the message)."""
    if not hasattr(os, "getuid"):
        return
    me = os.getuid()
    for path in _walk(folder):
        info = os.lstat(path)
        if info.st_uid != me:
            problem = f"is owned by uid {info.st_uid}, not by you (uid {me})"
        elif info.st_mode & 0o022:
            problem = f"is writable by group or others (mode {oct(info.st_mode & 0o777)})"
        else:
            continue
        raise PermissionError(
            f"{path} {problem}: refusing it, because {why}. Only files your own user wrote "
            f"and others cannot change are trusted: if you wrote them, `chmod -R go-w "
            f"{folder}`; else move the folder away to start afresh"
        )


def _walk(folder: str) -> Iterator[str]:
    yield folder
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(dirs + files):
            yield os.path.join(root, name)
