"""DevicePrefetcher on CPU: same tensors as plain iteration, transform, wait stats, shutdown."""

from __future__ import annotations

import gc
import multiprocessing
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from logitcache.data.prefetch import DequantizeFields, DevicePrefetcher, dequantize_table
from logitcache.errors import ConfigError


def batches(n: int = 6) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    return [
        {
            "input_ids": torch.randint(0, 1000, (2, 5), generator=g, dtype=torch.int32),
            "codes": torch.randint(0, 256, (2, 5, 3), generator=g).to(torch.uint8),
            "name": f"batch{i}",
        }
        for i in range(n)
    ]


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "logitcache-prefetch"]


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.keys() != b.keys():
        return False
    return all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a
    )


@pytest.mark.parametrize("background", [False, True])
def test_yields_the_same_batches_as_plain_iteration(background: bool) -> None:
    plain = batches()
    got = list(DevicePrefetcher(iter(batches()), "cpu", background=background))
    assert len(got) == len(plain) and all(same(a, b) for a, b in zip(got, plain, strict=True))
    assert not prefetch_threads()


@pytest.mark.parametrize("background", [False, True])
def test_transform_dequantises_codes(background: bool) -> None:
    table = torch.linspace(-20.0, 0.0, 256)
    transform = DequantizeFields({"codes": ("logprobs", table)})
    p = DevicePrefetcher(batches(), "cpu", transform=transform, background=background)
    for got, raw in zip(p, batches(), strict=True):
        assert "codes" not in got and got["logprobs"].dtype == torch.float32
        assert torch.equal(got["logprobs"], table[raw["codes"].long()])
        assert torch.equal(got["input_ids"], raw["input_ids"])
    assert p.batches == 6


def test_dequantize_table_checks() -> None:
    table = torch.arange(4, dtype=torch.float32) * 0.5
    codes = torch.tensor([[3, 0], [1, 2]], dtype=torch.uint8)
    assert torch.equal(dequantize_table(codes, table), torch.tensor([[1.5, 0.0], [0.5, 1.0]]))
    assert dequantize_table(codes.to(torch.int16)[:0], table).shape == (0, 2)
    with pytest.raises(ConfigError, match="table has 4"):
        dequantize_table(torch.tensor([4]), table)
    with pytest.raises(ConfigError, match="integer"):
        dequantize_table(torch.tensor([1.0]), table)
    with pytest.raises(ConfigError, match="1-D"):
        dequantize_table(codes, table.reshape(2, 2))
    with pytest.raises(ConfigError, match="no field"):
        DequantizeFields({"missing": ("x", table)})({"codes": codes})


def slow_source(n: int, delay: float) -> Iterator[dict[str, Any]]:
    for i in range(n):
        time.sleep(delay)
        yield {"x": torch.full((2,), i)}


def test_wait_seconds_counts_time_blocked_on_data() -> None:
    p = DevicePrefetcher(slow_source(3, 0.05), "cpu", background=False)
    assert [int(b["x"][0]) for b in p] == [0, 1, 2]
    assert 0.14 < p.wait_seconds < 2.0
    assert p.stats() == {"batches": 3.0, "wait_seconds": p.wait_seconds}


def test_close_mid_iteration_stops_the_thread() -> None:
    before = set(threading.enumerate())
    p = DevicePrefetcher(slow_source(1000, 0.001), "cpu", background=True, depth=2)
    assert int(next(p)["x"][0]) == 0
    assert int(next(p)["x"][0]) == 1
    assert prefetch_threads()
    p.close()
    assert set(threading.enumerate()) <= before
    with pytest.raises(StopIteration):
        next(p)


def test_deleting_the_prefetcher_stops_the_thread() -> None:
    before = set(threading.enumerate())
    p = DevicePrefetcher(slow_source(1000, 0.001), "cpu", background=True)
    next(p)
    del p
    gc.collect()
    deadline = time.monotonic() + 5
    while prefetch_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert set(threading.enumerate()) <= before
    with DevicePrefetcher(slow_source(1000, 0.001), "cpu", background=True) as q:
        next(q)
    assert set(threading.enumerate()) <= before


def failing_source() -> Iterator[dict[str, Any]]:
    yield {"x": torch.zeros(1)}
    raise RuntimeError("shard 3 is unreadable")


@pytest.mark.parametrize("background", [False, True])
def test_source_errors_reach_the_consumer_in_order(background: bool) -> None:
    p = DevicePrefetcher(failing_source(), "cpu", background=background)
    assert torch.equal(next(p)["x"], torch.zeros(1))
    with pytest.raises(RuntimeError, match="shard 3"):
        next(p)
    assert not prefetch_threads()


class Counting(IterableDataset):
    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for i in range(8):
            yield {"x": torch.tensor([i])}


def test_wraps_a_dataloader_with_workers_and_leaves_nothing_running() -> None:
    before = set(threading.enumerate())
    loader = DataLoader(Counting(), batch_size=None, num_workers=1)
    p = DevicePrefetcher(loader, "cpu", background=True)
    assert [int(b["x"]) for b in p] == list(range(8))
    del p, loader
    gc.collect()
    # multiprocessing's queue feeder threads end asynchronously after the DataLoader closes its
    # queues: give them a moment to finish, then nothing may be left
    deadline = time.monotonic() + 5.0
    while not set(threading.enumerate()) <= before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert set(threading.enumerate()) <= before, set(threading.enumerate()) - before
    assert not multiprocessing.active_children()


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="depth"):
        DevicePrefetcher([], "cpu", depth=0)
    with pytest.raises(ConfigError, match="dicts"):
        next(DevicePrefetcher([torch.zeros(1)], "cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            DevicePrefetcher([], "cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("background", [False, True])
def test_cuda_copies_and_dequantises_like_the_cpu(background: bool) -> None:
    table = torch.linspace(-20.0, 0.0, 256)
    transform = DequantizeFields({"codes": ("logprobs", table)})
    host = [
        {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in b.items()}
        for b in batches()
    ]
    got = list(DevicePrefetcher(host, "cuda", transform=transform, background=background))
    for g, raw in zip(got, batches(), strict=True):
        assert g["logprobs"].is_cuda and g["input_ids"].is_cuda
        expect = transform(raw)
        assert all(torch.equal(g[k].cpu(), expect[k]) for k in ("logprobs", "input_ids"))
    assert not prefetch_threads()
