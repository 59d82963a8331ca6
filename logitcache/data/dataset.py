"""Datasets over a cache: random access by row (map-style) and shard streaming with read-ahead.

Both take their rows from a :class:`~logitcache.data.RowSampler` and return whole collated batches
(:class:`~logitcache.data.collate.Collator`): a DataLoader over them runs with ``batch_size=None``
and the work of decoding happens in its worker processes.

- :class:`CachedLogitDataset` (map-style): ``ds[RowBatch]`` groups the batch's rows by shard and
  reads them through the reader's shard LRU. Shards are read whole, so a ``"random"`` order
  touches a different shard for nearly every row: this mode is for caches whose shards fit in
  ``max_cached_shards`` (RAM or a local page cache), or for evaluation.
- :class:`StreamingLogitDataset` (iterable): walks this worker's batches of a ``"streaming"`` or
  ``"sequential"`` order and keeps a read-ahead pool fetching, verifying and decompressing the
  next shards (in the order the batches will first need them) while the current ones are
  collated. Each shard is fetched once per worker per epoch (in a streaming window every worker's
  batches touch every shard of the window), in large sequential reads: the object-store path.

Neither holds an open reader when pickled: each process (DataLoader worker) opens its own from the
URL, which is also what lets the ``spawn`` start method work. Errors raised while reading (an
incomplete cache, a shard that fails its checksum, naming the shard) propagate unchanged; from a
worker, the DataLoader re-raises them in the main process with the same class and message.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch.utils.data

from logitcache.data._gather import ShardView
from logitcache.data.collate import Collator, TargetOptions
from logitcache.data.sampler import RowBatch, RowSampler
from logitcache.errors import ConfigError
from logitcache.store.reader import CacheReader

__all__ = ["CachedLogitDataset", "StreamingLogitDataset"]


class _CacheSource:
    """Opens the reader lazily in each process; pickles as its arguments only."""

    def __init__(
        self,
        url: str,
        *,
        options: TargetOptions | None,
        verify: bool,
        max_cached_shards: int,
        storage_options: Mapping[str, Any] | None,
    ) -> None:
        self.url = url
        self.verify = verify
        self.max_cached_shards = max_cached_shards
        self.storage_options = dict(storage_options) if storage_options else None
        self._reader: CacheReader | None = None
        self._reader_pid = -1
        self.collator = Collator(self.reader.manifest, options)

    @property
    def reader(self) -> CacheReader:
        # one reader per process: a DataLoader worker forked from the parent must not reuse the
        # parent's filesystem (fsspec's async filesystems, s3fs among them, are not fork-safe)
        if self._reader is None or self._reader_pid != os.getpid():
            self._reader_pid = os.getpid()
            self._reader = CacheReader(
                self.url,
                verify=self.verify,
                max_cached_shards=self.max_cached_shards,
                storage_options=self.storage_options,
            )
        return self._reader

    @property
    def shard_sizes(self) -> list[int]:
        return [s.rows for s in self.reader.manifest.shards]

    def view(self, shard: int) -> ShardView:
        data = self.reader.load_shard(shard)
        return ShardView.build(shard, data, self.reader.codec.entry_count_array)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_reader"] = None
        return state

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        offsets = self.reader.shard_row_offsets
        shard = np.searchsorted(offsets, rows, side="right") - 1
        return shard, rows - offsets[shard]


class CachedLogitDataset(_CacheSource, torch.utils.data.Dataset[dict[str, Any]]):
    """Map-style: ``ds[row_batch]`` -> one collated batch of the batch's global rows.

    Use with ``DataLoader(ds, sampler=RowSampler(...), batch_size=None)``. ``max_cached_shards``
    decoded shards are kept per process (size it to the cache for a random order).
    """

    def __init__(
        self,
        url: str,
        *,
        options: TargetOptions | None = None,
        verify: bool = True,
        max_cached_shards: int = 16,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(
            url,
            options=options,
            verify=verify,
            max_cached_shards=max_cached_shards,
            storage_options=storage_options,
        )
        self._views: collections.OrderedDict[int, ShardView] = collections.OrderedDict()

    def __len__(self) -> int:
        return self.reader.num_rows

    def _view(self, shard: int) -> ShardView:
        hit = self._views.get(shard)
        if hit is None:
            hit = self.view(shard)
            self._views[shard] = hit
            while len(self._views) > self.max_cached_shards:
                self._views.popitem(last=False)
        self._views.move_to_end(shard)
        return hit

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_views"] = collections.OrderedDict()
        return state

    def __getitem__(self, batch: RowBatch) -> dict[str, Any]:
        if not isinstance(batch, RowBatch):
            raise ConfigError(
                f"CachedLogitDataset is indexed by a RowBatch (from RowSampler), got "
                f"{type(batch).__name__}; pass sampler=RowSampler(...) and batch_size=None"
            )
        rows = np.asarray(batch.rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.reader.num_rows):
            raise ConfigError(f"row ids must be in [0, {self.reader.num_rows})")
        shard, local = self.locate(rows)
        views = {s: self._view(s) for s in np.unique(shard).tolist()}
        return self.collator(views, shard, local, batch.is_pad)


class StreamingLogitDataset(_CacheSource, torch.utils.data.IterableDataset[dict[str, Any]]):
    """Iterable: this worker's batches of ``sampler``, shards read ahead in a thread pool.

    ``readahead``: shards fetched ahead of the one being consumed (and fetch threads). The sampler
    must use a ``"streaming"`` or ``"sequential"`` order (a random order would fetch a shard per
    row: use :class:`CachedLogitDataset`). Use with ``DataLoader(ds, batch_size=None)``.
    """

    def __init__(
        self,
        url: str,
        sampler: RowSampler,
        *,
        options: TargetOptions | None = None,
        readahead: int = 2,
        verify: bool = True,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(
            url,
            options=options,
            verify=verify,
            max_cached_shards=1,
            storage_options=storage_options,
        )
        if sampler.order == "random":
            raise ConfigError(
                "StreamingLogitDataset reads shards in order and needs order='streaming' or "
                "'sequential'; got a sampler with order='random': use CachedLogitDataset for "
                "random access, or RowSampler(..., order='streaming')"
            )
        if list(sampler.shard_offsets[1:] - sampler.shard_offsets[:-1]) != self.shard_sizes:
            raise ConfigError("the sampler was built for another cache (shard sizes differ)")
        if isinstance(readahead, bool) or not isinstance(readahead, int) or readahead < 1:
            raise ConfigError(f"readahead must be an integer >= 1, got {readahead!r}")
        self.sampler = sampler
        self.readahead = readahead

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # iter_batches snapshots (epoch, consumed rows) now, not at the first next()
        return self._stream(self.sampler.iter_batches())

    def _stream(self, batches: Iterator[RowBatch]) -> Iterator[dict[str, Any]]:
        _ = self.reader  # open it before the pool threads share it
        pool = cf.ThreadPoolExecutor(self.readahead, thread_name_prefix="logitcache-readahead")
        try:
            for batch, shard, local, views in _read_ahead(self, batches, pool, self.readahead):
                yield self.collator(views, shard, local, batch.is_pad)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)


_Planned = tuple[RowBatch, np.ndarray, np.ndarray, list[int]]


def _read_ahead(
    source: _CacheSource, batches: Iterator[RowBatch], pool: cf.ThreadPoolExecutor, ahead: int
) -> Iterator[tuple[RowBatch, np.ndarray, np.ndarray, dict[int, ShardView]]]:
    """Yield batches with their shards loaded, keeping ``ahead`` upcoming shards in flight.

    A window of upcoming batches is planned (rows located, shards listed in first-use order);
    shard loads are submitted in that order until ``ahead`` shards beyond the current batch's are
    pending, and a shard is dropped as soon as no planned batch needs it.
    """
    window: collections.deque[_Planned] = collections.deque()
    loads: dict[int, cf.Future[ShardView]] = {}
    horizon = max(16, 8 * ahead)  # batches planned ahead: cheap index math
    exhausted = False
    while True:
        while not exhausted and len(window) < horizon:
            nxt = next(batches, None)
            if nxt is None:
                exhausted = True
                break
            shard, local = source.locate(np.asarray(nxt.rows, dtype=np.int64))
            order = list(dict.fromkeys(shard.tolist()))
            window.append((nxt, shard, local, order))
        if not window:
            return
        current = window[0][3]
        for s in current:  # the current batch's shards first, then read-ahead
            if s not in loads:
                loads[s] = pool.submit(source.view, s)
        upcoming = list(dict.fromkeys(s for p in window for s in p[3] if s not in current))
        for s in upcoming[:ahead]:
            if s not in loads:
                loads[s] = pool.submit(source.view, s)
        batch, shard, local, needed = window.popleft()
        views = {s: loads[s].result() for s in needed}
        live = {s for p in window for s in p[3]}
        for s in [s for s in loads if s not in live and s not in needed]:
            loads.pop(s).cancel()
        for s in needed:
            if s not in live:
                loads.pop(s)
        yield batch, shard, local, views
