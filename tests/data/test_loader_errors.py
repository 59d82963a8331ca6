"""Loader failures: damaged and incomplete caches, dead or stuck workers, and clean shutdown."""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from loader_cache import build_cache
from torch.utils.data import DataLoader, Dataset

from logitcache.data import make_loader
from logitcache.data.loader import _guarded
from logitcache.errors import (
    CacheIncompleteError,
    ChecksumMismatchError,
    LoaderError,
    ShardMissingError,
)


def damage_second_shard(url: str) -> str:
    """Flip bytes in the biggest file of shard 1; returns the shard's path."""
    manifest = json.loads((Path(url) / "manifest.json").read_text())
    shard = manifest["shards"][1]
    f = Path(url) / max(shard["files"], key=lambda f: f["bytes"])["path"]
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    return str(shard["path"])


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("order", ["sequential", "random"])
def test_damaged_shard_raises_naming_it(tmp_path: Path, workers: int, order: str) -> None:
    url = build_cache(tmp_path / "c")
    name = damage_second_shard(url)
    loader = make_loader(url, 4, order=order, num_workers=workers)
    with pytest.raises(ChecksumMismatchError, match=name.replace(".", r"\.")):
        for _ in loader:
            pass
    del loader


def test_incomplete_cache_is_refused(tmp_path: Path) -> None:
    url = build_cache(tmp_path / "c")
    os.remove(Path(url) / "manifest.json")
    with pytest.raises(CacheIncompleteError, match="incomplete"):
        make_loader(url, 4)


class _Dies(Dataset[dict[str, Any]]):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> dict[str, Any]:
        if i == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return {"x": torch.tensor([i])}


class _Stuck(_Dies):
    def __getitem__(self, i: int) -> dict[str, Any]:
        time.sleep(2)
        return {"x": torch.tensor([i])}


@pytest.mark.dist
def test_dead_worker_is_a_loader_error_not_a_hang() -> None:
    dl = DataLoader(_Dies(), batch_size=None, num_workers=1, timeout=20)
    t0 = time.monotonic()
    with pytest.raises(LoaderError, match="worker"):
        for _ in _guarded(iter(dl), 20):
            pass
    assert time.monotonic() - t0 < 15


@pytest.mark.dist
def test_stuck_worker_times_out_with_a_loader_error() -> None:
    dl = DataLoader(_Stuck(), batch_size=None, num_workers=1, timeout=0.3)
    with pytest.raises(LoaderError, match=r"timeout=0\.3"):
        for _ in _guarded(iter(dl), 0.3):
            pass


def loader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("logitcache-")]


@pytest.mark.parametrize("workers", [0, 2])
def test_nothing_left_running_after_the_loader_is_deleted(tmp_path: Path, workers: int) -> None:
    url = build_cache(tmp_path / "c")
    loader = make_loader(url, 2, num_workers=workers, background=True)
    it = iter(loader)
    next(it)
    next(it)
    assert loader_threads()  # the prefetch thread (and, in-process, the read-ahead pool)
    del it, loader
    gc.collect()
    deadline = time.monotonic() + 10
    while (loader_threads() or multiprocessing.active_children()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not loader_threads()
    assert not multiprocessing.active_children()


def test_removed_cache_fails_cleanly(tmp_path: Path) -> None:
    url = build_cache(tmp_path / "c")
    loader = make_loader(url, 2)
    shutil.rmtree(Path(url) / "shards")
    with pytest.raises(ShardMissingError, match="missing"):
        next(iter(loader))
