"""The shard backend interface and the in-memory shard it reads and writes.

A shard is a run of whole rows. Logically it holds, for ``R`` rows of ``S`` positions:

- ``row_id`` [R] int64, ``input_ids`` [R, S] int32, ``loss_mask`` [R, S] uint8 (0/1);
- the codec's arrays (``targets/<name>``): position-level ``[P, ...]`` with P = loss_mask.sum(),
  one item per position whose loss_mask is 1, in row-major order; entry-level ``[E]``.

Backends differ only in the physical layout (see ``docs/format.md``): Zarr v3 stores each array
as one sharding-codec object of zstd-compressed inner chunks; Arrow IPC stores one record per
row with each target array as a per-row list column. A backend turns an :class:`EncodedRows` into
``{relative path: bytes}`` and back, entirely in memory, so the same code path serves local
disks and object stores and checksums are computed over exactly the bytes that are written.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from logitcache.errors import CacheCorruptError
from logitcache.format.codec import ArraySpec
from logitcache.format.manifest import Backend

__all__ = [
    "ROW_ARRAYS",
    "TARGETS_GROUP",
    "EncodedRows",
    "ShardBackend",
    "concat_shards",
    "decoding",
    "row_position_offsets",
    "shard_nbytes",
    "slice_rows",
]

ROW_ARRAYS = ("row_id", "input_ids", "loss_mask")
TARGETS_GROUP = "targets"


@dataclass(frozen=True, eq=False)
class EncodedRows:
    """A run of whole rows as stored: a shard, or some of its rows.

    The row arrays and the codec's arrays (``encoded``, by array name; still in the codec's
    codes), exactly what a backend writes and reads back, with ``loss_mask`` as uint8 0/1. This
    is the storage-side twin of the reader's :class:`~logitcache.store.reader.Rows`, which adds
    the codec and decodes ``targets`` on demand: the store and the loader's gathers work on
    codes, a user reading rows wants targets.
    """

    row_id: np.ndarray
    input_ids: np.ndarray
    loss_mask: np.ndarray
    encoded: Mapping[str, np.ndarray]

    @property
    def num_rows(self) -> int:
        return int(self.row_id.shape[0])


class ShardBackend(ABC):
    """Serialise a :class:`EncodedRows` to files and back. Implementations are stateless."""

    name: ClassVar[Backend]
    #: True when a shard is one file (its path), False when it is a directory of files
    single_file: ClassVar[bool]

    @abstractmethod
    def serialize(
        self, data: EncodedRows, specs: tuple[ArraySpec, ...], compression_level: int
    ) -> dict[str, bytes]:
        """Files of the shard keyed by path relative to the shard ("" for a single-file shard)."""

    @abstractmethod
    def deserialize(
        self, files: Mapping[str, bytes], specs: tuple[ArraySpec, ...], seq_len: int
    ) -> EncodedRows:
        """Inverse of :meth:`serialize`; raises on malformed bytes (the reader names the shard)."""


@contextmanager
def decoding(what: str, errors: tuple[type[BaseException], ...]) -> Iterator[None]:
    """Turn a third-party decoder's own exceptions (``errors``: zstd's, pyarrow's, zarr's) into
    :class:`CacheCorruptError` naming ``what`` was being decoded.

    Backends wrap *only* the decoder calls with it and check everything else explicitly, so an
    exception from our own code between those calls is a bug and reaches the user with its type
    and traceback, never as "the shard is damaged: re-dump"."""
    try:
        yield
    except errors as e:
        raise CacheCorruptError(f"{what}: {type(e).__name__}: {e}") from e


def _offsets(counts: np.ndarray) -> np.ndarray:
    out = np.zeros(counts.shape[0] + 1, dtype=np.int64)
    np.cumsum(counts, out=out[1:])
    return out


def row_position_offsets(loss_mask: np.ndarray) -> np.ndarray:
    """[R + 1] int64: row r's targets are positions ``[off[r], off[r + 1])``."""
    return _offsets(loss_mask.astype(np.int64).sum(axis=1))


def slice_rows(
    data: EncodedRows,
    start: int,
    stop: int,
    specs: tuple[ArraySpec, ...],
    entry_count_array: str | None,
    pos_off: np.ndarray | None = None,
    ent_off: np.ndarray | None = None,
) -> EncodedRows:
    """Rows ``[start, stop)`` of ``data`` with exactly their positions and entries.

    ``pos_off``/``ent_off`` are the precomputed row->position and position->entry offsets
    (pass them when slicing the same shard repeatedly).
    """
    if pos_off is None:
        pos_off = row_position_offsets(data.loss_mask)
    p0, p1 = int(pos_off[start]), int(pos_off[stop])
    e0 = e1 = 0
    if entry_count_array is not None:
        if ent_off is None:
            ent_off = _offsets(data.encoded[entry_count_array].astype(np.int64))
        e0, e1 = int(ent_off[p0]), int(ent_off[p1])
    targets = {
        s.name: data.encoded[s.name][p0:p1]
        if s.level == "position"
        else data.encoded[s.name][e0:e1]
        for s in specs
    }
    return EncodedRows(
        row_id=data.row_id[start:stop],
        input_ids=data.input_ids[start:stop],
        loss_mask=data.loss_mask[start:stop],
        encoded=targets,
    )


def concat_shards(parts: list[EncodedRows], specs: tuple[ArraySpec, ...]) -> EncodedRows:
    """Concatenate runs of rows (position- and entry-level arrays simply follow their rows)."""
    return EncodedRows(
        row_id=np.concatenate([p.row_id for p in parts]),
        input_ids=np.concatenate([p.input_ids for p in parts]),
        loss_mask=np.concatenate([p.loss_mask for p in parts]),
        encoded={s.name: np.concatenate([p.encoded[s.name] for p in parts]) for s in specs},
    )


def shard_nbytes(data: EncodedRows) -> int:
    """Raw (uncompressed) bytes of a shard's arrays: what the writer's shard size bounds."""
    return int(
        data.row_id.nbytes
        + data.input_ids.nbytes
        + data.loss_mask.nbytes
        + sum(a.nbytes for a in data.encoded.values())
    )
