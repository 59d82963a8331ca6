"""A local disk cache of remote shard files, content-addressed, checksum-verified, size-bounded.

A student that streams a cache from object storage for several epochs (or several students on
one machine) should not download the same shards again. Entries are keyed by the sha256 the
manifest records for each file (``ROOT/ab/abcdef...``), which gives three things at once:

- an entry is verified by recomputing its sha256 on every hit: a damaged or half-written entry is
  deleted and fetched again, never used;
- caches that share files (a copy, a merge) share entries, and a cache re-dumped under the same
  URL can never be served stale bytes;
- entries are written to a temporary name (unique per process and call) and renamed with
  ``os.replace``, which is atomic on POSIX: a reader sees no entry or a whole one, never a
  partial write. Concurrent processes (DataLoader workers, the ranks of one node) therefore
  share one directory without locks. Two that fetch the same shard at once both write it; the
  second rename replaces identical bytes (the loser of the race only spent a download; with the
  sampler's shard-aware assignment the ranks of a node read disjoint shards, so this is rare). A
  reader that finds a damaged entry deletes it only if it is still the file it read (not a good
  copy another process renamed in meanwhile); temporaries of crashed writers are removed by the
  next eviction once an hour old. ``tests/data/test_distributed.py`` runs two processes filling
  one cache at once.

The size bound is enforced after each insertion by deleting the least recently used entries
(a hit refreshes an entry's mtime). Eviction scans the directory; entries are whole shard files
(tens of MB), so there are few of them.

:class:`SmallFileMemo` is the in-memory counterpart for small files: a Zarr shard's metadata
documents (~1 KB, 9 of its 16 objects) are byte-identical across shards of equal row counts, so a
reader keeps the verified ones by digest and requests each distinct one once.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
import time
import uuid
from pathlib import Path

from logitcache.errors import ConfigError

__all__ = ["LocalShardCache", "SmallFileMemo", "parse_size"]

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_TMP = ".tmp-"
_STALE_TMP_S = 3600.0  # a temporary this old belongs to a writer that died


def parse_size(text: str | int) -> int:
    """Bytes from ``1073741824``, ``"500M"``, ``"20GB"`` or ``"1.5T"`` (binary units)."""
    if isinstance(text, int):
        value = text
    else:
        m = _SIZE.match(text)
        if not m:
            raise ConfigError(f"cannot read {text!r} as a size; write e.g. 500M, 20G or 1.5T")
        value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value < 1:
        raise ConfigError(f"a cache size must be at least 1 byte, got {text!r}")
    return value


class LocalShardCache:
    """Shard files by sha256 under ``root``, at most ``max_bytes`` in total."""

    def __init__(self, root: str | os.PathLike[str], max_bytes: int) -> None:
        if max_bytes < 1:
            raise ConfigError(f"local cache size must be >= 1 byte, got {max_bytes}")
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create the local cache directory {self.root}: {e}") from e

    def _path(self, sha256: str) -> Path:
        if not _HEX64.match(sha256):
            raise ConfigError(f"not a sha256 hex digest: {sha256!r}")
        return self.root / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        """Whether an entry exists (not checked; :meth:`get` checks)."""
        return self._path(sha256).is_file()

    def get(self, sha256: str, size: int) -> bytes | None:
        """The entry's bytes if present and intact (size and sha256 checked), else None."""
        path = self._path(sha256)
        try:
            with open(path, "rb") as f:
                inode = os.fstat(f.fileno()).st_ino
                data = f.read()
        except OSError:
            self.misses += 1
            return None
        if len(data) != size or hashlib.sha256(data).hexdigest() != sha256:
            # damaged: drop it (the caller fetches again), unless another process has already
            # renamed a new copy in its place
            with contextlib.suppress(OSError):
                if os.stat(path).st_ino == inode:
                    path.unlink(missing_ok=True)
            self.misses += 1
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # LRU: a hit makes the entry young again
        self.hits += 1
        return data

    def put(self, sha256: str, data: bytes) -> None:
        """Store verified bytes under their digest, then evict down to the size bound."""
        if len(data) > self.max_bytes:
            return  # would evict everything and still not fit
        path = self._path(sha256)
        try:
            if path.stat().st_size == len(data):
                return  # another process stored it first (get() checks the digest on use)
        except OSError:
            pass
        tmp = path.parent / f"{_TMP}{os.getpid()}-{uuid.uuid4().hex}"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
            return  # a full or read-only disk makes the cache useless, not the read wrong
        self.evict(keep=path)

    def entries(self) -> list[tuple[float, int, Path]]:
        """(mtime, size, path) of every entry."""
        out: list[tuple[float, int, Path]] = []
        for sub in self.root.iterdir() if self.root.exists() else ():
            if not sub.is_dir():
                continue
            for p in sub.iterdir():
                if p.name.startswith(_TMP):
                    self._drop_if_stale(p)
                    continue
                try:
                    st = p.stat()
                except OSError:
                    continue
                out.append((st.st_mtime, st.st_size, p))
        return out

    @staticmethod
    def _drop_if_stale(tmp: Path) -> None:
        with contextlib.suppress(OSError):
            if time.time() - tmp.stat().st_mtime > _STALE_TMP_S:
                tmp.unlink()

    def total_bytes(self) -> int:
        return sum(size for _, size, _ in self.entries())

    def evict(self, keep: Path | None = None) -> None:
        """Delete least recently used entries until the total fits ``max_bytes``."""
        entries = sorted(self.entries(), key=lambda e: e[0])
        total = sum(size for _, size, _ in entries)
        for _, size, p in entries:
            if total <= self.max_bytes:
                break
            if p == keep:
                continue
            p.unlink(missing_ok=True)
            total -= size


class SmallFileMemo:
    """Verified files of at most ``max_file`` bytes, by sha256, in memory (at most ``max_total``
    bytes: cleared when full; small files that differ per shard pass through). Thread-safe."""

    def __init__(self, max_file: int = 16 << 10, max_total: int = 16 << 20) -> None:
        self.max_file, self.max_total = max_file, max_total
        self._files: dict[str, bytes] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def fits(self, size: int) -> bool:
        return size <= self.max_file

    def get(self, sha256: str) -> bytes | None:
        return self._files.get(sha256)

    def put(self, sha256: str, data: bytes) -> None:
        """Keep ``data``, which the caller has checked hashes to ``sha256``."""
        if not self.fits(len(data)):
            return
        with self._lock:
            if self._bytes + len(data) > self.max_total:
                self._files.clear()
                self._bytes = 0
            if sha256 not in self._files:
                self._files[sha256] = data
                self._bytes += len(data)
