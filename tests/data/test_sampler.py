"""RowSampler: shard-aware assignment (each shard read by one process), coverage at world sizes
1..64 x workers 0..4, exact and elastic resume, determinism, JSON state."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from logitcache.data.sampler import ORDER_VERSION, RowBatch, RowSampler
from logitcache.errors import ConfigError, LoaderError

SHARDS = [7, 0, 5, 8, 3]  # 23 rows, one empty shard, uneven sizes
SHORT_LAST = [6] * 9 + [2]  # 10 shards that no world size divides evenly, a short last one
N = sum(SHARDS)


def collect(sampler: RowSampler, workers: int) -> list[RowBatch]:
    """What a DataLoader over an IterableDataset delivers: each worker's batches, collected
    round-robin, a worker that has run out skipped (simulated in-process)."""
    if workers <= 1:
        return list(sampler.iter_batches())
    streams = [iter(list(sampler.iter_batches(w, workers))) for w in range(workers)]
    out, active = [], list(range(workers))
    while active:
        for w in list(active):
            b = next(streams[w], None)
            if b is None:
                active.remove(w)
            else:
                out.append(b)
    return out


def epoch_rows(shards: list[int], world: int, workers: int, **kw: Any) -> dict[str, Any]:
    """Every rank's delivered batches in one epoch, and which (rank, worker) read each shard."""
    steps, seen, readers = set(), [], {}
    offsets = np.concatenate([[0], np.cumsum(shards)])
    for rank in range(world):
        s = RowSampler(shards, 3, rank=rank, world_size=world, num_workers=workers, **kw)
        batches = collect(s, workers)
        assert [b.rows.tolist() for b in batches] == [b.rows.tolist() for b in s]  # main process
        steps.add(len(batches))
        assert all(len(b) == 3 for b in batches)  # static shapes, even padded
        seen += [r for b in batches for r in b.rows[~b.is_pad].tolist()]
        for w in range(max(1, workers)):
            for b in s.iter_batches(w, max(1, workers)) if workers > 1 else s.iter_batches():
                for shard in np.searchsorted(offsets, b.rows[~b.is_pad], side="right") - 1:
                    readers.setdefault(int(shard), set()).add((rank, w))
    return {"steps": steps, "seen": seen, "readers": readers}


@pytest.mark.parametrize("shards", [SHARDS, SHORT_LAST], ids=["uneven", "short-last"])
@pytest.mark.parametrize("world", [1, 2, 3, 8, 64])
@pytest.mark.parametrize("workers", [0, 1, 2, 4])
@pytest.mark.parametrize("order", ["streaming", "random", "sequential"])
def test_every_row_once_per_epoch_and_every_shard_read_by_one_process(
    shards: list[int], world: int, workers: int, order: str
) -> None:
    got = epoch_rows(shards, world, workers, order=order, seed=3, window_shards=2)
    assert len(got["steps"]) == 1  # equal step counts on every rank (DDP)
    assert sorted(got["seen"]) == list(range(sum(shards)))
    assert all(len(units) == 1 for units in got["readers"].values())


@pytest.mark.parametrize("world", [2, 3, 8])
def test_ranks_are_within_one_shard_of_each_other(world: int) -> None:
    shards = [5, 9, 3, 9, 9, 1, 7, 9, 9, 2, 9, 9]
    real = []
    for rank in range(world):
        s = RowSampler(shards, 2, order="streaming", rank=rank, world_size=world, seed=1)
        real.append(sum(b.num_real for b in s))
    assert sum(real) == sum(shards)
    assert max(real) - min(real) <= max(shards)


def test_a_dataloader_collects_workers_in_the_planned_order() -> None:
    """The simulation above is what torch does: real worker processes, before and after an
    exact resume mid-epoch (which shifts the worker that delivers first)."""
    s = RowSampler(SHORT_LAST, 2, order="streaming", seed=4, rank=1, world_size=2, num_workers=2)
    plan = [b.rows.tolist() for b in s]
    delivered = [b["rows"] for b in DataLoader(RowIds(s), batch_size=None, num_workers=2)]
    assert delivered == plan
    s.advance(3)
    rest = [b["rows"] for b in DataLoader(RowIds(s), batch_size=None, num_workers=2)]
    assert rest == plan[3:]


