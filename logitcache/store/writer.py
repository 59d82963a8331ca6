"""The cache writer: rows in, atomically committed shards and a manifest out.

Commit protocol (what makes a crashed dump harmless):

1. rows are encoded by the codec and buffered in memory;
2. a shard is cut at the first row where the buffered raw bytes reach ``shard_bytes`` (so shard
   boundaries depend only on the sequence of rows, never on batch sizes: a resumed dump cuts
   the same shards), serialised in memory, checksummed, written under a temporary name and
   renamed into place;
3. after each shard, a small progress record ``_writers/<name>.json`` is replaced atomically: it
   lists the committed shards, which is all ``resume`` needs;
4. ``commit()`` flushes the last shard, writes the tokenizer's files if it was given them
   (``tokenizer/``, format 1.3, each atomically; see ``tokenizer.py``) and ``manifest.json`` last,
   atomically. With
   ``part=...`` (one writer per rank) it writes a completion marker ``_parts/<part>.json``
   instead and :func:`finalize_cache` later joins all parts into the manifest.

A writer that raises or is left unclosed writes no manifest, so readers refuse the directory as
incomplete; its committed shards stay for ``resume``.

One writer per cache (per part): the writer holds a lock object ``_locks/<name>.json`` created
exclusively (a conditional PUT on S3) from construction to commit or abort; see ``_lock.py``.
On object stores, shards and records are uploaded straight under their final keys (a PUT is
atomic); see ``_fs.py``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from types import TracebackType
from typing import Any

import numpy as np

from logitcache.errors import CacheIncompleteError, ConfigError, LogitCacheError, WriterError
from logitcache.format.codec import Targets
from logitcache.format.manifest import (
    MANIFEST_NAME,
    TOKENIZER_DIR,
    Coverage,
    CoverageSums,
    FileRecord,
    Manifest,
    ShardRecord,
    first_difference,
    shard_name,
)
from logitcache.store._fs import TMP_PREFIX, Location, crc32c, open_location
from logitcache.store._lock import LOCKS_DIR, WriterLock
from logitcache.store.backends import backend_for
from logitcache.store.base import (
    EncodedRows,
    concat_shards,
    row_position_offsets,
    shard_nbytes,
    slice_rows,
)
from logitcache.store.header import (
    DEFAULT_SHARD_BYTES,
    PARTS_DIR,
    PROGRESS_DIR,
    CacheHeader,
)
from logitcache.store.tokenizer import tokenizer_file_records

__all__ = ["CacheWriter", "check_output", "check_shard_bytes"]

log = logging.getLogger("logitcache")

_MAX_SHARD_BYTES = 1 << 30  # Arrow list offsets are int32
# what a cache directory holds (besides temporaries of interrupted atomic writes)
_CACHE_ENTRIES = frozenset(
    {MANIFEST_NAME, "shards", TOKENIZER_DIR, PROGRESS_DIR, PARTS_DIR, LOCKS_DIR}
)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _refuse_output(
    loc: Location,
    *,
    overwrite: bool,
    resume: bool,
    part: str | None,
    force_overwrite_non_cache: bool = False,
) -> None:
    """Every refusal of an output location, in one place: :func:`check_output` runs it before
    any work is done, the :class:`CacheWriter` constructor before taking its lock and again under
    it.

    A regular file is refused; so is a non-empty directory that is not a cache (a cache holds
    only ``manifest.json``, ``shards/``, ``_writers/``, ``_parts/``, ``_locks/``), and ``overwrite``
    of one unless ``force_overwrite_non_cache`` (it deletes ``shards/`` and the rest). A committed
    cache needs ``overwrite``; shards of an unfinished dump need ``resume`` or ``overwrite`` (with
    ``part``, only that part's own progress counts: the other writers of a multi-writer cache may
    already be writing)."""
    if overwrite and resume:
        raise ConfigError("overwrite and resume exclude each other; pick one")
    _refuse_non_cache(loc, overwrite, force_overwrite_non_cache)
    if overwrite:
        return
    if loc.exists(MANIFEST_NAME):
        raise WriterError(
            f"{loc.url} already holds a committed cache; choose another output, or pass "
            "overwrite=True (--overwrite) to replace it"
        )
    if resume:
        return
    if part is None:
        unfinished = loc.exists("shards") or loc.exists(PROGRESS_DIR)
    else:
        unfinished = loc.exists(f"{PROGRESS_DIR}/{part}.json")
    if unfinished:
        by = f" by {part}" if part else ""
        raise CacheIncompleteError(
            f"{loc.url} holds shards of an unfinished dump{by}; pass resume=True (--resume) to "
            "continue it or overwrite=True (--overwrite) to start again"
        )


def _refuse_non_cache(loc: Location, overwrite: bool, force: bool) -> None:
    if not loc.root_exists():
        return
    if loc.root_is_file():
        raise WriterError(
            f"{loc.url} is a file, not a directory: give the cache a new or empty directory"
        )
    names = [n for n in loc.list_root() if not n.startswith(TMP_PREFIX) and n != LOCKS_DIR]
    if not names:
        return
    foreign = [n for n in names if n not in _CACHE_ENTRIES]
    records = {MANIFEST_NAME, PROGRESS_DIR, PARTS_DIR} & set(names)
    shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
    if foreign and not overwrite:
        raise WriterError(
            f"{loc.url} is not empty and is not a cache (it holds {shown}); write the cache "
            "to a new or empty directory"
        )
    if overwrite and (foreign or not records) and not force:
        what = f"it holds {shown}" if foreign else "it has shards/ but no manifest or progress"
        raise WriterError(
            f"refusing to overwrite {loc.url}: it is not a cache ({what}), and overwriting "
            "deletes its shards/ directory. Write the cache elsewhere, or pass "
            "force_overwrite_non_cache=True (--force-overwrite-non-cache) if that is intended"
        )


def _clear_output(loc: Location) -> None:
    """Remove an old cache (``overwrite``); the manifest goes first: from then on the old cache
    no longer reads as complete."""
    loc.remove(MANIFEST_NAME)
    for rel in ("shards", TOKENIZER_DIR, PROGRESS_DIR, PARTS_DIR):
        loc.remove(rel)


class CacheWriter:
    """Append rows to a new cache; see the module docstring for the commit protocol.

    Use as a context manager: leaving the block normally commits, an exception aborts (no
    manifest). ``name`` scopes shard names and the progress record, so several writers (ranks)
    can share one cache; ``part`` makes :meth:`commit` write a completion marker instead of the
    manifest. ``tokenizer_files`` (``{name: bytes}``, see ``tokenizer.py``) are stored under
    ``tokenizer/`` at commit and listed in the manifest's ``tokenizer.files``; without them the
    manifest lists none, whatever the header's ``tokenizer`` says (a transform that copies a
    source's header never lists files it did not write).
    """

    def __init__(
        self,
        url: str,
        header: CacheHeader,
        *,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        overwrite: bool = False,
        resume: bool = False,
        part: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        break_lock: bool = False,
        force_overwrite_non_cache: bool = False,
        tokenizer_files: Mapping[str, bytes] | None = None,
    ) -> None:
        check_shard_bytes(shard_bytes)
        if header.codec.name != header.targets.method:
            raise ConfigError(
                f"codec {header.codec.name!r} does not match targets.method "
                f"{header.targets.method!r}"
            )
        if header.tokenizer.files:
            header = replace(header, tokenizer=replace(header.tokenizer, files=()))
        self.header = header
        self._tokenizer_files = dict(tokenizer_files or {})
        self._tokenizer_records = tokenizer_file_records(self._tokenizer_files)
        self.loc = open_location(url, storage_options)
        self.shard_bytes = shard_bytes
        self.part = part
        self._prefix = f"{part}-" if part else ""
        self._progress = f"{PROGRESS_DIR}/{part or 'main'}.json"
        self._backend = backend_for(header.backend, header.codec)
        self._specs = header.codec.array_specs()
        self._count_array = header.codec.entry_count_array
        self._buffer: list[EncodedRows] = []
        self._buffer_bytes = 0
        self._shards: list[ShardRecord] = []
        # per-position coverage statistics of the buffered rows, in position order: a shard
        # takes the sums of exactly its own positions (so a resume never counts a row twice)
        self._pending_stats: list[tuple[int, list[np.ndarray | None]]] = []
        self._closed = False
        self._lock = WriterLock(self.loc, part or "main")

        def refuse() -> None:
            _refuse_output(
                self.loc,
                overwrite=overwrite,
                resume=resume,
                part=part,
                force_overwrite_non_cache=force_overwrite_non_cache,
            )

        refuse()  # before the lock too: nothing is created in a refused location
        self._lock.acquire(break_lock)
        try:
            refuse()
            if overwrite and part is None:  # parts: one process cleared it (check_output(clear))
                _clear_output(self.loc)
            self.loc.makedirs()
            self.resumed_rows = self._resume() if resume else 0
        except BaseException:
            self._lock.release()
            raise

    # -- writing ---------------------------------------------------------------------------

    @property
    def rows_written(self) -> int:
        """Rows accepted so far (committed or buffered), including resumed ones."""
        return sum(s.rows for s in self._shards) + sum(b.num_rows for b in self._buffer)

    def write(
        self,
        row_id: np.ndarray,
        input_ids: np.ndarray,
        loss_mask: np.ndarray,
        targets: Targets,
        *,
        captured_mass: np.ndarray | None = None,
        entropy: np.ndarray | None = None,
        nll: np.ndarray | None = None,
    ) -> None:
        """Append a batch of rows. ``targets`` covers exactly the positions where
        ``loss_mask`` is true, row-major; ``captured_mass``/``entropy``/``nll`` (the teacher's
        NLL of the true next token; NaN where none) are optional per-position coverage
        statistics averaged into the manifest."""
        if self._closed:
            raise WriterError("write() after commit() or abort(): open a new CacheWriter")
        data = self._validate(row_id, input_ids, loss_mask, targets)
        stats = [
            None if a is None else np.asarray(a).reshape(-1) for a in (captured_mass, entropy, nll)
        ]
        for name, arr in zip(("captured_mass", "entropy", "nll"), stats, strict=True):
            if arr is not None and arr.size != targets.num_positions:
                raise WriterError(
                    f"{name} must hold one value per target position ({targets.num_positions}), "
                    f"got {arr.size}"
                )
        if targets.num_positions:
            self._pending_stats.append((targets.num_positions, stats))
        self._buffer.append(data)
        self._buffer_bytes += shard_nbytes(data)
        while self._buffer_bytes >= self.shard_bytes:
            self._flush_one()

    def _validate(
        self, row_id: np.ndarray, input_ids: np.ndarray, loss_mask: np.ndarray, targets: Targets
    ) -> EncodedRows:
        h = self.header
        row_id = np.asarray(row_id)
        input_ids = np.asarray(input_ids)
        loss_mask = np.asarray(loss_mask)
        if row_id.ndim != 1 or not np.issubdtype(row_id.dtype, np.integer):
            raise WriterError(
                f"row_id must be a 1-D integer array, got {row_id.dtype}{row_id.shape}"
            )
        b = row_id.shape[0]
        for name, arr in (("input_ids", input_ids), ("loss_mask", loss_mask)):
            if arr.shape != (b, h.seq_len):
                raise WriterError(
                    f"{name} must be [rows={b}, seq_len={h.seq_len}], got shape {arr.shape}"
                )
        if b and (input_ids.min() < 0 or input_ids.max() >= h.padded_vocab_size):
            raise WriterError(
                f"input_ids must lie in [0, {h.padded_vocab_size}), got range "
                f"[{input_ids.min()}, {input_ids.max()}]"
            )
        mask = loss_mask.astype(bool)
        if int(mask.sum()) != targets.num_positions:
            raise WriterError(
                f"targets hold {targets.num_positions} positions but loss_mask selects "
                f"{int(mask.sum())}; pass targets for exactly the masked positions, row-major"
            )
        return EncodedRows(
            row_id=row_id.astype(np.int64),
            input_ids=input_ids.astype(np.int32),
            loss_mask=mask.astype(np.uint8),
            encoded=self.header.codec.encode(targets),
        )

    def _flush_one(self, final: bool = False) -> None:
        """Write the shard at the front of the buffer (cut by size, or everything if final)."""
        data = concat_shards(self._buffer, self._specs)
        n = data.num_rows
        if not final:
            per_row = _row_bytes(data, self._specs, self._count_array)
            n = int(np.searchsorted(np.cumsum(per_row), self.shard_bytes)) + 1
            n = min(n, data.num_rows)
        pos_off = row_position_offsets(data.loss_mask)
        head = slice_rows(data, 0, n, self._specs, self._count_array, pos_off)
        tail = slice_rows(data, n, data.num_rows, self._specs, self._count_array, pos_off)
        self._write_shard(head)
        self._buffer = [tail] if tail.num_rows else []
        self._buffer_bytes = shard_nbytes(tail)

    def _take_coverage(self, positions: int) -> CoverageSums:
        """The coverage sums of the next ``positions`` buffered positions (removed)."""
        out = CoverageSums()
        while positions > 0:
            n, stats = self._pending_stats[0]
            take = min(n, positions)
            out = out + CoverageSums.of(take, *(None if a is None else a[:take] for a in stats))
            if take == n:
                self._pending_stats.pop(0)
            else:
                rest = [None if a is None else a[take:] for a in stats]
                self._pending_stats[0] = (n - take, rest)
            positions -= take
        return out

    def _write_shard(self, data: EncodedRows) -> None:
        path = shard_name(len(self._shards), self._prefix, self.header.backend)
        files = self._backend.serialize(data, self._specs, self.header.compression_level)
        records = tuple(
            FileRecord(
                path=f"{path}/{k}" if k else path,
                bytes=len(v),
                sha256=_sha256(v),
                crc32c=crc32c(v),
            )
            for k, v in files.items()
        )
        if self._backend.single_file:
            self.loc.write_atomic(path, files[""])
        else:
            self.loc.write_tree_atomic(path, files)
        entries = (
            int(data.encoded[self._count_array].astype(np.int64).sum()) if self._count_array else 0
        )
        positions = int(data.loss_mask.astype(np.int64).sum())
        self._shards.append(
            ShardRecord(
                path=path,
                rows=data.num_rows,
                positions=positions,
                entries=entries,
                files=records,
                coverage=self._take_coverage(positions),
            )
        )
        self._save_progress()

    # -- progress and resume ---------------------------------------------------------------

    def _save_progress(self) -> None:
        self._lock.check()
        record = {
            "header": self.header.fingerprint_dict(),
            "shard_bytes": self.shard_bytes,
            "shards": [s.to_dict() for s in self._shards],
        }
        self.loc.write_atomic(self._progress, json.dumps(record).encode())

    def _remove_temporaries(self) -> None:
        """Leftovers of this writer's interrupted atomic writes: shards and progress records."""
        self.loc.remove_temporaries("shards", self._prefix)
        self.loc.remove_temporaries(PROGRESS_DIR, self._progress.rsplit("/", 1)[1])

    def _resume(self) -> int:
        self._remove_temporaries()
        if not self.loc.exists(self._progress):
            return 0
        try:
            record = json.loads(self.loc.read_bytes(self._progress))
            shards = [ShardRecord.from_dict(s) for s in record["shards"]]
        except (ValueError, KeyError, TypeError, LogitCacheError) as e:
            raise CacheIncompleteError(
                f"cannot resume {self.loc.url}: its progress record {self._progress} is "
                f"unreadable ({e}); start again with --overwrite"
            ) from e
        changed = first_difference(record["header"], self.header.fingerprint_dict())
        if changed is not None:
            path, theirs, ours = changed
            raise ConfigError(
                f"cannot resume {self.loc.url}: {path.split('.')[0]} changed ({path}: cache has "
                f"{theirs!r}, this run has {ours!r}); rerun with the original settings, or start "
                "again with --overwrite"
            )
        if record.get("shard_bytes") != self.shard_bytes:
            raise ConfigError(
                f"cannot resume {self.loc.url}: shard_bytes changed "
                f"({record.get('shard_bytes')} -> {self.shard_bytes})"
            )
        for s in shards:
            for f in s.files:
                if not self.loc.exists(f.path) or self.loc.size(f.path) != f.bytes:
                    raise CacheIncompleteError(
                        f"cannot resume {self.loc.url}: committed shard file {f.path} is missing "
                        "or has the wrong size; start again with --overwrite"
                    )
        # a shard renamed into place after the last progress record is redone
        self.loc.remove(shard_name(len(shards), self._prefix, self.header.backend))
        self._shards = shards
        return sum(s.rows for s in shards)

    # -- commit ------------------------------------------------------------------------------

    def commit(self, extra: Mapping[str, Any] | None = None) -> Manifest:
        """Flush the last shard and write the manifest (or this part's completion marker).
        ``extra``: entries measured while writing (a transform's statistics), merged into the
        header's ``extra``; like all of ``extra``, outside the content digest."""
        if self._closed:
            raise WriterError("commit() called twice")
        if self._buffer:
            self._flush_one(final=True)
        self._save_progress()
        manifest = self.header.manifest(self._shards, _coverage_of(self._shards))
        if extra:
            manifest = manifest.derive(extra={**manifest.extra, **extra})
        if self._tokenizer_records:
            tok = replace(manifest.tokenizer, files=self._tokenizer_records)
            manifest = manifest.derive(tokenizer=tok)
            datas = self._tokenizer_files.values()
            for f, data in zip(self._tokenizer_records, datas, strict=True):
                self._lock.check()
                self.loc.write_atomic(f.path, data)
        self._lock.check()
        if self.part is None:
            self.loc.write_atomic(MANIFEST_NAME, manifest.to_json().encode())
        else:
            self.loc.write_atomic(
                f"{PARTS_DIR}/{self.part}.json",
                json.dumps({"manifest": manifest.to_dict()}).encode(),
            )
        self._closed = True
        self._lock.release()
        return manifest

    def abort(self) -> None:
        """Drop buffered rows; committed shards stay for resume; no manifest is written."""
        self._buffer = []
        self._closed = True
        try:
            self._remove_temporaries()
        finally:
            self._lock.release()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if et is None:
            if not self._closed:
                self.commit()
            return
        self.abort()
        msg = (
            f"cache {self.loc.url} was NOT committed (no manifest written); "
            f"{sum(s.rows for s in self._shards)} rows in committed shards are kept for --resume"
        )
        log.warning(msg)
        if ev is not None:
            ev.add_note(msg)


