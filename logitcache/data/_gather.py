"""Gathering a batch's rows, positions and entries out of loaded shards, without per-row loops.

A batch names rows by (shard, row within shard); the rows of one shard are gathered with one fancy
index per array, whatever the number of rows. Position-level arrays follow the rows: row ``r`` of a
shard owns positions ``pos_off[r]:pos_off[r + 1]``, so the positions of many rows are a *ragged
arange*, built in one vectorised step (``np.repeat`` of the run starts plus one ``arange``). The
output keeps the batch's row order (the sampler's order): each shard group scatters into its
rows' slots, so there is no second copy to restore the order.

Only positions the collate keeps (``keep``: stored, selected, not padding) are gathered; dropped
ones never leave the shard arrays.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from logitcache.store.base import EncodedRows, row_position_offsets

__all__ = [
    "ShardView",
    "batch_order_sources",
    "gather_positions",
    "gather_rows",
    "ragged_arange",
]

#: up to this many rows of one shard, positions are copied row by row as contiguous slices
_SLICE_ROWS = 64


@dataclass(frozen=True, eq=False)
class ShardView:
    """A loaded shard plus the offsets that index it; built once per shard and shared."""

    index: int
    data: EncodedRows
    pos_off: np.ndarray
    ent_off: np.ndarray | None

    @classmethod
    def build(cls, index: int, data: EncodedRows, entry_count_array: str | None) -> ShardView:
        ent_off = None
        if entry_count_array is not None:
            counts = data.encoded[entry_count_array]
            ent_off = np.zeros(counts.shape[0] + 1, dtype=np.int64)
            np.cumsum(counts, out=ent_off[1:])
        return cls(index, data, row_position_offsets(data.loss_mask), ent_off)


def ragged_arange(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``concat([arange(s, s + c) for s, c in zip(starts, counts)])`` as int64, vectorised."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    run_start = np.cumsum(counts) - counts
    shift = np.repeat(np.asarray(starts, dtype=np.int64) - run_start, counts)
    return shift + np.arange(total, dtype=np.int64)


def gather_rows(
    views: Mapping[int, ShardView], shard: np.ndarray, local: np.ndarray, seq_len: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(row_id [B], input_ids [B, S] int64, loss_mask [B, S] bool)``, in batch order."""
    b = len(shard)
    row_id = np.empty(b, dtype=np.int64)
    input_ids = np.empty((b, seq_len), dtype=np.int64)
    loss_mask = np.empty((b, seq_len), dtype=bool)
    for s in np.unique(shard).tolist():
        sel = np.flatnonzero(shard == s)
        data = views[s].data
        rows = local[sel]
        row_id[sel] = data.row_id[rows]
        input_ids[sel] = data.input_ids[rows]
        loss_mask[sel] = data.loss_mask[rows] != 0
    return row_id, input_ids, loss_mask


def gather_positions(
    views: Mapping[int, ShardView],
    shard: np.ndarray,
    local: np.ndarray,
    stored: np.ndarray,
    keep: np.ndarray,
    arrays: tuple[str, ...],
    out: Mapping[str, np.ndarray] | None = None,
) -> tuple[dict[str, np.ndarray], dict[int, np.ndarray]]:
    """Position-level ``arrays`` at the kept positions, flattened in batch row-major order.

    ``stored`` [B, S]: the rows' loss masks (where positions exist); ``keep`` [B, S]: the subset to
    gather. ``out`` (optional): arrays of ``keep.sum()`` items to write into (e.g. views of a
    shared batch buffer) instead of new ones. Returns the arrays and, per shard, the source
    position indices (entry-level gathers reuse them).
    """
    b = len(shard)
    kept_per_row = keep.sum(axis=1)
    dst_off = np.zeros(b + 1, dtype=np.int64)
    np.cumsum(kept_per_row, out=dst_off[1:])
    n = int(dst_off[-1])
    first = views[int(shard[0])].data.encoded if b else {}
    dst_arrays = {
        name: np.empty((n, *first[name].shape[1:]), dtype=first[name].dtype)
        if out is None
        else out[name]
        for name in arrays
    }
    sources: dict[int, np.ndarray] = {}
    for s in np.unique(shard).tolist():
        sel = np.flatnonzero(shard == s)
        view = views[s]
        rows = local[sel]
        starts = view.pos_off[rows]
        ends = view.pos_off[rows + 1]
        src = ragged_arange(starts, ends - starts)
        whole_rows = bool(np.array_equal(keep[sel], stored[sel]))
        if not whole_rows:  # which of the rows' stored positions are kept, row-major
            src = src[keep[sel][stored[sel]]]
        sources[s] = src
        if whole_rows and len(sel) <= _SLICE_ROWS:
            # each row's positions are one contiguous run: memcpy slices beat a fancy gather
            for name in arrays:
                arr, dst = view.data.encoded[name], dst_arrays[name]
                for r0, r1, d0 in zip(
                    starts.tolist(), ends.tolist(), dst_off[sel].tolist(), strict=True
                ):
                    dst[d0 : d0 + r1 - r0] = arr[r0:r1]
            continue
        whole = len(sel) == b
        dst_idx = None if whole else ragged_arange(dst_off[sel], kept_per_row[sel])
        for name in arrays:
            arr = view.data.encoded[name]
            if whole:
                np.take(arr, src, axis=0, out=dst_arrays[name])
            else:
                dst_arrays[name][dst_idx] = np.take(arr, src, axis=0)
    return dst_arrays, sources


def batch_order_sources(
    shard: np.ndarray, keep: np.ndarray, sources: Mapping[int, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """``(shard of each kept position, source position)`` in batch row-major order."""
    kept_per_row = keep.sum(axis=1)
    pos_shard = np.repeat(shard, kept_per_row)
    src = np.empty(pos_shard.shape[0], dtype=np.int64)
    for s, idx in sources.items():
        src[pos_shard == s] = idx
    return pos_shard, src
