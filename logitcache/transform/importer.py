"""``logitcache import``: a published logit dataset (Parquet, Arrow IPC, JSONL) into a cache.

The source is streamed a record batch at a time (:mod:`._source`: Parquet rows worth ~16 MiB, by
the first row group's statistics; an IPC batch; 1024 JSON lines turned into one Arrow batch), so
memory stays bounded whatever its size; any fsspec URL works (``hf://``, ``s3://``...). Each
batch is converted column-wise in pieces of ~4 MiB of values, without a Python loop over
positions or rows: the nested list columns are flattened once through their Arrow offsets into
``[positions, k]`` arrays (a zero-copy reshape when every position holds k entries), checked,
normalised, and handed to the cache writer, whose codec then stores them in ~1.6 bytes per entry
instead of the source's 6-8.

Speed (``scripts/bench_interop.py``: 100k positions, k=64, fp32 + int32 zstd Parquet, one core;
~40k positions/s before this design at level 15, ~127k at 3; ~235k at 3 after, quiet machine).
CPU seconds per 100k positions:
reading the Parquet ~0.13 (Arrow's nested-list decoding: the floor), converting and checking
~0.06, the codec's encode ~0.07, writing the shard ~0.12 at zstd 1 (~0.19 at 3). What did it:

- pieces of ~4 MiB keep every temporary in the CPU's cache (a whole 100 MB batch at once ran
  ~2x slower, mostly page faults on fresh arrays);
- checks are whole-piece reductions (``min``/``max``); the masks naming bad rows are computed
  only when a reduction finds something; float32 values stay float32 (sums run in float64);
- one SIMD sort per position of packed ``id << 32 | value bits`` uint64 keys: the repeated-id
  check is a comparison of neighbours, and the codec, finding the ids sorted, skips its own
  stable argsort and gathers (~0.3 s alone);
- zstd ``IMPORT_COMPRESSION_LEVEL`` (3), not the dump's 15, which caps an import at ~46k
  positions/s for 5% fewer bytes; level 1 is 2% larger and ~10% faster (docs/interop.md).

Per position, what is kept (see :mod:`logitcache.transform.layouts` for what the values mean):

- the ``k`` largest values (``k`` = the widest position of the first read batch unless given). A
  position with more entries (vLLM adds the sampled token) keeps its top ``k``; with normalised
  values the dropped entries' mass joins the tail, exactly. A position with fewer is padded with
  ``-inf`` entries (zero mass, as the format defines);
- normalised sources: ``tail = log(1 - sum p)`` computed from the stored entries (or read from a
  tail column when the source has one, which is exact);
- other sources: values renormalised over the stored ids (``log_softmax``), tail ``-inf``, and
  ``targets.tail = "unknown"`` in the manifest.

Refusals name the source row (0-based, in source order) and the column: a NaN value, ids outside
the vocabulary or repeated within a position, probabilities summing above ``1 + 1e-3``, more
target positions than tokens, a row longer than ``seq_len``. ``skip_bad_rows`` counts and skips
them instead. Row ids are source row numbers, so a cache row names the record it came from.

Resume: the writer knows how many rows its committed shards hold; the import re-reads the source
from the start, skips that many *good* rows (the good/bad decision is deterministic) and carries
on, so a killed import resumed equals an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from logitcache.errors import ConfigError, InputError
from logitcache.format import TopKCodec
from logitcache.format.manifest import Backend, Manifest, SourceInfo, TargetsInfo
from logitcache.format.targets import TopKTargets
from logitcache.store import CacheHeader, CacheWriter, check_output
from logitcache.store.header import DEFAULT_SHARD_BYTES
from logitcache.store.tokenizer import tokenizer_files
from logitcache.transform._columns import Batch, convert, shape_of
from logitcache.transform._source import CONTAINERS, Read, container_of, read_batches, source_files
from logitcache.transform.layouts import LAYOUTS, Layout

__all__ = ["IMPORT_COMPRESSION_LEVEL", "ImportConfig", "ImportResult", "import_cache"]

#: zstd level of an imported cache's shards (a dump writes DEFAULT_COMPRESSION_LEVEL, 15): see
#: the module docstring for the measured trade-off
IMPORT_COMPRESSION_LEVEL = 3

_CHUNK_BYTES = 4 << 20  # one conversion step (see _converted)


@dataclass(frozen=True)
class ImportConfig:
    """Everything ``logitcache import`` takes. ``layout``: a preset name or a :class:`Layout`."""

    source: str
    out: str
    layout: str | Layout = "plain"
    vocab_size: int | None = None
    tokenizer: str | None = None
    teacher: str = "unknown"
    seq_len: int | None = None
    k: int | None = None
    input_format: str | None = None
    skip_bad_rows: bool = False
    values: str = "sqrt"
    backend: Backend = "zarr"
    shard_bytes: int = DEFAULT_SHARD_BYTES
    compression_level: int = IMPORT_COMPRESSION_LEVEL
    resume: bool = False
    overwrite: bool = False
    storage_options: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.layout, str) and self.layout not in LAYOUTS:
            raise ConfigError(
                f"unknown layout {self.layout!r}; presets: {sorted(LAYOUTS)} (or give the "
                "columns with --ids-column/--values-column)"
            )
        if self.vocab_size is None and self.tokenizer is None:
            raise ConfigError(
                "the import needs the teacher's vocabulary: --tokenizer DIR (recorded in the "
                "manifest, recommended) or --vocab-size N"
            )
        for name in ("vocab_size", "seq_len", "k"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.input_format is not None and self.input_format not in CONTAINERS.values():
            raise ConfigError(
                f"--input-format must be one of {sorted(set(CONTAINERS.values()))}, "
                f"got {self.input_format!r}"
            )

    def resolved_layout(self) -> Layout:
        return LAYOUTS[self.layout] if isinstance(self.layout, str) else self.layout


@dataclass(frozen=True)
class ImportResult:
    manifest: Manifest
    rows: int
    skipped_rows: int
    resumed_rows: int
    positions: int
    source_bytes: int
    seconds: float

    @property
    def source_bytes_per_token(self) -> float:
        return self.source_bytes / max(self.positions, 1)

    @property
    def cache_bytes_per_token(self) -> float:
        return self.manifest.num_bytes / max(self.manifest.num_positions, 1)

    def summary(self) -> str:
        return (
            f"imported {self.rows:,} rows ({self.positions:,} target positions) in "
            f"{self.seconds:.1f} s; skipped {self.skipped_rows:,} bad rows; resumed "
            f"{self.resumed_rows:,}\n"
            f"source {self.source_bytes:,} bytes ({self.source_bytes_per_token:.1f} bytes/token)"
            f" -> cache {self.manifest.num_bytes:,} bytes ({self.cache_bytes_per_token:.1f} "
            f"bytes/token, {self.manifest.num_bytes / max(self.source_bytes, 1):.2f}x); content "
            f"digest {self.manifest.content_digest}"
        )


def import_cache(
    config: ImportConfig, progress: Callable[[int], None] | None = None
) -> ImportResult:
    """Import ``config.source`` into a new cache at ``config.out``. ``progress(rows)`` is called
    after each written batch (a hook for progress lines; an exception from it aborts the import
    like a crash: committed shards stay for ``resume``)."""
    layout = config.resolved_layout()
    check_output(
        config.out,
        overwrite=config.overwrite,
        resume=config.resume,
        storage_options=config.storage_options,
    )
    files, fs = source_files(config.source, config.storage_options)
    container = config.input_format or container_of(files[0])
    vocab, tok_info, tok_files = _vocabulary(config)
    start = time.perf_counter()
    reads = read_batches(files, fs, container, layout.columns())
    first = next(reads, None)
    if first is None:
        raise InputError(f"{config.source}: no rows with targets found")
    longest, widest = shape_of(first[2], layout)
    k = config.k or max(widest, 1)
    seq_len = config.seq_len or max(longest, 1)
    batches = _converted(_chain(first, reads), layout, vocab, k, config)
    header = _header(config, layout, vocab, tok_info, files, fs, k, seq_len)
    writer = CacheWriter(
        config.out,
        header,
        shard_bytes=config.shard_bytes,
        overwrite=config.overwrite,
        resume=config.resume,
        storage_options=config.storage_options,
        tokenizer_files=tok_files,  # --tokenizer: the cache stores it (format 1.3)
    )
    rows = skipped = positions = 0
    with writer:
        to_skip = writer.resumed_rows
        for batch in batches:
            skipped += batch.bad
            if to_skip:
                drop = min(to_skip, len(batch.row_id))
                batch, to_skip = batch.drop_rows(drop), to_skip - drop
            if not len(batch.row_id):
                continue
            _write(writer, batch, k, seq_len, config.source)
            rows += len(batch.row_id)
            positions += int(batch.positions.sum())
            if progress is not None:
                progress(rows)
        manifest = writer.commit()
    return ImportResult(
        manifest=manifest,
        rows=rows,
        skipped_rows=skipped,
        resumed_rows=writer.resumed_rows,
        positions=manifest.num_positions,
        source_bytes=sum(int(fs.size(f)) for f in files),
        seconds=time.perf_counter() - start,
    )


def _chain(first: Read, rest: Iterator[Read]) -> Iterator[Read]:
    yield first
    yield from rest


# -- conversion ---------------------------------------------------------------------------------


def _converted(
    reads: Iterator[Read], layout: Layout, vocab: int, k: int, config: ImportConfig
) -> Iterator[Batch]:
    """Converted pieces of each read batch, about ``_CHUNK_BYTES`` of source values each: the
    conversion's and the codec's temporaries then stay in the CPU's cache (converting a whole
    100 MB batch at once ran ~2x slower, most of it page faults on fresh temporaries)."""
    for path, base, rb in reads:
        n = rb.num_rows
        step = max(1, int(_CHUNK_BYTES * n // max(rb.nbytes, 1)))
        for lo in range(0, n, step):
            piece = rb.slice(lo, step) if (lo or step < n) else rb
            yield convert(
                piece, base + lo, layout, vocab, k, config.seq_len, config.skip_bad_rows, path
            )


def _write(writer: CacheWriter, batch: Batch, k: int, seq_len: int, source: str) -> None:
    b = len(batch.row_id)
    long = np.nonzero(batch.lengths > seq_len)[0]
    if long.size:
        i = int(long[0])
        raise InputError(
            f"{source}: source row {int(batch.row_id[i])} has {int(batch.lengths[i])} tokens, "
            f"more than the cache's seq_len {seq_len} (taken from the first batch); pass --seq-len"
        )
    # the rows' tokens fill each row from the left: one boolean scatter, row-major
    input_ids = np.zeros((b, seq_len), dtype=np.int32)
    input_ids[np.arange(seq_len) < batch.lengths[:, None]] = batch.tokens
    mask = np.zeros((b, seq_len), dtype=np.uint8)
    mask[np.repeat(np.arange(b), batch.positions), batch.where] = 1
    targets = TopKTargets(
        ids=batch.ids,
        logprobs=batch.logprobs,
        tail_logprob=batch.tail,
        temperature_lognorm=np.zeros((len(batch.ids), 0), dtype=np.float32),
    )
    writer.write(batch.row_id, input_ids, mask, targets)


# -- identity ---------------------------------------------------------------------------------


def _vocabulary(config: ImportConfig) -> tuple[int, SourceInfo, dict[str, bytes]]:
    """Vocabulary size, tokenizer identity and the tokenizer's files (stored in the cache)."""
    if config.tokenizer is None:
        return int(config.vocab_size or 0), SourceInfo("unknown", None, None), {}
    from logitcache.format.fingerprint import tokenizer_fingerprint

    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(config.tokenizer)
    except (OSError, ValueError, ImportError) as e:
        raise ConfigError(f"--tokenizer {config.tokenizer}: cannot load it ({e})") from e
    vocab = config.vocab_size or len(tok)
    name = os.path.basename(config.tokenizer.rstrip("/")) or config.tokenizer
    return vocab, SourceInfo(name, None, tokenizer_fingerprint(tok)), tokenizer_files(tok)


def _header(
    config: ImportConfig,
    layout: Layout,
    vocab: int,
    tok_info: SourceInfo,
    files: list[str],
    fs: Any,
    k: int,
    seq_len: int,
) -> CacheHeader:
    h = hashlib.sha256()
    for f in files:
        info = fs.info(f)
        ident = info.get("ETag") or info.get("mtime") or info.get("last_modified") or ""
        h.update(f"{os.path.basename(f)}\0{info.get('size')}\0{ident}\0".encode())
    tail: Literal["bucket", "unknown"] = "bucket" if layout.tail_known else "unknown"
    return CacheHeader(
        codec=TopKCodec(k=k, vocab_size=vocab, num_temperatures=0, values=config.values),
        targets=TargetsInfo("topk", k=k, tail=tail),
        seq_len=seq_len,
        vocab_size=vocab,
        padded_vocab_size=vocab,
        backend=config.backend,
        compression_level=config.compression_level,
        teacher=SourceInfo(config.teacher, None, None),
        tokenizer=tok_info,
        dataset=SourceInfo(os.path.basename(config.source.rstrip("/")), None, h.hexdigest()),
        extra={"import": {"layout": layout.to_dict(), "files": len(files)}},
    )
