"""Zarr v3 shards: a group per shard, each array one sharding-codec object.

Layout of ``shards/NNNNN.zarr/``: ``zarr.json`` (group), ``row_id/``, ``input_ids/``,
``loss_mask/`` and ``targets/<name>/`` arrays. Every array is chunked along its first axis into
inner chunks of about 1 MiB (zstd with frame checksums, level from the manifest) and all inner
chunks live in a single shard object ``c/0[/0...]``: a cache shard is a few dozen files, not
thousands, while a plain zarr reader can still fetch a single inner chunk. The shard is built in
a zarr ``MemoryStore`` and written out by the caller, so checksums cover exactly the stored
bytes. zarr writes the metadata; the shard objects are encoded here (``_shard_object``), byte for
byte as zarr would, and read back here too (``_read_fast``): zarr's async codec pipeline costs
more than the zstd it runs. Anything not in that layout goes through zarr itself.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import zarr
from numcodecs import Zstd
from numcodecs.checksum32 import CRC32C
from zarr.codecs import ZstdCodec
from zarr.core.buffer import Buffer
from zarr.core.buffer.cpu import Buffer as CpuBuffer
from zarr.storage import MemoryStore

from logitcache.errors import CacheCorruptError
from logitcache.format.codec import ArraySpec
from logitcache.store.base import TARGETS_GROUP, EncodedRows, ShardBackend, decoding

__all__ = ["ZarrBackend"]

_CHUNK_BYTES = 1 << 20
_EMPTY = (1 << 64) - 1
_ZSTD = Zstd()
_CRC32C = CRC32C()
# what the decoders raise on bad bytes: numcodecs' zstd and crc32c raise RuntimeError, zarr its
# BaseZarrError (a ValueError) and KeyError for a missing node, json ValueError
_CODEC_ERRORS: tuple[type[BaseException], ...] = (RuntimeError, ValueError)
_ZARR_ERRORS: tuple[type[BaseException], ...] = (RuntimeError, ValueError, KeyError)


def _write_array(
    group: zarr.Group, name: str, arr: np.ndarray, level: int, files: dict[str, Buffer]
) -> None:
    """``arr`` as array ``name`` of ``group``, whose MemoryStore holds ``files``."""
    row_bytes = max(1, int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize)
    n = arr.shape[0]
    # ~1 MiB inner chunks; a smaller array is one chunk (no zero padding to decompress)
    chunk0 = max(1, min(_CHUNK_BYTES // row_bytes, n))
    chunks = (chunk0, *arr.shape[1:])
    # the outer shard must be a multiple of the inner chunk and cover the whole array
    shard0 = max(chunk0, -(-n // chunk0) * chunk0)
    z = group.create_array(  # zarr writes the metadata (zarr.json) ...
        name,
        shape=arr.shape,
        dtype=arr.dtype,
        chunks=tuple(max(1, c) for c in chunks),
        shards=(shard0, *(max(1, c) for c in arr.shape[1:])),
        compressors=ZstdCodec(level=level, checksum=True),
        fill_value=0,
    )
    blob = _shard_object(arr, chunk0, shard0 // chunk0, level) if arr.size else None
    if blob is not None:  # ... and the data goes in as the bytes zarr would write
        key = f"{z.path}/c/" + "/".join("0" * arr.ndim)
        files[key] = CpuBuffer.from_bytes(blob)


def _shard_object(arr: np.ndarray, chunk0: int, n_chunks: int, level: int) -> bytes | None:
    """The sharding codec's object for ``arr`` cut into ``n_chunks`` inner chunks of ``chunk0``
    rows, as zarr writes it (the :func:`_read_fast` layout): each inner chunk's little-endian
    bytes (the last zero-padded) as a zstd frame with its checksum, back to back in chunk order,
    then the (offset, nbytes) uint64 index and its crc32c. A chunk all of fill (zeros) is not
    written (index ``2**64 - 1``, zarr's ``write_empty_chunks=False``; -0.0 is not fill for zarr
    either), nor is an object none of whose chunks are. Byte for byte what
    ``zarr.Array.__setitem__`` produces (tests/store/test_zarr_layout.py), without zarr's async
    codec pipeline: a shard of 13.5 MB of arrays took 58-67 ms of CPU through zarr and 31-39 ms
    this way at level 3 (alternated in one process), zstd itself most of the rest; serialising
    had been ~40% of an import's time."""
    zstd = Zstd(level=level, checksum=True)
    data = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    index = np.full((n_chunks, 2), _EMPTY, dtype="<u8")
    parts: list[bytes] = []
    offset = 0
    for i in range(n_chunks):
        chunk = data[i * chunk0 : (i + 1) * chunk0]
        if not chunk.reshape(-1).view(np.uint8).any():  # all fill: every byte 0 (-0.0 is not)
            continue
        if chunk.shape[0] < chunk0:
            padded = np.zeros((chunk0, *data.shape[1:]), dtype=data.dtype)
            padded[: chunk.shape[0]] = chunk
            chunk = padded
        frame = zstd.encode(chunk)
        index[i] = (offset, len(frame))
        parts.append(frame)
        offset += len(frame)
    if not parts:
        return None
    parts.append(bytes(_CRC32C.encode(index.tobytes())))
    return b"".join(parts)


