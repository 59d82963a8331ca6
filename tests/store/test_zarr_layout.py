"""The Zarr backend writes each array's sharding-codec object itself (store/_zarr.py
``_shard_object``): the files must be byte for byte what zarr's own ``Array.__setitem__`` writes,
and zarr must read them back, for every kind of array a shard holds."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from zarr.codecs import ZstdCodec
from zarr.core.buffer import Buffer
from zarr.core.buffer.cpu import Buffer as CpuBuffer
from zarr.storage import MemoryStore

from logitcache.store._zarr import _CHUNK_BYTES, _read_fast, _write_array

RNG = np.random.default_rng(7)
CASES = {
    "3-d uint8, one partial chunk": RNG.integers(0, 256, (37, 512, 64), dtype=np.uint8),
    "int32 all zero (no object)": np.zeros((10, 5), np.int32),
    "float32, zero chunks then data": np.concatenate(
        [np.zeros((5000, 64), np.float32), RNG.standard_normal((100, 64)).astype(np.float32)]
    ),
    "float32 -0.0 (not fill for zarr)": np.array([-0.0, 0.0, 0.0], np.float32),
    "1-d int64 over many chunks": RNG.integers(-5, 5, 300_000, dtype=np.int64),
    "empty": np.zeros((0, 64), np.uint8),
    "low-entropy uint8, several chunks": RNG.integers(0, 3, (40_000, 64), dtype=np.uint8),
    "nan": np.full((3, 4), np.nan, np.float32),
    "uint16 big-endian input": RNG.integers(0, 60_000, (999, 7)).astype(">u2"),
}


def _zarr_writes(arr: np.ndarray, level: int) -> dict[str, bytes]:
    """What zarr itself writes for the same array, chunking and codecs as _write_array's."""
    files: dict[str, Buffer] = {}
    root = zarr.open_group(MemoryStore(files), mode="w", zarr_format=3)
    row_bytes = max(1, int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize)
    n = arr.shape[0]
    chunk0 = max(1, min(_CHUNK_BYTES // row_bytes, n))
    shard0 = max(chunk0, -(-n // chunk0) * chunk0)
    rest = tuple(max(1, c) for c in arr.shape[1:])
    z = root.create_group("targets").create_array(
        "x",
        shape=arr.shape,
        dtype=arr.dtype,
        chunks=(chunk0, *rest),
        shards=(shard0, *rest),
        compressors=ZstdCodec(level=level, checksum=True),
        fill_value=0,
    )
    if arr.size:
        z[...] = arr
    return {k: v.to_bytes() for k, v in files.items()}


def _ours(arr: np.ndarray, level: int) -> dict[str, bytes]:
    files: dict[str, Buffer] = {}
    root = zarr.open_group(MemoryStore(files), mode="w", zarr_format=3)
    _write_array(root.create_group("targets"), "x", arr, level, files)
    return {k: v.to_bytes() for k, v in files.items()}


@pytest.mark.parametrize("level", [3, 15])
@pytest.mark.parametrize("case", sorted(CASES))
def test_shard_object_is_what_zarr_writes(case: str, level: int) -> None:
    arr = CASES[case]
    ours, theirs = _ours(arr, level), _zarr_writes(arr, level)
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert ours[key] == theirs[key], key
    # and both readers give the array back: zarr's and the backend's own fast path
    store = MemoryStore({k: CpuBuffer.from_bytes(v) for k, v in ours.items()}, read_only=True)
    back = np.asarray(zarr.open_group(store, mode="r", zarr_format=3)["targets/x"][...])
    np.testing.assert_array_equal(back, arr)
    fast = _read_fast(ours, "targets/x")
    assert fast is not None
    np.testing.assert_array_equal(fast, arr)
