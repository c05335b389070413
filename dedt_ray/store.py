"""The run directory: artifacts and stage manifests on a local path or a URI (s3://, gs://).

A stage's artifacts count as complete only when its `_manifest.json` exists: a stage first
clears its folder, writes its artifacts, and writes the manifest last (atomically), so a
crash never leaves a half-written stage that looks done.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import uuid
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
