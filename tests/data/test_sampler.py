"""RowSampler: coverage across ranks x workers, exact resume, determinism, JSON state."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from logitcache.data.sampler import ORDER_VERSION, RowBatch, RowSampler
from logitcache.errors import ConfigError, LoaderError

SHARDS = [7, 0, 5, 8, 3]  # 23 rows, one empty shard
N = sum(SHARDS)


class RowIds(IterableDataset):
    """The dummy dataset of the issue: yields row ids through the sampler's worker split."""

    def __init__(self, sampler: RowSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Any:
        for b in self.sampler.iter_batches():
            yield {"rows": torch.from_numpy(b.rows), "is_pad": torch.from_numpy(b.is_pad)}


class RowIdsMap(Dataset):
    def __getitem__(self, batch: RowBatch) -> dict[str, torch.Tensor]:
        return {"rows": torch.from_numpy(batch.rows), "is_pad": torch.from_numpy(batch.is_pad)}


def train(sampler: RowSampler, workers: int, steps: int | None = None) -> list[dict[str, Any]]:
    """A training loop's view: batches in delivery order, ``advance()`` after each step."""
    loader = DataLoader(RowIds(sampler), batch_size=None, num_workers=workers)
    out = []
    for batch in loader:
        out.append({k: v.tolist() for k, v in batch.items()})
        sampler.advance()
        if steps is not None and len(out) == steps:
            break
    return out


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("order", ["random", "streaming"])
def test_every_row_once_per_epoch(world: int, workers: int, order: str) -> None:
    batch_size = 4
    seen: list[int] = []
    steps = set()
    for rank in range(world):
        sampler = RowSampler(
            SHARDS, batch_size, order=order, seed=3, window_shards=2, rank=rank, world_size=world
        )
        batches = train(sampler, workers)
        steps.add(len(batches))
        assert all(len(b["rows"]) == batch_size for b in batches)  # static shapes, even padded
        seen += [
            r for b in batches for r, pad in zip(b["rows"], b["is_pad"], strict=True) if not pad
        ]
        # the worker split does not change what a rank sees
        direct = RowSampler(
            SHARDS, batch_size, order=order, seed=3, window_shards=2, rank=rank, world_size=world
        )
        assert [b["rows"] for b in batches] == [b.rows.tolist() for b in direct]
    assert steps == {-(-N // (world * batch_size))}  # equal step counts on every rank (DDP)
    assert sorted(seen) == list(range(N))


def test_drop_last_drops_only_the_partial_step() -> None:
    seen = []
    for rank in range(2):
        s = RowSampler(SHARDS, 4, rank=rank, world_size=2, drop_last=True)
        batches = list(s)
        assert len(batches) == N // 8
        assert not any(b.is_pad.any() for b in batches)
        seen += [r for b in batches for r in b.rows.tolist()]
    assert len(set(seen)) == len(seen) == 16
    assert seen_prefix_of_order(seen, RowSampler(SHARDS, 4, drop_last=True).epoch_order())


def seen_prefix_of_order(seen: list[int], order: np.ndarray) -> bool:
    return set(seen) == set(order[: len(seen)].tolist())


@pytest.mark.parametrize(("before", "after"), [(0, 2), (2, 1), (1, 0)])
def test_resume_with_other_worker_count_equals_uninterrupted(before: int, after: int) -> None:
    def make() -> RowSampler:
        return RowSampler(SHARDS, 2, order="streaming", seed=7, rank=1, world_size=2)

    full = train(make(), 0)
    first = make()
    head = train(first, before, steps=2)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = make()
    resumed.load_state_dict(state)
    assert head + train(resumed, after) == full


def test_resume_with_other_world_size_never_repeats_or_skips() -> None:
    seen = []
    for rank in range(2):  # world 2, batch 3: two global steps of 6 rows, then "crash"
        s = RowSampler(SHARDS, 3, seed=1, rank=rank, world_size=2)
        seen += [r for b in train(s, 0, steps=2) for r in b["rows"]]
    state = json.loads(json.dumps(s.state_dict()))
    assert state["consumed_rows"] == 12
    for rank in range(3):  # resume on world 3, batch 2
        s = RowSampler(SHARDS, 2, seed=1, rank=rank, world_size=3)
        s.load_state_dict(state)
        seen += [
            r for b in train(s, 1) for r, pad in zip(b["rows"], b["is_pad"], strict=True) if not pad
        ]
    assert sorted(seen) == list(range(N))


def test_map_style_dataloader_with_workers_keeps_the_order() -> None:
    sampler = RowSampler(SHARDS, 3, seed=5, rank=0, world_size=2)
    loader = DataLoader(RowIdsMap(), sampler=sampler, batch_size=None, num_workers=2)
    assert [b["rows"].tolist() for b in loader] == [b.rows.tolist() for b in sampler]


def test_orders_depend_on_seed_and_epoch_and_are_reproducible() -> None:
    shards = [50] * 8
    a = RowSampler(shards, 4, seed=0)
    orders = {
        (seed, epoch): tuple(RowSampler(shards, 4, seed=seed).epoch_order(epoch))
        for seed in (0, 1)
        for epoch in (0, 1)
    }
    assert len(set(orders.values())) == 4
    assert tuple(a.epoch_order(1)) == orders[(0, 1)]
    a.set_epoch(1)
    assert tuple(next(iter(a)).rows) == orders[(0, 1)][:4]
    assert tuple(RowSampler(shards, 4, order="sequential").epoch_order(3)) == tuple(range(400))


def test_order_is_pinned() -> None:
    # If this fails the shuffle changed: bump ORDER_VERSION so old resume states are refused.
    assert ORDER_VERSION == 1
    assert RowSampler(SHARDS, 1, seed=0).epoch_order(0)[:6].tolist() == PINNED_RANDOM
    streaming = RowSampler(SHARDS, 1, order="streaming", window_shards=2)
    assert streaming.epoch_order(0)[:6].tolist() == PINNED_STREAMING


PINNED_RANDOM = [0, 1, 17, 13, 9, 18]
PINNED_STREAMING = [10, 8, 11, 9, 7, 16]


def test_streaming_order_reads_each_shard_within_one_window() -> None:
    shards = [10, 3, 0, 12, 7, 9, 4]
    s = RowSampler(shards, 2, order="streaming", seed=2, window_shards=2)
    order = s.epoch_order()
    assert sorted(order.tolist()) == list(range(sum(shards)))
    shard, local = s.locate(order)
    assert (local >= 0).all() and (local < np.asarray(shards)[shard]).all()
    # a reader that opens a shard at its first row and closes it at its last never holds more
    # than window_shards shards at once
    first = {int(x): np.flatnonzero(shard == x).min() for x in np.unique(shard)}
    last = {int(x): np.flatnonzero(shard == x).max() for x in np.unique(shard)}
    open_at = [sum(first[x] <= i <= last[x] for x in first) for i in range(len(order))]
    assert max(open_at) <= 2


def test_state_dict_round_trips_through_json() -> None:
    s = RowSampler(SHARDS, 2, order="streaming", seed=11, window_shards=3)
    s.set_epoch(4)
    s.advance(3)
    state = s.state_dict()
    assert json.loads(json.dumps(state)) == state
    t = RowSampler(SHARDS, 5, order="streaming", seed=0, window_shards=3)
    t.load_state_dict(json.loads(json.dumps(state)))
    assert (t.epoch, t.seed, t.consumed_rows) == (4, 11, 6)
    assert t.state_dict() == state


def test_load_state_refuses_another_cache_or_order() -> None:
    state = RowSampler(SHARDS, 2).state_dict()
    with pytest.raises(ConfigError, match="shards"):
        RowSampler([8, 0, 5, 7, 3], 2).load_state_dict(state)
    with pytest.raises(ConfigError, match="order"):
        RowSampler(SHARDS, 2, order="streaming").load_state_dict(state)
    with pytest.raises(ConfigError, match="lacks"):
        RowSampler(SHARDS, 2).load_state_dict({"epoch": 0})


def test_epoch_end_and_bad_arguments() -> None:
    s = RowSampler(SHARDS, 4, rank=1, world_size=2)
    s.advance(len(s))
    assert len(s) == 0 and list(s) == []
    with pytest.raises(LoaderError, match="set_epoch"):
        s.advance()
    s.set_epoch(1)
    assert len(s) == s.steps_per_epoch == 3
    for kwargs in ({"rank": 2, "world_size": 2}, {"order": "shuffle"}, {"seed": -1}):
        with pytest.raises(ConfigError):
            RowSampler(SHARDS, 4, **kwargs)
    with pytest.raises(ConfigError, match="no rows"):
        RowSampler([0, 0], 4)
    with pytest.raises(ConfigError):
        RowSampler(SHARDS, 0)
    with pytest.raises(ConfigError):
        s.locate(np.array([N]))


def test_split_partitions_rows_independent_of_seed() -> None:
    sizes = [40, 0, 57, 33]
    seen = {}
    for name in ("train", "eval"):
        rows = []
        for seed in (0, 1):
            s = RowSampler(sizes, 8, order="streaming", seed=seed, split=(name, 0.2))
            got = np.concatenate([b.rows[~b.is_pad] for b in s.iter_batches()])
            assert len(got) == len(set(got.tolist())) == s.num_rows
            rows.append(set(got.tolist()))
        assert rows[0] == rows[1]  # the held-out set does not move with the seed
        seen[name] = rows[0]
    assert seen["train"].isdisjoint(seen["eval"])
    assert seen["train"] | seen["eval"] == set(range(sum(sizes)))
    assert 0.1 < len(seen["eval"]) / sum(sizes) < 0.3
    s = RowSampler(sizes, 8, split=("train", 0.2))
    with pytest.raises(ConfigError, match="split"):
        RowSampler(sizes, 8).load_state_dict(s.state_dict())
