"""``logitcache export``: a cache as plain Parquet list columns, for tools that read only those.

Two layouts, both one record per cache row, every per-position column holding one entry per
token position ``t`` of the row (the teacher's prediction of token ``t + 1``):

- ``plain``: ``input_ids`` list<int32> [S]; ``target_token_ids`` list<list<int32>> and
  ``target_logprobs`` list<list<float32>>, the stored entries of each position ordered by
  decreasing log-prob (an empty list where the position has no target); ``target_mask``
  list<uint8> [S]; ``tail_logprob`` list<float32> [S], the log mass outside the stored ids
  (0.0 where there is no target; the column is absent when the cache's tail is unknown);
  ``row_id`` int64. ``logitcache import --layout plain`` reads it back exactly (up to the
  codec's quantisation, which export decodes).
- ``axolotl``: the columns Axolotl's KD trainer reads: ``input_ids``, ``target_token_ids`` and
  ``target_logprobs`` dense [S][k] (positions without a target hold id 0 and log-prob -inf),
  ``target_mask`` [S][k] 0/1, plus ``row_id``.

Values are log-probs at temperature 1 over the teacher's whole vocabulary, as stored. Files are
``part-NNNNN.parquet`` with row groups of about 32 MiB in memory (the Hub's viewer and
``datasets`` streaming read a row group at a time; the viewer recommends 100-300 MB and refuses
row groups above ~286 MiB), zstd at level 1: what Arrow writes by default for ``zstd``, and what
the Hub's readers (pyarrow, DuckDB) decode. Measured on the ``scripts/bench_interop.py`` export
(100k positions, k=64, one core): the writer's CPU time is the same uncompressed, snappy or zstd
1 (~0.22 s; encoding the nested lists costs it, not compressing), and zstd 1 writes 172 bytes
per position against snappy's 192 and none's 210; zstd 3 saves 6% more for ~20% more writer
time. Plain encoding (no dictionary: the log-probs are continuous and the ids ~all distinct, so
Arrow's dictionary attempt falls back after paying for it) and min/max statistics for ``row_id``
only (the column a reader filters on): the writer 16% faster (0.36 -> 0.30 s), 0.2% larger.
Each file's key-value metadata holds ``logitcache.cache``,
the cache's identity (teacher, tokenizer, dataset, targets, codec, content digest) as JSON, and a
``README.md`` dataset card says the same for people. Files are written under temporary names and
renamed; the card is written last.

Sampled caches are refused: these layouts hold top-k entries with log-probs, and sampled targets
(ids with draw counts) would be misread as a truncated distribution by every tool that reads them.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from logitcache.errors import ConfigError
from logitcache.format.targets import TopKTargets
from logitcache.store import CacheReader

__all__ = ["EXPORT_LAYOUTS", "ExportResult", "export_cache"]

EXPORT_LAYOUTS = ("plain", "axolotl")
_ROW_GROUP_BYTES = 32 << 20
_FILE_BYTES = 512 << 20
_ZSTD_LEVEL = 1  # Arrow's default for zstd (see the module docstring)
_SORT_POSITIONS = 2048  # positions per block of _most_likely_first (1024-2048 measured best)


@dataclass(frozen=True)
class ExportResult:
    files: int
    rows: int
    positions: int
    bytes: int
    seconds: float


def export_cache(
    cache: str,
    out: str,
    layout: Literal["plain", "axolotl"] = "plain",
    storage_options: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Write the rows of ``cache`` as Parquet files under the local directory ``out``."""
    if layout not in EXPORT_LAYOUTS:
        raise ConfigError(f"--layout must be one of {EXPORT_LAYOUTS}, got {layout!r}")
    reader = CacheReader(cache, storage_options=storage_options)
    m = reader.manifest
    if m.targets.method != "topk":
        raise ConfigError(
            f"cache {cache} holds sampled targets (ids with draw counts); the export layouts hold "
            "top-k log-probs and would misread them. Export a top-k cache, or read this one "
            "with logitcache's loader"
        )
    if os.path.exists(out) and os.listdir(out) and not overwrite:
        raise ConfigError(f"{out} is not empty; choose another --out or pass --overwrite")
    os.makedirs(out, exist_ok=True)
    identity = {
        "content_digest": m.content_digest,
        "teacher": m.teacher.to_dict(),
        "tokenizer": m.tokenizer.to_dict(),
        "dataset": m.dataset.to_dict(),
        "targets": m.targets.to_dict(),
        "codec": m.codec.to_dict(),
        "vocab_size": m.vocab_size,
        "seq_len": m.seq_len,
        "layout": layout,
    }
    row_bytes = m.seq_len * (m.targets.k or 1) * 8 + m.seq_len * 16
    group_rows = max(1, _ROW_GROUP_BYTES // row_bytes)
    file_rows = max(group_rows, _FILE_BYTES // row_bytes)
    start = time.perf_counter()
    files = rows = positions = total_bytes = 0
    writer: Any = None
    path = ""
    tail_known = m.targets.tail == "bucket"
    try:
        for batch in reader.iter_rows(batch_rows=group_rows):
            if writer is None or rows >= (files * file_rows):
                if writer is not None:
                    total_bytes += _close(writer, path)
                path = os.path.join(out, f"part-{files:05d}.parquet")
                writer = None
                files += 1
            targets = batch.targets
            if not isinstance(targets, TopKTargets):
                raise ConfigError(f"cache {cache}: expected top-k targets")
            table = _table(batch.row_id, batch.input_ids, batch.loss_mask, targets, layout,
                           tail_known)  # fmt: skip
            if writer is None:
                import pyarrow.parquet as pq

                meta = {b"logitcache.cache": json.dumps(identity).encode()}
                schema = table.schema.with_metadata(meta)
                writer = pq.ParquetWriter(
                    path + ".tmp",
                    schema,
                    compression="zstd",
                    compression_level=_ZSTD_LEVEL,
                    use_dictionary=False,
                    write_statistics=["row_id"],
                )
            writer.write_table(table.replace_schema_metadata(writer.schema.metadata))
            rows += batch.num_rows
            positions += targets.num_positions
        if writer is not None:
            total_bytes += _close(writer, path)
            writer = None
    finally:
        if writer is not None:
            writer.close()
    _card(out, cache, identity, rows, positions, files)
    return ExportResult(files, rows, positions, total_bytes, time.perf_counter() - start)


def _close(writer: Any, path: str) -> int:
    writer.close()
    os.replace(path + ".tmp", path)
    return os.path.getsize(path)


def _table(
    row_id: np.ndarray,
    input_ids: np.ndarray,
    loss_mask: np.ndarray,
    t: TopKTargets,
    layout: str,
    tail_known: bool,
) -> Any:
    b, s = input_ids.shape
    k = t.k
    ids, lps = _most_likely_first(t.ids, t.logprobs)
    mask = loss_mask.astype(bool)
    cols: dict[str, Any] = {"row_id": pa.array(row_id.astype(np.int64))}
    cols["input_ids"] = pa.ListArray.from_arrays(
        _offsets(b, s), pa.array(input_ids.reshape(-1).astype(np.int32, copy=False))
    )
    if layout == "axolotl":
        dense_ids = np.zeros((b, s, k), dtype=np.int32)
        dense_lp = np.full((b, s, k), -np.inf, dtype=np.float32)
        entry_mask = np.zeros((b, s, k), dtype=np.int32)
        dense_ids[mask] = ids
        dense_lp[mask] = lps
        entry_mask[mask] = np.isfinite(lps)
        for name, arr in (("target_token_ids", dense_ids), ("target_logprobs", dense_lp),
                          ("target_mask", entry_mask)):  # fmt: skip
            inner = pa.ListArray.from_arrays(_offsets(b * s, k), pa.array(arr.reshape(-1)))
            cols[name] = pa.ListArray.from_arrays(_offsets(b, s), inner)
        return pa.table(cols)
    width = np.where(mask.reshape(-1), k, 0)
    inner_off = np.concatenate([[0], np.cumsum(width)]).astype(np.int32)
    cols["target_token_ids"] = pa.ListArray.from_arrays(
        _offsets(b, s), pa.ListArray.from_arrays(inner_off, pa.array(ids.reshape(-1)))
    )
    cols["target_logprobs"] = pa.ListArray.from_arrays(
        _offsets(b, s), pa.ListArray.from_arrays(inner_off, pa.array(lps.reshape(-1)))
    )
    cols["target_mask"] = pa.ListArray.from_arrays(
        _offsets(b, s), pa.array(mask.reshape(-1).astype(np.uint8))
    )
    if tail_known:
        tail = np.zeros((b, s), dtype=np.float32)
        tail[mask] = t.tail_logprob
        cols["tail_logprob"] = pa.ListArray.from_arrays(_offsets(b, s), pa.array(tail.reshape(-1)))
    return pa.table(cols)


def _most_likely_first(ids: np.ndarray, logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each position's entries by decreasing log-prob, ties by increasing id: ids int32 and
    log-probs float32 [P, k], bit for bit what a stable argsort of ``-logprobs`` gives over
    entries decoded in id order (the codec decodes them so). Computed as one SIMD sort of
    uint64 keys ``d(lp) << 32 | id``, ``d`` a bijection of float32 bits onto uint32 that grows
    as the log-prob falls, and read back from the sorted keys: no argsort, no gathers (they
    were ~30% of an export). The one order it does not reproduce, ``+0.0`` before ``-0.0`` in
    one position, would need two entries of probability one. Ids that do not come ascending
    take a gather. Runs over blocks of ``_SORT_POSITIONS`` positions, which stay in cache."""
    ids = np.asarray(ids, dtype=np.int32)
    logprobs = np.asarray(logprobs, dtype=np.float32)
    out_ids = np.empty(ids.shape, dtype=np.int32)
    out_lps = np.empty(ids.shape, dtype=np.float32)
    for lo in range(0, ids.shape[0], _SORT_POSITIONS):
        hi = lo + _SORT_POSITIONS
        out_ids[lo:hi], out_lps[lo:hi] = _sorted_block(ids[lo:hi], logprobs[lo:hi])
    return out_ids, out_lps


def _descending_key(bits: np.ndarray) -> np.ndarray:
    """float32 bits (int32) -> ``d`` (int32 bits, in place): negative floats keep theirs (a
    larger magnitude is a larger unsigned key), the others are flipped below them. Its own
    inverse."""
    flip = bits >> 31  # -1 for negative floats, 0 for the others
    np.invert(flip, out=flip)
    flip &= 0x7FFFFFFF
    bits ^= flip
    return bits


def _sorted_block(ids: np.ndarray, logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    key = _descending_key(logprobs.view(np.int32).copy()).view(np.uint32).astype(np.uint64)
    key <<= np.uint64(32)
    ascending = ids.shape[1] < 2 or bool((ids[:, 1:] >= ids[:, :-1]).all())
    if ascending:  # ids are non-negative int32
        key |= np.ascontiguousarray(ids).view(np.uint32)
    else:
        key |= np.arange(ids.shape[1], dtype=np.uint64)
    key.sort(axis=1)
    low = key.astype(np.uint32)  # the cast keeps the low 32 bits
    out_ids = low.view(np.int32) if ascending else np.take_along_axis(ids, low.astype(np.intp), 1)
    key >>= np.uint64(32)
    lps = _descending_key(key.astype(np.uint32).view(np.int32)).view(np.float32)
    return out_ids, lps


def _offsets(n: int, width: int) -> Any:
    return pa.array(np.arange(n + 1, dtype=np.int32) * width)


def _card(
    out: str, cache: str, identity: dict[str, Any], rows: int, positions: int, files: int
) -> None:
    t = identity["targets"]
    text = f"""---
tags: [knowledge-distillation, logits, logitcache]
---
# Teacher targets exported from a logitcache cache

- source cache: `{cache}` (content digest `{identity["content_digest"]}`)
- teacher: `{identity["teacher"].get("name")}` (weights sha256
  `{identity["teacher"].get("weights_sha256")}`)
- tokenizer: `{identity["tokenizer"].get("name")}` (fingerprint
  `{identity["tokenizer"].get("fingerprint")}`)
- targets: top-{t.get("k")} log-probs at temperature 1 over a vocabulary of
  {identity["vocab_size"]} ids, tail mass {"kept" if t.get("tail") == "bucket" else "unknown"}
- layout: `{identity["layout"]}` ({rows:,} rows, {positions:,} target positions, {files} files);
  columns are described in logitcache's docs/interop.md

The values at position t are the teacher's log-probs for token t + 1. `logitcache import
--layout {identity["layout"]}` turns these files back into a cache.
"""
    tmp = os.path.join(out, "README.md.tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(out, "README.md"))
