"""Where a cache lives: an fsspec location with the few operations the store needs.

A cache is addressed by a URL or a plain path (``/data/c``, ``file:///data/c``, ``memory://c``,
``s3://bucket/prefix``). Commits are atomic in the way each kind of storage allows:

- local disk: write a temporary name that no reader looks for, fsync, ``os.replace``;
- object stores (s3, gcs, azure): a single PUT (or a completed multipart upload) is already
  atomic - an object is invisible until all its bytes arrived - so objects are uploaded straight
  under their final key. "Write temp, then rename" would be a server-side copy of every byte for
  nothing; a crash mid-upload leaves no object (or a stray one no manifest names);
- other fsspec filesystems (memory, ...): temporary name then ``mv``.

Readers never list directories to find data: they follow the manifest.

Transient failures (connection resets, timeouts, HTTP 5xx surfacing as generic ``OSError``) are
retried with exponential backoff and jitter on top of whatever the client library already
retries; permanent ones (missing key, access denied, a failed precondition) are not. When
retries run out the caller gets a :class:`~logitcache.errors.StorageError` naming the operation
and the key. Retries can never turn into wrong data: every shard byte is checked against the
manifest's sha256 by the reader.
"""

from __future__ import annotations

import errno
import os
import posixpath
import random
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any, TypeVar

import fsspec
import google_crc32c
from fsspec.implementations.local import LocalFileSystem

from logitcache.errors import ConfigError, StorageError
from logitcache.format.manifest import check_relative_path

__all__ = ["Location", "crc32c", "open_location"]

