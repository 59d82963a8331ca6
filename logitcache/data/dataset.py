"""Datasets over a cache: random access by row (map-style) and shard streaming with read-ahead.

Both take their rows from a :class:`~logitcache.data.RowSampler` and return whole collated batches
(:class:`~logitcache.data.collate.Collator`): a DataLoader over them runs with ``batch_size=None``
and the work of decoding happens in its worker processes.

- :class:`CachedLogitDataset` (map-style): ``ds[RowBatch]`` groups the batch's rows by shard and
  reads them through a shard LRU of ``max_cached_shards`` decoded shards per process. A
  ``"random"`` order draws each worker's rows from blocks of ``window_shards`` of its own shards,
  so an LRU of at least two blocks loads each shard once (the epoch's last few batches aside,
  which a map-style DataLoader may deal to another worker).
- :class:`StreamingLogitDataset` (iterable): walks this worker's batches of a ``"streaming"`` or
  ``"sequential"`` order and keeps a read-ahead pool fetching, verifying and decompressing the
  next shards (in the order the batches will first need them) while the current ones are
  collated, and drops each after its last batch. The sampler gives each (rank, worker) its own
  shards, so a shard is fetched and decoded once per epoch over all ranks and workers, in large
  sequential reads: the object-store path.

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
        return self.collator.view(shard, data)  # range-checks the shard once

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

    ``readahead``: shards fetched ahead of those the current batch needs (and fetch threads);
    None (default): the sampler's ``window_shards``, so the next window loads while the current
    one is consumed (see :func:`_read_ahead`). The sampler must use a ``"streaming"`` or
    ``"sequential"`` order (a random order would fetch a shard per row: use
    :class:`CachedLogitDataset`). Use with ``DataLoader(ds, batch_size=None)``.
    """

    def __init__(
        self,
        url: str,
        sampler: RowSampler,
        *,
        options: TargetOptions | None = None,
        readahead: int | None = None,
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
        if readahead is None:
            readahead = sampler.window_shards
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
            planned = _read_ahead(self, list(batches), pool, self.readahead)
            for batch, shard, local, views in planned:
                yield self.collator(views, shard, local, batch.is_pad)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)


def _read_ahead(
    source: _CacheSource, batches: list[RowBatch], pool: cf.ThreadPoolExecutor, ahead: int
) -> Iterator[tuple[RowBatch, np.ndarray, np.ndarray, dict[int, ShardView]]]:
    """Yield batches with their shards loaded, keeping ``ahead`` more shards in flight.

    This worker's batches are all known (its share of the epoch), so each shard is loaded when
    its first batch comes within reach (in first-use order: the current batch's shards, then the
    next ``ahead``) and dropped right after its **last** batch: it is decoded once per epoch even
    when a window's shuffle leaves a long gap between two of its rows.

    ``ahead`` should cover a whole window (the default): a window's first batch needs nearly all
    its shards at once (3.6 of 4 on average at batch 8), so with ``ahead=2`` the last ones were
    only submitted when that batch asked for them and the worker stalled for a shard's
    decompression at every window boundary, leaving a core idle (issue 17's 1-worker figure). A
    window ahead, they decompress during the previous window: the cost is memory, two windows of
    decoded shards per worker instead of a window and two shards.
    """
    planned = []
    first_use: dict[int, int] = {}
    last_use: dict[int, int] = {}
    for i, batch in enumerate(batches):
        shard, local = source.locate(np.asarray(batch.rows, dtype=np.int64))
        needed = list(dict.fromkeys(shard.tolist()))
        planned.append((shard, local, needed))
        for s in needed:
            first_use.setdefault(s, i)
            last_use[s] = i
    queue = list(first_use)  # shards in first-use order
    loads: dict[int, cf.Future[ShardView]] = {}
    submitted = due = 0  # queue positions: next shard to submit, first shard not yet needed
    for i, (batch, (shard, local, needed)) in enumerate(zip(batches, planned, strict=True)):
        while due < len(queue) and first_use[queue[due]] <= i:
            due += 1
        while submitted < min(len(queue), due + ahead):
            loads[queue[submitted]] = pool.submit(source.view, queue[submitted])
            submitted += 1
        views = {s: loads[s].result() for s in needed}
        for s in needed:
            if last_use[s] == i:
                del loads[s]
        yield batch, shard, local, views
