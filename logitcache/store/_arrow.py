"""Arrow IPC shards: one ``.arrow`` file per shard, one record per row.

Schema: ``row_id`` int64; ``input_ids`` fixed_size_list<int32>[S]; ``loss_mask``
fixed_size_list<uint8>[S]; and for each codec array a column ``targets/<name>`` of
``list<T>`` holding that row's items flattened (position-level arrays: the row's positions whose
loss_mask is 1, times the inner shape; entry-level arrays: the row's entries). Buffers are
zstd-compressed by the IPC writer; record batches hold about 4 MiB of raw data. The file opens
with ``pyarrow.ipc.open_file``, Hugging Face ``datasets`` (arrow) and Polars.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pyarrow as pa

from logitcache.errors import CacheCorruptError
from logitcache.format.codec import ArraySpec
from logitcache.store.base import TARGETS_GROUP, EncodedRows, ShardBackend, decoding

__all__ = ["ArrowBackend"]

_BATCH_BYTES = 4 << 20


def _column_name(spec: ArraySpec) -> str:
    return f"{TARGETS_GROUP}/{spec.name}"


def _row_offsets(data: EncodedRows, spec: ArraySpec, entry_counts: np.ndarray | None) -> np.ndarray:
    """Start of each row's items in the flat array of ``spec`` (length R + 1, int64)."""
    per_row_pos = data.loss_mask.astype(np.int64).sum(axis=1)
    pos_off = np.zeros(data.num_rows + 1, dtype=np.int64)
    np.cumsum(per_row_pos, out=pos_off[1:])
    if spec.level == "position":
        return pos_off * int(np.prod(spec.inner_shape, dtype=np.int64))
    if entry_counts is None:
        raise ValueError(f"entry-level array {spec.name} without an entry-count array")
    ent = np.zeros(entry_counts.shape[0] + 1, dtype=np.int64)
    np.cumsum(entry_counts, out=ent[1:])
    return ent[pos_off]


class ArrowBackend(ShardBackend):
    name = "arrow"
    single_file = True

    def __init__(self, entry_count_array: str | None = None) -> None:
        self.entry_count_array = entry_count_array

    def serialize(
        self, data: EncodedRows, specs: tuple[ArraySpec, ...], compression_level: int
    ) -> dict[str, bytes]:
        r = data.num_rows
        seq_len = int(data.input_ids.shape[1]) if data.input_ids.ndim == 2 else 0
        counts = data.encoded.get(self.entry_count_array) if self.entry_count_array else None
        cols: dict[str, pa.Array] = {
            "row_id": pa.array(np.asarray(data.row_id, np.int64)),
            "input_ids": pa.FixedSizeListArray.from_arrays(
                pa.array(np.asarray(data.input_ids, np.int32).reshape(-1)), seq_len
            ),
            "loss_mask": pa.FixedSizeListArray.from_arrays(
                pa.array(np.asarray(data.loss_mask, np.uint8).reshape(-1)), seq_len
            ),
        }
        for spec in specs:
            flat = np.ascontiguousarray(data.encoded[spec.name], dtype=spec.dtype).reshape(-1)
            off = _row_offsets(data, spec, counts)
            cols[_column_name(spec)] = pa.ListArray.from_arrays(
                pa.array(off.astype(np.int32)), pa.array(flat)
            )
        table = pa.table(cols)
        raw = max(1, table.nbytes)
        rows_per_batch = max(1, int(r * _BATCH_BYTES / raw)) if r else 1
        sink = pa.BufferOutputStream()
        opts = pa.ipc.IpcWriteOptions(compression=pa.Codec("zstd", compression_level))
        with pa.ipc.new_file(sink, table.schema, options=opts) as writer:
            writer.write_table(table, max_chunksize=rows_per_batch)
        return {"": sink.getvalue().to_pybytes()}

    def deserialize(
        self, files: Mapping[str, bytes], specs: tuple[ArraySpec, ...], seq_len: int
    ) -> EncodedRows:
        with decoding("arrow file", (pa.ArrowException,)):
            table = pa.ipc.open_file(pa.BufferReader(files[""])).read_all()
        _check_schema(table.schema, specs, seq_len)
        r = table.num_rows

        def flat(name: str) -> np.ndarray:
            col = table.column(name)
            if col.null_count:
                raise CacheCorruptError(f"column {name} holds {col.null_count} nulls")
            with decoding(f"column {name}", (pa.ArrowException,)):
                return np.asarray(col.combine_chunks().flatten().to_numpy(zero_copy_only=False))

        targets: dict[str, np.ndarray] = {}
        for spec in specs:
            arr = flat(_column_name(spec))
            per_item = int(np.prod(spec.inner_shape, dtype=np.int64))
            if arr.size % max(per_item, 1):
                raise CacheCorruptError(
                    f"column {_column_name(spec)} holds {arr.size} values, not a multiple of "
                    f"{per_item}"
                )
            targets[spec.name] = arr.reshape(-1, *spec.inner_shape)
        with decoding("column row_id", (pa.ArrowException,)):
            row_id = np.asarray(table.column("row_id").to_numpy(), dtype=np.int64)
        return EncodedRows(
            row_id=row_id,
            input_ids=flat("input_ids").reshape(r, seq_len),
            loss_mask=flat("loss_mask").reshape(r, seq_len),
            encoded=targets,
        )


def _schema(specs: tuple[ArraySpec, ...], seq_len: int) -> pa.Schema:
    """The schema :meth:`ArrowBackend.serialize` writes."""
    return pa.schema(
        [
            ("row_id", pa.int64()),
            ("input_ids", pa.list_(pa.int32(), seq_len)),
            ("loss_mask", pa.list_(pa.uint8(), seq_len)),
            *((_column_name(s), pa.list_(pa.from_numpy_dtype(np.dtype(s.dtype)))) for s in specs),
        ]
    )


def _check_schema(schema: pa.Schema, specs: tuple[ArraySpec, ...], seq_len: int) -> None:
    """Every column we read must be there with the type we write (names and types only: a
    file with more columns, or other metadata, still reads)."""
    for want in _schema(specs, seq_len):
        i = schema.get_field_index(want.name)
        if i < 0:
            raise CacheCorruptError(f"column {want.name} is missing")
        got = schema.field(i).type
        if not got.equals(want.type):
            raise CacheCorruptError(f"column {want.name} has type {got}, expected {want.type}")