TMP_PREFIX = ".tmp-"
# Filesystems whose single-object writes are atomic and whose "rename" is a copy.
OBJECT_STORE_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "adl"})
DEFAULT_RETRIES = 5
DEFAULT_BACKOFF_S = 0.2
_MAX_BACKOFF_S = 10.0
# OSErrors that say something true about the key, not about the network: never retried.
_PERMANENT = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)
T = TypeVar("T")


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of ``data``: hardware-accelerated (~6 GB/s per core here), what a
    reader checks when it skips the sha256. google-crc32c comes with zarr 3."""
    return int(google_crc32c.value(data))


def is_transient(e: BaseException) -> bool:
    """Whether ``e`` is worth retrying: network trouble, timeouts, 5xx-style server errors."""
    if isinstance(e, _PERMANENT):
        return False
    if isinstance(e, (ConnectionError, TimeoutError, socket.timeout)):
        return True
    if isinstance(e, OSError):
        # s3fs maps InternalError/5xx to EREMOTEIO/EIO and SlowDown/503 to EBUSY; client-side
        # mistakes (bad request, precondition) come as EINVAL/EACCES and are not retried
        return e.errno not in (errno.EINVAL, errno.EACCES, errno.EPERM, errno.ENOENT)
    module = type(e).__module__.split(".")[0]
    # botocore/aiohttp transport errors that escaped the client's own retries
    return module in ("botocore", "aiobotocore", "aiohttp", "urllib3", "requests")


class Location:
    """A cache root on some filesystem. All ``rel`` arguments are relative POSIX paths."""

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        root: str,
        url: str,
        *,
        retries: int = DEFAULT_RETRIES,
        backoff_s: float = DEFAULT_BACKOFF_S,
    ) -> None:
        self.fs = fs
        self.root = root.rstrip("/") or "/"
        self.url = url
        self.retries = retries
        self.backoff_s = backoff_s

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    @property
    def is_object_store(self) -> bool:
        protocols = self.fs.protocol
        names = (protocols,) if isinstance(protocols, str) else tuple(protocols)
        return any(p in OBJECT_STORE_PROTOCOLS for p in names)

    def retrying(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` and retry transient failures with backoff; ``what`` names the operation
        in the final error ("reading shards/00000.zarr/c/0")."""
        attempt = 0
        while True:
            try:
                return fn()
            except Exception as e:
                if not is_transient(e):
                    raise
                attempt += 1
                if attempt > self.retries:
                    raise StorageError(
                        f"{what} at {self.url} failed {attempt} times, last with "
                        f"{type(e).__name__}: {e}; the storage or the network is failing: "
                        "check the endpoint and credentials and rerun (a dump continues with "
                        "--resume, a copy by rerunning `logitcache cp`)"
                    ) from e
                delay = min(_MAX_BACKOFF_S, self.backoff_s * 2 ** (attempt - 1))
                time.sleep(delay * (0.5 + random.random()))

    def path(self, rel: str) -> str:
        check_relative_path(rel, f"path inside {self.url}")
        return posixpath.join(self.root, rel)

    def exists(self, rel: str) -> bool:
        p = self.path(rel)
        return bool(self.retrying(f"looking up {rel}", lambda: self.fs.exists(p)))

    def root_exists(self) -> bool:
        return bool(self.retrying("looking up the cache root", lambda: self.fs.exists(self.root)))

    def root_is_file(self) -> bool:
        return bool(self.retrying("looking up the cache root", lambda: self.fs.isfile(self.root)))

    def list_root(self) -> list[str]:
        """Names directly under the root (writers only: readers never list)."""
        entries = self.retrying(
            "listing the cache root", lambda: self.fs.ls(self.root, detail=False)
        )
        return sorted({posixpath.basename(str(p).rstrip("/")) for p in entries} - {""})

    def read_bytes(self, rel: str) -> bytes:
        p = self.path(rel)
        return bytes(self.retrying(f"reading {rel}", lambda: self.fs.cat_file(p)))

    def read_many(self, rels: list[str]) -> dict[str, bytes]:
        """Several files at once (concurrent requests on async filesystems such as s3fs)."""
        paths = {self.path(r): r for r in rels}

        def cat() -> Any:
            return self.fs.cat(list(paths), on_error="raise")

        got = self.retrying(f"reading {len(rels)} files", cat)
        out = {paths[p]: bytes(v) for p, v in got.items() if p in paths}
        if len(out) != len(rels):  # a filesystem that renames keys: fall back to one by one
            return {r: self.read_bytes(r) for r in rels}
        return out

    def size(self, rel: str) -> int:
        p = self.path(rel)
        return int(self.retrying(f"sizing {rel}", lambda: self.fs.size(p)))

    def modified(self, rel: str) -> datetime:
        """When ``rel`` was last written (timezone-aware UTC); NotImplementedError if the
        filesystem cannot say."""
        p = self.path(rel)
        t = self.retrying(f"dating {rel}", lambda: self.fs.modified(p))
        if not isinstance(t, datetime):
            raise NotImplementedError(f"{type(self.fs).__name__} gives no modification time")
        return t if t.tzinfo is not None else t.replace(tzinfo=timezone.utc)

    def write_exclusive(self, rel: str, data: bytes) -> bool:
        """Create ``rel`` holding ``data`` only if it does not exist; False if it did.

        Atomic on local disks (``O_EXCL``) and on S3 (a conditional PUT, ``If-None-Match: *``).
        Elsewhere it is an existence check then a write, which two racing writers can both pass.
        """
        final = self.path(rel)
        parent = posixpath.dirname(final)
        self.fs.makedirs(parent, exist_ok=True)
        if self.is_local:
            try:
                fd = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return True
        if "s3" in self.fs.protocol:

            def put() -> None:
                self.fs.pipe_file(final, data, mode="create")

            try:
                self.retrying(f"creating {rel}", put)
            except FileExistsError:
                return False
            return True
        if self.exists(rel):
            return False
        self.write_atomic(rel, data)
        return True

    def _put(self, target: str, data: bytes) -> None:
        self.retrying(f"writing {target}", lambda: self.fs.pipe_file(target, data))

    def makedirs(self, rel: str = "") -> None:
        target = self.path(rel) if rel else self.root
        self.fs.makedirs(target, exist_ok=True)

    def write_atomic(self, rel: str, data: bytes) -> None:
        """Write one file so that readers see either nothing or all of ``data``."""
        final = self.path(rel)
        parent = posixpath.dirname(final)
        tmp = posixpath.join(parent, f"{TMP_PREFIX}{uuid.uuid4().hex}-{posixpath.basename(final)}")
        self.fs.makedirs(parent, exist_ok=True)
        if self.is_object_store:
            self._put(final, data)  # a PUT is atomic: the key appears with all its bytes
        elif self.is_local:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        else:
            self._put(tmp, data)
            self.fs.mv(tmp, final)

    def write_tree_atomic(self, rel: str, files: Mapping[str, bytes]) -> None:
        """Write a directory of files (a Zarr shard) under a temporary name, then rename it.

        On object stores there are no directories to rename: each file is uploaded under its
        final key (atomic per object). A crash leaves some of the shard's objects, which no
        manifest names, and which a resumed writer overwrites."""
        final = self.path(rel)
        if self.is_object_store:
            if self.exists(rel):
                self.remove(rel)
            for name, data in files.items():
                check_relative_path(name, f"file of shard {rel}")
                self._put(posixpath.join(final, name), data)
            return
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
                    self._put(target, data)
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
        if self.exists(rel):
            self.retrying(f"removing {rel}", lambda: self.fs.rm(p, recursive=True))

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
    """Resolve a URL or local path to a :class:`Location` (nothing is created).

    Besides the filesystem's own options, ``storage_options`` may hold ``logitcache_retries``
    and ``logitcache_backoff_s`` (our retry layer; defaults 5 and 0.2 s, doubling)."""
    text = os.fspath(url)
    options = dict(storage_options or {})
    retries = int(options.pop("logitcache_retries", DEFAULT_RETRIES))
    backoff = float(options.pop("logitcache_backoff_s", DEFAULT_BACKOFF_S))
    if retries < 0 or backoff < 0:
        raise ConfigError(
            f"logitcache_retries and logitcache_backoff_s must be >= 0, got {retries}, {backoff}"
        )
    if not text:
        raise ConfigError("cache location is empty: pass a directory or a URL like memory://name")
    if text.startswith(("s3://", "s3a://")):
        options = _s3_defaults(options)
    try:
        fs, root = fsspec.core.url_to_fs(text, **options)
    except (ValueError, ImportError) as e:
        raise ConfigError(
            f"cannot open cache location {text!r}: {e}. Use a local path or an fsspec URL "
            "(file://, memory://, s3:// with the 's3' extra installed)"
        ) from e
    return Location(fs, root, text, retries=retries, backoff_s=backoff)


def _s3_defaults(options: dict[str, Any]) -> dict[str, Any]:
    """s3fs options with botocore's CRC32 check of every response body turned off (unless set).

    Every file logitcache fetches is checked against the manifest's sha256 anyway, so the client's
    own checksum only spent CPU (~10% of a cold shard read on a small machine). Uploads keep
    their checksum: the server verifies those.
    """
    try:
        from botocore.config import Config  # type: ignore[import-untyped]
    except ImportError:
        return options
    if "response_checksum_validation" not in getattr(Config, "OPTION_DEFAULTS", {}):
        return options  # an older botocore, which has no such check
    config = dict(options.get("config_kwargs") or {})
    config.setdefault("response_checksum_validation", "when_required")
    return {**options, "config_kwargs": config}
