"""The streaming read-ahead: by default a whole window ahead, so no batch waits on a shard load
that only started when that batch needed it (issue 17's 1-worker stall at window boundaries)."""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from loader_cache import build_cache

from logitcache.data import RowSampler, StreamingLogitDataset, make_loader
from logitcache.data.dataset import _read_ahead
from logitcache.errors import ConfigError


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_cache(tmp_path_factory.mktemp("readahead") / "topk")  # 6 uneven shards


class _RecordingPool(cf.ThreadPoolExecutor):
    """A real thread pool that records, per shard, how many batches had been handed out when
    its load was submitted."""

    def __init__(self, workers: int) -> None:
        super().__init__(workers)
        self.handed_out = 0
        self.submitted_at: dict[int, int] = {}

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future[Any]:
        self.submitted_at[int(args[0])] = self.handed_out
        return super().submit(fn, *args, **kwargs)


def _lead_times(ds: StreamingLogitDataset, sampler: RowSampler) -> list[tuple[int, int]]:
    """(batch that first needs a shard, batches handed out when its load was submitted)."""
    pool = _RecordingPool(ds.readahead)
    first_need: dict[int, int] = {}
    try:
        batches = list(sampler.iter_batches())
        for i, (_, shard, _, views) in enumerate(_read_ahead(ds, batches, pool, ds.readahead)):
            assert set(views) == set(np.unique(shard).tolist())
            for s in views:
                first_need.setdefault(s, i)
            pool.handed_out = i + 1
    finally:
        pool.shutdown()
    return [(i, pool.submitted_at[s]) for s, i in first_need.items()]


def test_default_readahead_loads_the_next_window_during_the_current_one(url: str) -> None:
    sizes = [10, 9, 9, 9, 9, 7]
    sampler = RowSampler(sizes, 8, order="streaming", seed=3, window_shards=3)
    ds = StreamingLogitDataset(url, sampler)
    assert ds.readahead == 3  # None: the sampler's window
    leads = _lead_times(ds, sampler)
    assert len(leads) == len(sizes)
    # only the first batch waits for loads it started itself; every later shard was submitted
    # at least one batch before the batch that first needs it
    assert all(submitted < need for need, submitted in leads if need > 0), leads


def test_a_readahead_shorter_than_the_window_stalls_at_the_window_boundary(url: str) -> None:
    """The former default (2 with windows of 3 or 4): the next window's last shards are only
    submitted when its first batch needs them."""
    sampler = RowSampler([10, 9, 9, 9, 9, 7], 8, order="streaming", seed=3, window_shards=3)
    ds = StreamingLogitDataset(url, sampler, readahead=2)
    late = [need for need, submitted in _lead_times(ds, sampler) if need > 0 and submitted >= need]
    assert late  # the window boundary's stall that the default removes


def test_loader_readahead_defaults_to_the_window_and_is_validated(url: str) -> None:
    loader = make_loader(url, 2, window_shards=3, device="cpu")
    assert isinstance(loader.dataset, StreamingLogitDataset)
    assert loader.dataset.readahead == 3
    assert make_loader(url, 2, readahead=1, device="cpu").dataset.readahead == 1  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="readahead must be an integer >= 1"):
        make_loader(url, 2, readahead=0, device="cpu")


def test_default_readahead_keeps_every_row_once(url: str) -> None:
    loader = make_loader(url, 3, window_shards=3, num_workers=2, device="cpu", seed=5)
    seen = [r for b in loader for r in b["row_id"][~b["is_pad"]].tolist()]
    assert sorted(seen) == list(range(1000, 1053))