class RowIds(IterableDataset):
    def __init__(self, sampler: RowSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Any:
        for b in self.sampler.iter_batches():
            yield {"rows": b.rows.tolist(), "is_pad": b.is_pad.tolist()}


class RowIdsMap(Dataset):
    def __getitem__(self, batch: RowBatch) -> dict[str, torch.Tensor]:
        return {"rows": torch.from_numpy(batch.rows), "is_pad": torch.from_numpy(batch.is_pad)}


def test_map_style_dataloader_with_workers_keeps_the_order() -> None:
    sampler = RowSampler(SHARDS, 3, seed=5, rank=0, world_size=2, num_workers=2)
    loader = DataLoader(RowIdsMap(), sampler=sampler, batch_size=None, num_workers=2)
    assert [b["rows"].tolist() for b in loader] == [b.rows.tolist() for b in sampler]


def take(shards: list[int], world: int, workers: int, batch: int, state: Any, steps: Any) -> Any:
    """Run every rank for ``steps`` steps (None: to the end) from ``state``; return the real rows
    served, each rank's delivered batches and rank 0's state after those steps (via JSON)."""
    rows, per_rank, out_state = [], [], None
    for rank in range(world):
        s = RowSampler(
            shards, batch, order="streaming", seed=9, window_shards=2, rank=rank, world_size=world
        )
        s.num_workers = workers
        if state is not None:
            s.load_state_dict(json.loads(json.dumps(state)))
        got = collect(s, workers)[:steps]
        per_rank.append([b.rows.tolist() for b in got])
        rows += [r for b in got for r in b.rows[~b.is_pad].tolist()]
        s.advance(len(got))
        out_state = out_state or s.state_dict()
    return rows, per_rank, out_state


@pytest.mark.parametrize("workers", [0, 2, 4])
def test_resume_with_the_same_settings_is_exact(workers: int) -> None:
    _, full, _ = take(SHORT_LAST, 3, workers, 2, None, None)
    _, head, state = take(SHORT_LAST, 3, workers, 2, None, 2)
    _, tail, _ = take(SHORT_LAST, 3, workers, 2, state, None)
    assert [h + t for h, t in zip(head, tail, strict=True)] == full


@pytest.mark.parametrize(
    "chain",
    [
        [(2, 2, 3, 2), (3, 0, 2, None)],  # another world size, workers and batch size
        [(1, 0, 4, 1), (8, 4, 1, 1), (64, 1, 1, None)],
        [(3, 1, 2, 1), (3, 2, 2, 2), (3, 1, 2, 1), (2, 4, 3, None)],  # back to an old setting
        [(2, 2, 2, 1), (2, 2, 2, None)],  # same settings: exact continuation
    ],
)
@pytest.mark.parametrize("shards", [SHARDS, SHORT_LAST], ids=["uneven", "short-last"])
def test_resume_with_other_settings_serves_every_row_once(
    chain: list[tuple[int, int, int, int | None]], shards: list[int]
) -> None:
    seen: list[int] = []
    state = None
    for world, workers, batch, steps in chain:
        rows, _, state = take(shards, world, workers, batch, state, steps)
        seen += rows
    assert sorted(seen) == list(range(sum(shards)))


def test_state_records_segments_and_round_trips_through_json() -> None:
    s = RowSampler(SHARDS, 2, order="streaming", seed=11, window_shards=3, num_workers=2)
    s.set_epoch(4)
    s.advance(3)
    state = s.state_dict()
    assert json.loads(json.dumps(state)) == state
    assert state["segments"] == [[1, 2, 2, False, 3]]
    assert state["consumed_rows"] == 6
    t = RowSampler(SHARDS, 5, order="streaming", seed=0, window_shards=3)
    t.load_state_dict(json.loads(json.dumps(state)))
    assert (t.epoch, t.seed, t.consumed_rows) == (4, 11, 6)
    t.advance(1)
    assert t.state_dict()["segments"] == [[1, 2, 2, False, 3], [1, 1, 5, False, 1]]
    assert t.consumed_rows == 11


def test_drop_last_drops_only_partial_batches() -> None:
    seen, steps = [], set()
    for rank in range(2):
        s = RowSampler(SHORT_LAST, 4, rank=rank, world_size=2, drop_last=True, num_workers=2)
        batches = collect(s, 2)
        steps.add(len(batches))
        assert not any(b.is_pad.any() for b in batches)
        seen += [r for b in batches for r in b.rows.tolist()]
    assert len(steps) == 1
    assert len(set(seen)) == len(seen) >= sum(SHORT_LAST) - 2 * (4 - 1) - 2 * 6


def test_orders_depend_on_seed_and_epoch_and_are_reproducible() -> None:
    shards = [50] * 8
    runs = {
        (seed, epoch): tuple(r for b in sampler_at(shards, seed, epoch) for r in b.rows.tolist())
        for seed in (0, 1)
        for epoch in (0, 1)
    }
    assert len(set(runs.values())) == 4
    assert runs[(0, 1)] == tuple(r for b in sampler_at(shards, 0, 1) for r in b.rows.tolist())
    seq = RowSampler(shards, 4, order="sequential")
    seq.set_epoch(3)
    assert [r for b in seq for r in b.rows.tolist()] == list(range(400))


def sampler_at(shards: list[int], seed: int, epoch: int) -> RowSampler:
    s = RowSampler(shards, 4, seed=seed, order="streaming")
    s.set_epoch(epoch)
    return s


def test_order_is_pinned() -> None:
    # If this fails the assignment or shuffle changed: bump ORDER_VERSION so old states are refused.
    assert ORDER_VERSION == 2
    first = next(iter(RowSampler(SHARDS, 6, seed=0)))
    assert first.rows.tolist() == PINNED_RANDOM
    streaming = next(iter(RowSampler(SHARDS, 6, order="streaming", window_shards=2)))
    assert streaming.rows.tolist() == PINNED_STREAMING


PINNED_RANDOM = [3, 18, 4, 16, 14, 7]
PINNED_STREAMING = [16, 17, 10, 12, 8, 11]


def test_a_process_holds_at_most_a_window_of_shards_at_once() -> None:
    shards = [10, 3, 0, 12, 7, 9, 4, 11, 5]
    s = RowSampler(shards, 2, order="streaming", seed=2, window_shards=2, num_workers=2)
    for w in range(2):
        rows = np.concatenate([b.rows[~b.is_pad] for b in s.iter_batches(w, 2)])
        shard, _ = s.locate(rows)
        first = {int(x): np.flatnonzero(shard == x).min() for x in np.unique(shard)}
        last = {int(x): np.flatnonzero(shard == x).max() for x in np.unique(shard)}
        open_at = [sum(first[x] <= i <= last[x] for x in first) for i in range(len(rows))]
        assert max(open_at) <= 2
        assert sorted(first) == sorted(s.unit_shards(w))


def test_load_state_refuses_another_cache_or_order_and_reads_old_states_at_epoch_start() -> None:
    state = RowSampler(SHARDS, 2).state_dict()
    with pytest.raises(ConfigError, match="shards"):
        RowSampler([8, 0, 5, 7, 3], 2).load_state_dict(state)
    with pytest.raises(ConfigError, match="order"):
        RowSampler(SHARDS, 2, order="streaming").load_state_dict(state)
    with pytest.raises(ConfigError, match="lacks"):
        RowSampler(SHARDS, 2).load_state_dict({"epoch": 0})
    with pytest.raises(ConfigError, match="segment"):
        RowSampler(SHARDS, 2).load_state_dict({**state, "segments": [[1, 1, 2, 0]]})
    with pytest.raises(ConfigError, match="only"):
        RowSampler(SHARDS, 2).load_state_dict({**state, "segments": [[1, 1, 2, False, 99]]})
    old = {**state, "order_version": 1, "window": None, "consumed_rows": 0, "epoch": 3}
    del old["segments"]
    s = RowSampler(SHARDS, 2)
    s.load_state_dict(old)
    assert (s.epoch, s.consumed_rows) == (3, 0)
    with pytest.raises(ConfigError, match="order_version"):
        s.load_state_dict({**old, "consumed_rows": 4})


def test_epoch_end_and_bad_arguments() -> None:
    s = RowSampler(SHARDS, 4, rank=1, world_size=2)
    s.advance(len(s))
    assert len(s) == 0 and list(s) == []
    with pytest.raises(LoaderError, match="set_epoch"):
        s.advance()
    s.set_epoch(1)
    assert len(s) == s.steps_per_epoch > 0
    for kwargs in ({"rank": 2, "world_size": 2}, {"order": "shuffle"}, {"seed": -1}):
        with pytest.raises(ConfigError):
            RowSampler(SHARDS, 4, **kwargs)
    with pytest.raises(ConfigError, match="no rows"):
        RowSampler([0, 0], 4)
    with pytest.raises(ConfigError):
        RowSampler(SHARDS, 0)
    with pytest.raises(ConfigError):
        s.locate(np.array([N]))
    with pytest.raises(ConfigError, match="num_workers=3"):
        list(RowSampler(SHARDS, 4, num_workers=2).iter_batches(0, 3))


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
