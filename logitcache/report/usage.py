"""Where a cache's bytes go: per stored array and per shard, in bytes per token.

Tokens are rows x seq_len, the denominator of ``logitcache info``'s bytes/token.

- **Zarr** shards keep each array in its own objects (``<shard>/<array>/c/...`` plus a
  ``zarr.json`` per node), so the manifest's file records give the bytes of every array exactly,
  summed over all shards; the ``zarr.json`` documents are reported as ``(metadata)``.
- **Arrow** shards are one file each and the IPC format does not expose a column's compressed
  size; the split is *estimated* on one shard: each column's buffers are compressed with zstd
  and the shares of that total are applied to the cache's bytes. The page says so.

An array is *per entry* when it grows with k (top-k: inner shape ``(k,)``) or is stored per
sampled entry; :meth:`ByteUsage.bytes_per_token_at` scales those to another k, assuming the bytes
per entry stay as at the stored k (docs/codecs.md: 1.56 B/entry at k=64 vs 1.45 at k=128, so
within ~10% for a factor 2 in k).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa

from logitcache.format.manifest import Manifest
from logitcache.store.base import TARGETS_GROUP
from logitcache.store.reader import CacheReader

__all__ = ["ByteUsage", "byte_usage"]

METADATA = "(metadata)"


@dataclass(frozen=True)
class ByteUsage:
    """Bytes per stored array (whole cache) and per shard; ``estimated`` for Arrow."""

    tokens: int
    per_array: dict[str, int]
    per_entry_arrays: tuple[str, ...]
    per_shard: tuple[tuple[str, int, int], ...]  # (shard path, bytes, tokens)
    estimated: bool

    @property
    def total(self) -> int:
        return sum(self.per_array.values())

    @property
    def bytes_per_token(self) -> float:
        return self.total / self.tokens if self.tokens else float("nan")

    def bytes_per_token_at(self, k_new: int, k: int) -> float:
        """Estimated bytes/token had the cache been dumped with top-``k_new`` instead of k."""
        entry = sum(v for n, v in self.per_array.items() if n in self.per_entry_arrays)
        return (self.total - entry + entry * k_new / k) / self.tokens if self.tokens else 0.0


def _array_of(rel: str) -> str:
    """The array a Zarr shard file belongs to (a group's own ``zarr.json`` is metadata)."""
    parts = rel.split("/")
    if parts[-1] == "zarr.json" and (len(parts) == 1 or rel == f"{TARGETS_GROUP}/zarr.json"):
        return METADATA
    if parts[0] == TARGETS_GROUP and len(parts) > 2:
        return f"{parts[0]}/{parts[1]}"
    return parts[0]


def _arrow_shares(data: bytes) -> dict[str, int]:
    table = pa.ipc.open_file(pa.BufferReader(data)).read_all()
    out = {}
    for name in table.column_names:
        size = 0
        for chunk in table.column(name).chunks:
            for buf in chunk.buffers():
                if buf is not None and buf.size:
                    size += pa.compress(buf, codec="zstd", asbytes=False).size
        out[name] = size
    return out


def _per_entry(m: Manifest) -> tuple[str, ...]:
    k = m.targets.k
    return tuple(
        f"{TARGETS_GROUP}/{s.name}"
        for s in m.codec.array_specs()
        if s.level == "entry" or (k is not None and s.inner_shape == (k,))
    )


def byte_usage(reader: CacheReader, probe: Sequence[int]) -> ByteUsage:
    """The byte split of ``reader``'s cache; ``probe``: the shard(s) an Arrow estimate reads
    (the first listed; the first shard when empty)."""
    m = reader.manifest
    per_shard = tuple((s.path, s.bytes, s.rows * m.seq_len) for s in m.shards)
    tokens = m.num_rows * m.seq_len
    per_array: dict[str, int] = {}
    estimated = m.backend == "arrow"
    if not estimated:
        for s in m.shards:
            for f in s.files:
                name = _array_of(f.path[len(s.path) + 1 :])
                per_array[name] = per_array.get(name, 0) + f.bytes
    elif m.shards:
        index = probe[0] if probe else 0
        shares = _arrow_shares(reader.fetch_shard_files(index, verify=False)[""])
        total, whole = sum(shares.values()) or 1, m.num_bytes
        per_array = {n: round(whole * v / total) for n, v in shares.items()}
        rest = whole - sum(per_array.values())  # rounding and the IPC framing
        if rest > 0:
            per_array[METADATA] = rest
    return ByteUsage(
        tokens=tokens,
        per_array=dict(sorted(per_array.items(), key=lambda kv: -kv[1])),
        per_entry_arrays=_per_entry(m),
        per_shard=per_shard,
        estimated=estimated,
    )
