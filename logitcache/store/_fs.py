"""Where a cache lives: an fsspec location with the few operations the store needs.

A cache is addressed by a URL or a plain path (``/data/c``, ``file:///data/c``, ``memory://c``;
object stores come through the same door). Commits are atomic in the only way that works on
every backend: write under a temporary name that no reader looks for, then rename. On a local
disk the rename is ``os.replace`` (atomic for files and for directories); on other filesystems
it is fsspec's ``mv``. Readers never list directories to find data: they follow the manifest.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from collections.abc import Mapping
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from logitcache.errors import ConfigError
from logitcache.format.manifest import check_relative_path

__all__ = ["Location", "open_location"]

TMP_PREFIX = ".tmp-"


class Location:
    """A cache root on some filesystem. All ``rel`` arguments are relative POSIX paths."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, url: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/") or "/"
        self.url = url

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def path(self, rel: str) -> str:
        check_relative_path(rel, f"path inside {self.url}")
        return posixpath.join(self.root, rel)

    def exists(self, rel: str) -> bool:
        return bool(self.fs.exists(self.path(rel)))

    def root_exists(self) -> bool:
        return bool(self.fs.exists(self.root))

    def read_bytes(self, rel: str) -> bytes:
        return bytes(self.fs.cat_file(self.path(rel)))

    def size(self, rel: str) -> int:
        return int(self.fs.size(self.path(rel)))

    def makedirs(self, rel: str = "") -> None:
        target = self.path(rel) if rel else self.root
        self.fs.makedirs(target, exist_ok=True)

    def write_atomic(self, rel: str, data: bytes) -> None:
        """Write one file so that readers see either nothing or all of ``data``."""
        final = self.path(rel)
        parent = posixpath.dirname(final)
        tmp = posixpath.join(parent, f"{TMP_PREFIX}{uuid.uuid4().hex}-{posixpath.basename(final)}")
        self.fs.makedirs(parent, exist_ok=True)
        if self.is_local:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        else:
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, final)

    def write_tree_atomic(self, rel: str, files: Mapping[str, bytes]) -> None:
        """Write a directory of files (a Zarr shard) under a temporary name, then rename it."""
        final = self.path(rel)
        parent = posixpath.dirname(final)
        tmp = posixpath.join(parent, f"{TMP_PREFIX}{uuid.uuid4().hex}-{posixpath.basename(final)}")
        try:
            for name, data in files.items():
                check_relative_path(name, f"file of shard {rel}")
                target = posixpath.join(tmp, name)
                self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
                if self.is_local:
                    with open(target, "wb") as f:
                        f.write(data)
                        f.flush()
                        os.fsync(f.fileno())
                else:
                    self.fs.pipe_file(target, data)
            if self.exists(rel):
                self.remove(rel)
            if self.is_local:
                os.replace(tmp, final)
            else:
                self.fs.mv(tmp, final, recursive=True)
        except BaseException:
            self._rm_quiet(tmp)
            raise

    def remove(self, rel: str) -> None:
        p = self.path(rel)
        if self.fs.exists(p):
            self.fs.rm(p, recursive=True)

    def remove_temporaries(self, rel_dir: str, prefix: str = "") -> None:
        """Delete leftovers of interrupted atomic writes in ``rel_dir`` whose final name starts
        with ``prefix`` (temporaries are named ``.tmp-<32 hex>-<final name>``)."""
        d = self.path(rel_dir)
        if not self.fs.exists(d):
            return
        skip = len(TMP_PREFIX) + 33
        for p in self.fs.ls(d, detail=False):
            base = posixpath.basename(p.rstrip("/"))
            if base.startswith(TMP_PREFIX) and base[skip:].startswith(prefix):
                self._rm_quiet(p)

    def _rm_quiet(self, p: str) -> None:
        try:
            if self.fs.exists(p):
                self.fs.rm(p, recursive=True)
        except OSError:
            pass


def open_location(
    url: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> Location:
    """Resolve a URL or local path to a :class:`Location` (nothing is created)."""
    text = os.fspath(url)
    if not text:
        raise ConfigError("cache location is empty: pass a directory or a URL like memory://name")
    try:
        fs, root = fsspec.core.url_to_fs(text, **dict(storage_options or {}))
    except (ValueError, ImportError) as e:
        raise ConfigError(
            f"cannot open cache location {text!r}: {e}. Use a local path or an fsspec URL "
            "(file://, memory://, s3:// with the 's3' extra installed)"
        ) from e
    return Location(fs, root, text)
