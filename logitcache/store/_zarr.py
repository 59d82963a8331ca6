"""Zarr v3 shards: a group per shard, each array one sharding-codec object.

Layout of ``shards/NNNNN.zarr/``: ``zarr.json`` (group), ``row_id/``, ``input_ids/``,
``loss_mask/`` and ``targets/<name>/`` arrays. Every array is chunked along its first axis into
inner chunks of about 1 MiB (zstd with frame checksums, level from the manifest) and all inner
chunks live in a single shard object ``c/0[/0...]``: a cache shard is a few dozen files, not
thousands, while a plain zarr reader can still fetch a single inner chunk. The shard is built in
a zarr ``MemoryStore`` and written out by the caller, so checksums cover exactly the stored
bytes.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import zarr
from zarr.codecs import ZstdCodec
from zarr.core.buffer import Buffer
from zarr.core.buffer.cpu import Buffer as CpuBuffer
from zarr.storage import MemoryStore

from logitcache.format.codec import ArraySpec
from logitcache.store.base import TARGETS_GROUP, ShardBackend, ShardData

__all__ = ["ZarrBackend"]

_CHUNK_BYTES = 1 << 20


def _write_array(group: zarr.Group, name: str, arr: np.ndarray, level: int) -> None:
    row_bytes = max(1, int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize)
    chunk0 = max(1, _CHUNK_BYTES // row_bytes)
    n = arr.shape[0]
    chunks = (chunk0, *arr.shape[1:])
    # the outer shard must be a multiple of the inner chunk and cover the whole array
    shard0 = max(chunk0, -(-n // chunk0) * chunk0)
    z = group.create_array(
        name,
        shape=arr.shape,
        dtype=arr.dtype,
        chunks=tuple(max(1, c) for c in chunks),
        shards=(shard0, *(max(1, c) for c in arr.shape[1:])),
        compressors=ZstdCodec(level=level, checksum=True),
        fill_value=0,
    )
    if arr.size:
        z[...] = arr


class ZarrBackend(ShardBackend):
    name = "zarr"
    single_file = False

    def serialize(
        self, data: ShardData, specs: tuple[ArraySpec, ...], compression_level: int
    ) -> dict[str, bytes]:
        store_dict: dict[str, Buffer] = {}
        root = zarr.open_group(MemoryStore(store_dict), mode="w", zarr_format=3)
        root.attrs["logitcache"] = {"rows": data.num_rows}
        _write_array(root, "row_id", np.ascontiguousarray(data.row_id, np.int64), compression_level)
        _write_array(
            root, "input_ids", np.ascontiguousarray(data.input_ids, np.int32), compression_level
        )
        _write_array(
            root, "loss_mask", np.ascontiguousarray(data.loss_mask, np.uint8), compression_level
        )
        tg = root.create_group(TARGETS_GROUP)
        for spec in specs:
            arr = np.ascontiguousarray(data.targets[spec.name], dtype=spec.dtype)
            _write_array(tg, spec.name, arr, compression_level)
        return {k: v.to_bytes() for k, v in sorted(store_dict.items())}

    def deserialize(
        self, files: Mapping[str, bytes], specs: tuple[ArraySpec, ...], seq_len: int
    ) -> ShardData:
        store_dict: dict[str, Buffer] = {k: CpuBuffer.from_bytes(v) for k, v in files.items()}
        root = zarr.open_group(MemoryStore(store_dict, read_only=True), mode="r", zarr_format=3)
        targets = {s.name: _read(root, f"{TARGETS_GROUP}/{s.name}") for s in specs}
        return ShardData(
            row_id=_read(root, "row_id"),
            input_ids=_read(root, "input_ids"),
            loss_mask=_read(root, "loss_mask"),
            targets=targets,
        )


def _read(root: zarr.Group, name: str) -> np.ndarray:
    arr = root[name]
    if not isinstance(arr, zarr.Array):
        raise ValueError(f"{name} is not an array")
    return np.asarray(arr[...])