def check_output(
    url: str,
    *,
    overwrite: bool = False,
    resume: bool = False,
    clear: bool = False,
    part: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    break_lock: bool = False,
    force_overwrite_non_cache: bool = False,
    shard_bytes: int | None = None,
) -> None:
    """Refuse ``url`` as a new cache's output the way :class:`CacheWriter` would, before any
    work is done (see :func:`_refuse_output`; ``shard_bytes``, when given, is checked too); a
    live writer's lock refuses it too (``break_lock`` removes the lock). With ``overwrite`` and
    ``clear`` the old contents are removed (one process of a multi-writer dump does this, then
    the writers start)."""
    if shard_bytes is not None:
        check_shard_bytes(shard_bytes)
    loc = open_location(url, storage_options)
    _refuse_output(
        loc,
        overwrite=overwrite,
        resume=resume,
        part=part,
        force_overwrite_non_cache=force_overwrite_non_cache,
    )
    WriterLock(loc, part or "main").ensure_free(break_lock)
    if overwrite and clear:
        _clear_output(loc)


def check_shard_bytes(shard_bytes: int) -> None:
    """Refuse a shard size outside [1 B, 1 GiB] (a shard of one row per file is what a size
    below 1 would otherwise give)."""
    if not isinstance(shard_bytes, int) or not 1 <= shard_bytes <= _MAX_SHARD_BYTES:
        raise ConfigError(
            f"shard_bytes must be in [1, {_MAX_SHARD_BYTES}] bytes (--shard-mb above 0 and at "
            f"most 1024), got {shard_bytes!r}"
        )


