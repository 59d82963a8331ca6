"""The cache reader: manifest-driven, verified, random access by row and sequential iteration.

Opening a cache reads only ``manifest.json`` (validated; never a directory listing). A shard is
fetched whole the first time one of its rows is needed: its files are checked against the
manifest's sizes and sha256 digests (on by default; ``verify=False`` skips the sha256, never the
size, the CRC-32C of format 1.2 files, or the structural checks), decoded to numpy in memory,
and kept in a small LRU. Shards are tens of MB, so whole-shard reads suit both local disks and
object stores and make sequential iteration a stream of large reads.

On remote storage every fetch is verified (not only the first: an evicted shard fetched again
crosses the network again), and a fetch whose bytes fail the size or sha256 check is retried a
few times before :class:`ChecksumMismatchError` is raised: a flaky connection costs time, never
wrong data. An optional local cache directory (``local_cache=``, or the environment variables
``LOGITCACHE_LOCAL_CACHE`` and ``LOGITCACHE_LOCAL_CACHE_SIZE``) keeps verified remote files on
local disk, content-addressed and size-bounded (see ``_localcache.py``).

Rows are addressed by *global index* (0..num_rows-1 in manifest order) or by their stable
``row_id``; a target is addressed by (row id, position).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from logitcache.errors import (
    CacheCorruptError,
    CacheIncompleteError,
    CacheNotFoundError,
    ChecksumMismatchError,
    ConfigError,
    ManifestCorruptError,
    ShardMissingError,
    StorageError,
)
from logitcache.format.codec import TargetCodec, Targets
from logitcache.format.manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    FileRecord,
    Manifest,
    ShardRecord,
)
from logitcache.store._fs import Location, crc32c, open_location
from logitcache.store._localcache import LocalShardCache, SmallFileMemo, parse_size
from logitcache.store.backends import backend_for
from logitcache.store.base import EncodedRows, concat_shards, row_position_offsets, slice_rows
from logitcache.store.header import PARTS_DIR, PROGRESS_DIR

__all__ = ["CacheReader", "Rows", "read_manifest"]

LOCAL_CACHE_ENV = "LOGITCACHE_LOCAL_CACHE"
LOCAL_CACHE_SIZE_ENV = "LOGITCACHE_LOCAL_CACHE_SIZE"
DEFAULT_LOCAL_CACHE_SIZE = 50 << 30
_REFETCHES = 2  # extra fetches of a remote file whose bytes fail their check


@dataclass(frozen=True, eq=False)
class Rows:
    """A run of rows as the reader serves it: an :class:`~logitcache.store.base.EncodedRows`
    with its codec attached (``encoded`` as stored, ``targets`` decoded on first use) and
    ``loss_mask`` as bool.

    ``position_offsets[r]:position_offsets[r + 1]`` are row r's positions in the target arrays;
    within a row they are the positions where ``loss_mask`` is true, in order.
    """

    row_id: np.ndarray
    input_ids: np.ndarray
    loss_mask: np.ndarray
    encoded: Mapping[str, np.ndarray]
    codec: TargetCodec

    @property
    def num_rows(self) -> int:
        return int(self.row_id.shape[0])

    @cached_property
    def position_offsets(self) -> np.ndarray:
        return row_position_offsets(self.loss_mask)

    @cached_property
    def targets(self) -> Targets:
        return self.codec.decode(self.encoded)


def read_manifest(loc: Location, *, check_digest: bool = True) -> Manifest:
    """Read and validate ``manifest.json``, telling apart 'no cache' from 'unfinished cache'.

    The content digest is recomputed and a stored one that differs is refused, naming both (the
    manifest was edited after its commit); ``check_digest=False`` is for ``info``, which shows
    both instead."""
    if not loc.exists(MANIFEST_NAME):
        if not loc.root_exists():
            raise CacheNotFoundError(f"no cache at {loc.url}: the location does not exist")
        if any(loc.exists(d) for d in ("shards", PROGRESS_DIR, PARTS_DIR)):
            raise CacheIncompleteError(
                f"{loc.url} is an incomplete cache: it has shards but no manifest.json, so the "
                "dump that wrote it crashed or is still running; resume the dump (--resume) or "
                "run `logitcache finalize` if all ranks finished"
            )
        raise CacheNotFoundError(f"no cache at {loc.url}: manifest.json is missing")
    where = f"{loc.url}/{MANIFEST_NAME}"
    size = loc.size(MANIFEST_NAME)
    if size > MAX_MANIFEST_BYTES:  # refused before it is read into memory
        raise ManifestCorruptError(
            f"{where} is {size:,} bytes, over the {MAX_MANIFEST_BYTES >> 20} MiB any manifest "
            "needs; it is damaged or not a logitcache manifest: re-copy or re-dump the cache"
        )
    return Manifest.from_json(loc.read_bytes(MANIFEST_NAME), where, check_digest=check_digest)


def _local_cache(
    loc: Location, path: str | os.PathLike[str] | None, size: int | str | None
) -> LocalShardCache | None:
    if loc.is_local:
        return None  # a local cache of a local disk only doubles the bytes
    path = path if path is not None else os.environ.get(LOCAL_CACHE_ENV) or None
    if path is None:
        return None
    if size is None:
        size = os.environ.get(LOCAL_CACHE_SIZE_ENV) or DEFAULT_LOCAL_CACHE_SIZE
    return LocalShardCache(path, parse_size(size))


class CacheReader:
    """Read a committed cache. Thread-safe; cheap to construct (reads only the manifest).

    ``local_cache``/``local_cache_size``: a directory keeping verified copies of remote shard
    files, and its bound (bytes, or ``"20G"``); default from ``$LOGITCACHE_LOCAL_CACHE`` and
    ``$LOGITCACHE_LOCAL_CACHE_SIZE`` (50 GiB). Ignored for caches on local disk. Remote files
    under 16 KiB (a Zarr shard's metadata documents, equal across most shards) are also kept in
    memory by sha256 and requested once. ``reuse=False`` turns both off: every file is read from
    the store itself (``logitcache verify`` does this, so that no object goes unchecked).
    """

    def __init__(
        self,
        url: str,
        *,
        verify: bool = True,
        max_cached_shards: int = 2,
        storage_options: Mapping[str, Any] | None = None,
        local_cache: str | os.PathLike[str] | None = None,
        local_cache_size: int | str | None = None,
        reuse: bool = True,
    ) -> None:
        if max_cached_shards < 1:
            raise ConfigError(f"max_cached_shards must be >= 1, got {max_cached_shards}")
        self.loc = open_location(url, storage_options)
        self.url = url
        self.manifest = read_manifest(self.loc)
        self.local_cache = _local_cache(self.loc, local_cache, local_cache_size) if reuse else None
        # remote only: on a local disk a re-read is as cheap as a lookup
        self._memo = SmallFileMemo() if reuse and not self.loc.is_local else None
        self.codec = self.manifest.codec
        self.verify = verify
        self._backend = backend_for(self.manifest.backend, self.codec)
        self._specs = self.codec.array_specs()
        self._count_array = self.codec.entry_count_array
        self.shard_row_offsets = np.zeros(len(self.manifest.shards) + 1, dtype=np.int64)
        np.cumsum([s.rows for s in self.manifest.shards], out=self.shard_row_offsets[1:])
        self._cache: OrderedDict[int, tuple[EncodedRows, np.ndarray]] = OrderedDict()
        self._max_cached = max_cached_shards
        self._verified: set[int] = set()
        self._lock = threading.Lock()
        self._row_index: dict[int, int] | None = None

    @property
    def num_rows(self) -> int:
        return int(self.shard_row_offsets[-1])

    @property
    def num_shards(self) -> int:
        return len(self.manifest.shards)

    def __len__(self) -> int:
        return self.num_rows

    # -- shards ---------------------------------------------------------------------------

    def fetch_shard_files(self, index: int, verify: bool | None = None) -> dict[str, bytes]:
        """The raw files of shard ``index``, checked against the manifest (size always, digest
        when verifying). Keys are paths relative to the shard ("" for a single-file shard)."""
        rec = self.manifest.shards[index]
        check = self.verify if verify is None else verify
        out: dict[str, bytes] = {}
        first: dict[str, bytes] = {}
        if not self.loc.is_local and len(rec.files) > 1:
            # a Zarr shard is a dozen objects: request them together, not one round trip each
            need: dict[str, str] = {}  # one request per distinct small file (digest)
            for f in rec.files:
                if not self._cached(f) and self._memoized(f) is None:
                    small = self._memo is not None and self._memo.fits(f.bytes)
                    need.setdefault(f.sha256 if small else f.path, f.path)
            with contextlib.suppress(FileNotFoundError, StorageError):
                first = self.loc.read_many(list(need.values())) if need else {}
        for f in rec.files:
            out[f.path[len(rec.path) + 1 :] if f.path != rec.path else ""] = self.fetch_file(
                rec, f, check, first.get(f.path)
            )
        return out

    def _cached(self, f: FileRecord) -> bool:
        return self.local_cache is not None and self.local_cache.has(f.sha256)

    def _memoized(self, f: FileRecord) -> bytes | None:
        return None if self._memo is None else self._memo.get(f.sha256)

    def fetch_file(
        self, rec: ShardRecord, f: FileRecord, check: bool = True, first: bytes | None = None
    ) -> bytes:
        """One file, from the local cache if it holds it intact, else from the store (``first``:
        bytes already fetched, checked like any other); remote bytes are always verified, and
        fetched again (a few times) when they fail."""
        small = self._memoized(f)
        if small is not None:  # verified when it was stored; equal digest, equal bytes
            return small
        if self.local_cache is not None:
            hit = self.local_cache.get(f.sha256, f.bytes)
            if hit is not None:
                return hit
        remote = not self.loc.is_local
        attempt = 0
        while True:
            try:
                data = first if first is not None else self.loc.read_bytes(f.path)
                first = None
            except FileNotFoundError as e:
                raise ShardMissingError(
                    f"shard {rec.path}: file {f.path} listed in the manifest is missing from "
                    f"{self.url}; the cache was copied incompletely: re-copy or re-dump it"
                ) from e
            try:
                self._check_file(rec, f, data, check or remote)
            except ChecksumMismatchError:
                attempt += 1
                if not remote or attempt > _REFETCHES:
                    raise
                continue
            if self.local_cache is not None:
                self.local_cache.put(f.sha256, data)
            if self._memo is not None:  # remote bytes are always verified
                self._memo.put(f.sha256, data)
            return data

    @staticmethod
    def _check_file(rec: ShardRecord, f: FileRecord, data: bytes, digest: bool) -> None:
        if len(data) != f.bytes:
            raise ChecksumMismatchError(
                f"shard {rec.path}: file {f.path} is {len(data)} bytes but the manifest "
                f"says {f.bytes} (truncated or replaced); re-copy or re-dump the cache"
            )
        if digest:
            got = hashlib.sha256(data).hexdigest()
            if got != f.sha256:
                raise ChecksumMismatchError(
                    f"shard {rec.path}: file {f.path} fails its checksum (sha256 "
                    f"{got[:16]}..., manifest {f.sha256[:16]}...): the bytes are "
                    "damaged; re-copy or re-dump the cache"
                )
        elif f.crc32c is not None and crc32c(data) != f.crc32c:
            raise ChecksumMismatchError(
                f"shard {rec.path}: file {f.path} fails its CRC-32C (the manifest's {f.crc32c}, "
                f"the bytes' {crc32c(data)}): they are damaged or belong to another file; re-copy "
                "or re-dump the cache"
            )

    def load_shard(self, index: int) -> EncodedRows:
        """Shard ``index`` decoded to numpy (codes, not decoded targets); cached."""
        return self._load(index)[0]

    def _load(self, index: int) -> tuple[EncodedRows, np.ndarray]:
        if not 0 <= index < self.num_shards:
            raise IndexError(f"shard index {index} out of range [0, {self.num_shards})")
        with self._lock:
            hit = self._cache.get(index)
            if hit is not None:
                self._cache.move_to_end(index)
                return hit
        verify = self.verify and index not in self._verified
        files = self.fetch_shard_files(index, verify=verify)
        data = self.decode_shard_files(index, files)
        entry = (data, row_position_offsets(data.loss_mask))
        with self._lock:
            self._verified.add(index)
            self._cache[index] = entry
            while len(self._cache) > self._max_cached:
                self._cache.popitem(last=False)
        return entry

    def decode_shard_files(self, index: int, files: Mapping[str, bytes]) -> EncodedRows:
        """Decode shard ``index`` from its raw files and check it against the manifest."""
        rec = self.manifest.shards[index]
        try:
            data = self._backend.deserialize(files, self._specs, self.manifest.seq_len)
        except CacheCorruptError as e:  # the decoders' own errors only (see base.decoding)
            raise CacheCorruptError(
                f"shard {rec.path}: cannot decode ({e}); the shard is damaged: re-copy or "
                "re-dump the cache"
            ) from e
        self._check_structure(rec, data)
        return data

    def _check_structure(self, rec: ShardRecord, data: EncodedRows) -> None:
        def bad(msg: str) -> CacheCorruptError:
            return CacheCorruptError(f"shard {rec.path}: {msg}; re-copy or re-dump the cache")

        s = self.manifest.seq_len
        if data.num_rows != rec.rows:
            raise bad(f"holds {data.num_rows} rows, manifest says {rec.rows}")
        if data.input_ids.shape != (rec.rows, s) or data.loss_mask.shape != (rec.rows, s):
            raise bad(f"row arrays have shape {data.input_ids.shape}, expected ({rec.rows}, {s})")
        if data.loss_mask.size and data.loss_mask.max() > 1:
            raise bad("loss_mask holds values other than 0 and 1")
        vocab = self.manifest.padded_vocab_size
        if data.input_ids.size and (data.input_ids.min() < 0 or data.input_ids.max() >= vocab):
            raise bad(
                f"input_ids lie in [{data.input_ids.min()}, {data.input_ids.max()}], outside "
                f"[0, padded_vocab_size {vocab})"
            )
        positions = int(data.loss_mask.astype(np.int64).sum())
        if positions != rec.positions:
            raise bad(f"loss_mask selects {positions} positions, manifest says {rec.positions}")
        entries = (
            int(data.encoded[self._count_array].astype(np.int64).sum()) if self._count_array else 0
        )
        if entries != rec.entries:
            raise bad(f"holds {entries} target entries, manifest says {rec.entries}")
        for spec in self._specs:
            arr = data.encoded[spec.name]
            want = (positions if spec.level == "position" else entries, *spec.inner_shape)
            if arr.shape != want:
                raise bad(f"targets/{spec.name} has shape {arr.shape}, expected {want}")

    # -- rows -----------------------------------------------------------------------------

    def locate(self, index: int) -> tuple[int, int]:
        """(shard index, row within shard) of global row ``index``."""
        if not 0 <= index < self.num_rows:
            raise IndexError(f"row index {index} out of range [0, {self.num_rows})")
        shard = int(np.searchsorted(self.shard_row_offsets, index, side="right")) - 1
        return shard, index - int(self.shard_row_offsets[shard])

    def read_rows(self, start: int, stop: int) -> Rows:
        """Global rows ``[start, stop)`` (may span shards)."""
        if not 0 <= start <= stop <= self.num_rows:
            raise IndexError(f"rows [{start}, {stop}) out of range [0, {self.num_rows}]")
        if start == stop:
            return self._rows(self._empty())
        parts: list[EncodedRows] = []
        i = start
        while i < stop:
            shard, local = self.locate(i)
            data, pos_off = self._load(shard)
            n = min(stop - i, data.num_rows - local)
            parts.append(
                slice_rows(data, local, local + n, self._specs, self._count_array, pos_off)
            )
            i += n
        return self._rows(parts[0] if len(parts) == 1 else concat_shards(parts, self._specs))

    def _empty(self) -> EncodedRows:
        s = self.manifest.seq_len
        return EncodedRows(
            row_id=np.zeros(0, np.int64),
            input_ids=np.zeros((0, s), np.int32),
            loss_mask=np.zeros((0, s), np.uint8),
            encoded={sp.name: np.zeros((0, *sp.inner_shape), sp.dtype) for sp in self._specs},
        )

    def _rows(self, d: EncodedRows) -> Rows:
        return Rows(
            row_id=d.row_id,
            input_ids=d.input_ids,
            loss_mask=d.loss_mask.astype(bool),
            encoded=d.encoded,
            codec=self.codec,
        )

    def __getitem__(self, index: int) -> Rows:
        return self.read_rows(index, index + 1)

    def iter_rows(self, batch_rows: int = 64) -> Iterator[Rows]:
        """All rows in manifest order, ``batch_rows`` at a time (never spanning shards)."""
        if batch_rows < 1:
            raise ConfigError(f"batch_rows must be >= 1, got {batch_rows}")
        for shard in range(self.num_shards):
            lo, hi = int(self.shard_row_offsets[shard]), int(self.shard_row_offsets[shard + 1])
            for start in range(lo, hi, batch_rows):
                yield self.read_rows(start, min(start + batch_rows, hi))

    def find(self, row_id: int) -> int:
        """Global index of the row with stable id ``row_id`` (builds an index on first use)."""
        if self._row_index is None:
            index: dict[int, int] = {}
            for shard in range(self.num_shards):
                base = int(self.shard_row_offsets[shard])
                for j, rid in enumerate(self.load_shard(shard).row_id.tolist()):
                    index[rid] = base + j
            self._row_index = index
        if row_id not in self._row_index:
            raise KeyError(f"row id {row_id} is not in cache {self.url}")
        return self._row_index[row_id]

    def targets_at(self, row_id: int, position: int) -> Targets | None:
        """The decoded target at (row id, position); None where the position has no target
        (its loss_mask is 0)."""
        index = self.find(row_id)
        rows = self.read_rows(index, index + 1)
        s = self.manifest.seq_len
        if not 0 <= position < s:
            raise IndexError(f"position {position} out of range [0, {s})")
        if not rows.loss_mask[0, position]:
            return None
        j = int(rows.loss_mask[0, :position].sum())
        one = slice_rows(_positions_as_rows(rows), j, j + 1, self._specs, self._count_array)
        return self.codec.decode(one.encoded)


def _positions_as_rows(rows: Rows) -> EncodedRows:
    """View a row's positions as rows of length 1, so slice_rows can cut single positions."""
    p = int(rows.position_offsets[-1])
    return EncodedRows(
        row_id=np.arange(p, dtype=np.int64),
        input_ids=np.zeros((p, 1), np.int32),
        loss_mask=np.ones((p, 1), np.uint8),
        encoded=rows.encoded,
    )
