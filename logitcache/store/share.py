"""Sharing caches: copy one between stores, and merge caches dumped separately.

Both follow the writer's commit rule - shards first, ``manifest.json`` last - and take the
destination's writer lock, so a copy or merge that dies leaves an incomplete cache that readers
refuse, never a half one that reads as complete.

:func:`copy_cache` verifies every file against the source manifest's size and sha256 as it reads
it (the reader's check), and is resumable: a file already at the destination with the right size
and sha256 is skipped (it is read back to prove it, which costs a read but never trusts a
truncated upload). The manifest is copied byte for byte, so the copy has the same content digest.

:func:`merge_caches` joins caches of the same teacher, tokenizer, codec, sequence length and
vocabulary dumped over disjoint data (e.g. by different teams or jobs). Shards are copied into
the output as ``shards/m<source>-<name>``; row ids must not collide - a merge that finds a row
id in two sources is refused (re-dump one of them with row ids offset, rather than silently
remapping ids that students may use to address targets).

Besides those fields, a merge compares what each dump recorded about its targets
(``extra.dump``: recipe, teacher dtype, sampling seed and rule, teacher file...) where the
sources record it. It does not compare how a dump ran or split its rows (:data:`DUMP_RUN_FIELDS`:
``extra.dump.run`` with the tensor-parallel degree, data-parallel groups and device map, the
number of writers, the row recipe of the source's own data): a cache dumped with
``--tensor-parallel 2`` merges with one dumped by one process or with ``--device-map auto``. The
merged manifest keeps the agreed ``extra.dump`` (when every source records one) and lists each
source's own run fields under ``extra.merged_from[i].dump``.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import posixpath
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any

import numpy as np

from logitcache.errors import ConfigError, WriterError
from logitcache.format.manifest import (
    MANIFEST_NAME,
    Coverage,
    CoverageSums,
    FileRecord,
    Manifest,
    ShardRecord,
    SourceInfo,
    first_difference,
)
from logitcache.store._fs import Location, open_location
from logitcache.store._lock import WriterLock
from logitcache.store.reader import CacheReader
from logitcache.store.tokenizer import read_verified

__all__ = ["MERGE_FIELDS", "CopyReport", "copy_cache", "merge_caches"]

# Fields every source of a merge must agree on (dataset, coverage and shards may differ).
MERGE_FIELDS = (
    "backend",
    "seq_len",
    "vocab_size",
    "padded_vocab_size",
    "targets",
    "codec",
    "compression",
    "teacher",
    "tokenizer",
)
# What a dump recorded about how it ran and built its rows (``extra.dump``), not about its
# targets: free to differ between the sources of a merge (store/header.py drop_run_info: the same
# rule for a resume, where only ``run`` is free, because a resume continues the same rows).
DUMP_RUN_FIELDS = ("run", "world_size", "rank_split", "input", "special_tokens")
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class CopyReport:
    """What a copy did: files copied and skipped (already there, verified), bytes copied."""

    files_copied: int
    files_skipped: int
    bytes_copied: int
    content_digest: str


def _has_file(loc: Location, f: FileRecord) -> bool:
    """Whether ``loc`` already holds ``f`` with the right size and sha256."""
    try:
        if loc.size(f.path) != f.bytes:
            return False
        return hashlib.sha256(loc.read_bytes(f.path)).hexdigest() == f.sha256
    except FileNotFoundError:
        return False


def _refuse_committed(dst: Location, digest: str | None) -> bool:
    """True if ``dst`` already holds the cache with ``digest``; raise if it holds another."""
    if not dst.exists(MANIFEST_NAME):
        return False
    there = Manifest.from_json(dst.read_bytes(MANIFEST_NAME), where=dst.url)
    if digest is not None and there.content_digest == digest:
        return True
    raise WriterError(
        f"{dst.url} already holds a committed cache (content digest {there.content_digest}); "
        "choose another destination, or delete it first"
    )


def copy_cache(
    src: str,
    dst: str,
    *,
    src_options: Mapping[str, Any] | None = None,
    dst_options: Mapping[str, Any] | None = None,
    expect_digest: str | None = None,
    workers: int = 4,
    break_lock: bool = False,
    progress: Progress | None = None,
) -> CopyReport:
    """Copy the committed cache at ``src`` to ``dst``, verifying every file; resumable."""
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    reader = CacheReader(src, storage_options=src_options)
    raw = reader.loc.read_bytes(MANIFEST_NAME)
    m = Manifest.from_json(raw, where=f"{src}/{MANIFEST_NAME}")
    m.check_digest(expect_digest, where=src)
    if m.content_digest != reader.manifest.content_digest:
        raise WriterError(f"{src} changed while the copy started; rerun the copy")
    files: list[tuple[ShardRecord | None, FileRecord]] = [
        (rec, f) for rec in m.shards for f in rec.files
    ]
    files += [(None, f) for f in m.tokenizer.files]  # format 1.3: the tokenizer's own files
    out = open_location(dst, dst_options)
    if _refuse_committed(out, m.content_digest):
        return CopyReport(0, len(files), 0, m.content_digest)
    lock = WriterLock(out)
    lock.acquire(break_lock)
    try:

        def one(item: tuple[ShardRecord | None, FileRecord]) -> int:
            rec, f = item
            if _has_file(out, f):
                return -1
            data = read_verified(reader.loc, f) if rec is None else reader.fetch_file(rec, f)
            out.write_atomic(f.path, data)
            return f.bytes

        copied = skipped = nbytes = 0
        pool = cf.ThreadPoolExecutor(workers)
        try:
            for n in pool.map(one, files):
                if n < 0:
                    skipped += 1
                else:
                    copied += 1
                    nbytes += n
                if progress is not None:
                    progress(copied + skipped, len(files))
        except BaseException:
            # stop now (Ctrl-C, an error): files not started yet are not copied; a rerun resumes
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        lock.check()
        out.write_atomic(MANIFEST_NAME, raw)
    finally:
        lock.release()
    return CopyReport(copied, skipped, nbytes, m.content_digest)


def _dump_fields(m: Manifest) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """``extra.dump`` split into (what the targets are, how the dump ran); None if absent."""
    dump = m.extra.get("dump")
    if not isinstance(dump, Mapping):
        return None
    ident = {k: v for k, v in dump.items() if k not in DUMP_RUN_FIELDS}
    return ident, {k: v for k, v in dump.items() if k in DUMP_RUN_FIELDS}


def _check_agree(sources: Sequence[str], manifests: Sequence[Manifest]) -> None:
    dumps = [_dump_fields(m) for m in manifests]
    # extra.dump is compared with the first source that records one, where both record it
    ref = next((d[0] for d in dumps if d is not None), None)

    def fields(m: Manifest, dump: tuple[dict[str, Any], dict[str, Any]] | None) -> dict[str, Any]:
        d = m.to_dict()
        d["tokenizer"].pop("files", None)  # the fingerprint says whether tokenizers agree
        out = {k: d[k] for k in MERGE_FIELDS}
        out["extra"] = {"dump": dump[0] if dump is not None else ref}
        return out

    first = fields(manifests[0], dumps[0])
    for url, m, dump in zip(sources[1:], manifests[1:], dumps[1:], strict=True):
        changed = first_difference(first, fields(m, dump))
        if changed is not None:
            where, ours, theirs = changed
            raise ConfigError(
                f"cannot merge {url} with {sources[0]}: they differ in {where} ({ours!r} vs "
                f"{theirs!r}); only caches of the same teacher, tokenizer, codec, seq_len and "
                "vocabulary, dumped the same way (how the dump ran may differ: tensor parallel, "
                "ranks, device map), can be merged"
            )


def _coverage(manifests: Sequence[Manifest], shards: Sequence[ShardRecord]) -> Coverage:
    sums = CoverageSums.total(shards)
    if sums is not None:
        return sums.coverage()
    # a source older than format 1.2 (no per-shard sums): weight the sources' means
    total = sum(m.coverage.positions for m in manifests)

    def mean(name: str) -> float | None:
        vals = [(getattr(m.coverage, name), m.coverage.positions) for m in manifests]
        if total == 0 or any(v is None for v, _ in vals):
            return None
        return float(sum(v * n for v, n in vals) / total)

    return Coverage(positions=total, captured_mass=mean("captured_mass"), entropy=mean("entropy"))


def merge_caches(
    out: str,
    sources: Sequence[str],
    *,
    storage_options: Mapping[str, Any] | None = None,
    out_options: Mapping[str, Any] | None = None,
    break_lock: bool = False,
    progress: Progress | None = None,
) -> Manifest:
    """Join committed caches over disjoint data into a new cache at ``out``; see module doc."""
    if len(sources) < 2:
        raise ConfigError(f"merge needs at least two caches, got {len(sources)}")
    readers = [CacheReader(u, storage_options=storage_options) for u in sources]
    manifests = [r.manifest for r in readers]
    _check_agree(sources, manifests)
    dst = open_location(out, out_options if out_options is not None else storage_options)
    _refuse_committed(dst, None)
    lock = WriterLock(dst)
    lock.acquire(break_lock)
    try:
        shards: list[ShardRecord] = []
        seen: dict[int, str] = {}
        total = sum(r.num_shards for r in readers)
        for j, (url, reader) in enumerate(zip(sources, readers, strict=True)):
            for i, rec in enumerate(reader.manifest.shards):
                shards.append(_copy_shard(reader, i, rec, dst, f"m{j:03d}-", url, seen))
                if progress is not None:
                    progress(len(shards), total)
        # the tokenizer's files (format 1.3) of the first source that stores them
        j = next((j for j, m in enumerate(manifests) if m.tokenizer.files), 0)
        for f in manifests[j].tokenizer.files:
            lock.check()
            dst.write_atomic(f.path, read_verified(readers[j].loc, f))
        first = manifests[j]  # the fields all sources agree on (MERGE_FIELDS), and its files
        fingerprints = [m.dataset.fingerprint or m.content_digest for m in manifests]
        manifest = first.derive(
            shards=tuple(shards),
            coverage=_coverage(manifests, shards),
            dataset=SourceInfo(
                name="merge of "
                + ", ".join(m.dataset.name or u for m, u in zip(manifests, sources, strict=True)),
                fingerprint=hashlib.sha256(json.dumps(fingerprints).encode()).hexdigest(),
            ),
            extra=_merged_extra(sources, manifests),
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        lock.check()
        dst.write_atomic(MANIFEST_NAME, manifest.to_json().encode())
    finally:
        lock.release()
    return manifest


def _merged_extra(sources: Sequence[str], manifests: Sequence[Manifest]) -> dict[str, Any]:
    """The merged cache's ``extra``: the agreed ``extra.dump`` (if every source records one)
    and, per source, its digest, dataset and how its dump ran."""
    dumps = [_dump_fields(m) for m in manifests]
    merged_from = []
    for u, m, dump in zip(sources, manifests, dumps, strict=True):
        entry = {"url": u, "content_digest": m.content_digest, "dataset": m.dataset.to_dict()}
        if dump is not None:
            entry["dump"] = dump[1]
        merged_from.append(entry)
    extra: dict[str, Any] = {"merged_from": merged_from}
    if dumps[0] is not None and all(d is not None for d in dumps):
        extra["dump"] = dumps[0][0]  # what they agree on (_check_agree)
    return extra


def _copy_shard(
    reader: CacheReader,
    index: int,
    rec: ShardRecord,
    dst: Location,
    prefix: str,
    url: str,
    seen: dict[int, str],
) -> ShardRecord:
    """Copy one verified shard under a new name, refusing row ids seen in an earlier source."""
    files = reader.fetch_shard_files(index, verify=True)
    ids = np.asarray(reader.decode_shard_files(index, files).row_id)
    for rid in ids.tolist():
        other = seen.get(rid)
        if other is not None:
            raise ConfigError(
                f"cannot merge: row id {rid} is in both {other} and {url} (shard {rec.path}); "
                "merged caches must hold disjoint rows - re-dump one of them over other data"
            )
    seen.update(dict.fromkeys(ids.tolist(), url))
    new_path = posixpath.join(posixpath.dirname(rec.path), prefix + posixpath.basename(rec.path))
    records = []
    for f in rec.files:
        rel = f.path[len(rec.path) + 1 :] if f.path != rec.path else ""
        target = f"{new_path}/{rel}" if rel else new_path
        dst.write_atomic(target, files[rel])
        records.append(replace(f, path=target))
    return replace(rec, path=new_path, files=tuple(records))