class ZarrBackend(ShardBackend):
    name = "zarr"
    single_file = False

    def serialize(
        self, data: EncodedRows, specs: tuple[ArraySpec, ...], compression_level: int
    ) -> dict[str, bytes]:
        store_dict: dict[str, Buffer] = {}
        root = zarr.open_group(MemoryStore(store_dict), mode="w", zarr_format=3)
        root.attrs["logitcache"] = {"rows": data.num_rows}
        for name, arr in (
            ("row_id", np.ascontiguousarray(data.row_id, np.int64)),
            ("input_ids", np.ascontiguousarray(data.input_ids, np.int32)),
            ("loss_mask", np.ascontiguousarray(data.loss_mask, np.uint8)),
        ):
            _write_array(root, name, arr, compression_level, store_dict)
        tg = root.create_group(TARGETS_GROUP)
        for spec in specs:
            arr = np.ascontiguousarray(data.encoded[spec.name], dtype=spec.dtype)
            _write_array(tg, spec.name, arr, compression_level, store_dict)
        return {k: v.to_bytes() for k, v in sorted(store_dict.items())}

    def deserialize(
        self, files: Mapping[str, bytes], specs: tuple[ArraySpec, ...], seq_len: int
    ) -> EncodedRows:
        names = ["row_id", "input_ids", "loss_mask", *(f"{TARGETS_GROUP}/{s.name}" for s in specs)]
        arrays = {n: _read_fast(files, n) for n in names}
        if any(a is None for a in arrays.values()):  # not our layout: let zarr decode it
            store_dict: dict[str, Buffer] = {k: CpuBuffer.from_bytes(v) for k, v in files.items()}
            with decoding("zarr group", _ZARR_ERRORS):
                root = zarr.open_group(
                    MemoryStore(store_dict, read_only=True), mode="r", zarr_format=3
                )
            arrays = {n: a if a is not None else _read(root, n) for n, a in arrays.items()}
        full = {n: a for n, a in arrays.items() if a is not None}
        return EncodedRows(
            row_id=full["row_id"],
            input_ids=full["input_ids"],
            loss_mask=full["loss_mask"],
            encoded={s.name: full[f"{TARGETS_GROUP}/{s.name}"] for s in specs},
        )


def _read_fast(files: Mapping[str, bytes], name: str) -> np.ndarray | None:
    """Decode one array of a shard written by :func:`_write_array` without zarr's machinery.

    Our layout is fixed: one sharding-codec object along axis 0 whose inner chunks are
    ``bytes`` + ``zstd`` and whose index (at the end: a little-endian (offset, nbytes) uint64
    pair per inner chunk, ``2**64 - 1`` for a chunk never written because it is all fill) is
    protected by crc32c. Decoding that directly is 2-3x faster than going through zarr's async
    codec pipeline, and it matters: shard decoding is the loader's hot path. Anything that does
    not match this layout exactly returns None and takes the general zarr path.
    """
    meta_key = f"{name}/zarr.json"
    if meta_key not in files:
        return None
    with decoding(meta_key, _CODEC_ERRORS):
        meta = json.loads(files[meta_key])
    layout = _fast_layout(meta)
    if layout is None:
        return None
    shape, chunk0, n_chunks, dtype = layout
    out = np.zeros((n_chunks * chunk0, *shape[1:]), dtype=dtype)
    blob = files.get(f"{name}/c/" + "/".join("0" * len(shape)))
    if blob is None:  # never written: all fill
        return out[: shape[0]]
    index_len = n_chunks * 16
    with decoding(f"{name} chunk index", _CODEC_ERRORS):
        index = np.frombuffer(_CRC32C.decode(blob[len(blob) - index_len - 4 :]), "<u8")
    if index.size != 2 * n_chunks:
        raise CacheCorruptError(
            f"{name}: chunk index holds {index.size // 2} chunks, not {n_chunks}"
        )
    view = memoryview(blob)  # chunk slices without copying them
    for i, (off, nbytes) in enumerate(index.reshape(n_chunks, 2).tolist()):
        if off == _EMPTY:
            continue
        if off + nbytes > len(blob):
            raise CacheCorruptError(f"{name}: chunk {i} lies past the end of its shard object")
        with decoding(f"{name} chunk {i}", _CODEC_ERRORS):
            _ZSTD.decode(view[off : off + nbytes], out=out[i * chunk0 : (i + 1) * chunk0])
    return out[: shape[0]]


def _fast_layout(meta: Any) -> tuple[tuple[int, ...], int, int, np.dtype[Any]] | None:
    """(shape, inner chunk length, inner chunks, dtype) when ``meta`` describes exactly the
    layout :func:`_write_array` writes, else None (the general zarr path decides)."""
    try:
        codecs = meta.get("codecs", [])
        if len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
            return None
        cfg = codecs[0]["configuration"]
        inner, index_codecs = cfg.get("codecs", []), cfg.get("index_codecs", [])
        if (
            [c.get("name") for c in inner] != ["bytes", "zstd"]
            or inner[0].get("configuration", {}).get("endian", "little") != "little"
            or [c.get("name") for c in index_codecs] != ["bytes", "crc32c"]
            or cfg.get("index_location", "end") != "end"
            or meta.get("fill_value") != 0
        ):
            return None
        shape = tuple(int(x) for x in meta["shape"])
        outer = tuple(int(x) for x in meta["chunk_grid"]["configuration"]["chunk_shape"])
        chunk = tuple(int(x) for x in cfg["chunk_shape"])
        dtype = np.dtype(meta["data_type"]).newbyteorder("<")
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
        return None  # foreign JSON (not ours, or damaged): not this layout
    if (
        not shape
        or outer[1:] != shape[1:]
        or chunk[1:] != shape[1:]
        or shape[0] > outer[0]
        or chunk[0] < 1
    ):
        return None
    return shape, chunk[0], outer[0] // chunk[0], dtype


def _read(root: zarr.Group, name: str) -> np.ndarray:
    with decoding(name, _ZARR_ERRORS):
        arr = root[name]
        if not isinstance(arr, zarr.Array):
            raise CacheCorruptError(f"{name} is a group, not an array")
        return np.asarray(arr[...])