def _coverage_of(shards: Sequence[ShardRecord]) -> Coverage:
    """The manifest's coverage: the sum of the shards' own (a shard resumed from a writer older
    than format 1.2 has none and counts its positions only)."""
    total = CoverageSums()
    for s in shards:
        total = total + (s.coverage or CoverageSums(positions=s.positions))
    return total.coverage()


def _row_bytes(data: EncodedRows, specs: Sequence[Any], count_array: str | None) -> np.ndarray:
    """Raw bytes each row contributes (row arrays + its positions + its entries)."""
    fixed = data.row_id.itemsize + data.input_ids[:1].nbytes + data.loss_mask[:1].nbytes
    per_pos = sum(
        int(np.prod(s.inner_shape, dtype=np.int64)) * np.dtype(s.dtype).itemsize
        for s in specs
        if s.level == "position"
    )
    positions = data.loss_mask.astype(np.int64).sum(axis=1)
    out = fixed + positions * per_pos
    if count_array is not None:
        per_entry = sum(np.dtype(s.dtype).itemsize for s in specs if s.level == "entry")
        pos_off = row_position_offsets(data.loss_mask)
        ent = np.concatenate([[0], np.cumsum(data.encoded[count_array].astype(np.int64))])
        out = out + (ent[pos_off[1:]] - ent[pos_off[:-1]]) * per_entry
    return np.asarray(out, dtype=np.int64)
