"""Worker batch buffers: lent from a per-worker ring of shared segments, copied out once, reused.

Real DataLoader worker processes; the batches carry their index so that a slot overwritten too
early would show up as a wrong value.
"""

from __future__ import annotations

import gc
import pickle
from typing import Any

import numpy as np
import torch
import torch.utils.data

from logitcache.data import _packing
from logitcache.data._packing import SharedBuffer, materialize, pack, prune_rings, unpack

N_BATCHES = 20


class Numbered(torch.utils.data.IterableDataset[dict[str, Any]]):
    """Batch i holds ``x = full(1000 + i, i)``: each a different size and content."""

    def __iter__(self) -> Any:
        for i in range(N_BATCHES):
            yield pack({"x": np.full(1000 + i, i, dtype=np.int64), "i": i})


def _loader() -> torch.utils.data.DataLoader[dict[str, Any]]:
    return torch.utils.data.DataLoader(Numbered(), batch_size=None, num_workers=1)


def _check(batch: dict[str, Any]) -> None:
    x = unpack(batch)["x"]
    i = batch["i"]
    assert x.shape == (1000 + i,) and bool((x == i).all()), f"batch {i} was overwritten"


def test_batches_reuse_a_few_segments_and_arrive_intact() -> None:
    seen = []
    for batch in _loader():
        assert isinstance(batch["packed"], SharedBuffer)  # a token, not a fresh segment
        _check(batch)
        seen.append(batch["i"])
    assert seen == list(range(N_BATCHES))
    prune_rings()


def test_held_batches_are_never_overwritten() -> None:
    held = list(_loader())  # nothing taken: the ring runs dry, later batches get their own segment
    assert sum(isinstance(b["packed"], SharedBuffer) for b in held) <= _packing._RING_SLOTS
    for batch in reversed(held):
        _check(batch)


def test_dropped_batches_free_their_slot() -> None:
    it = iter(_loader())
    first = next(it)
    del first
    gc.collect()
    rest = list(it)  # kept but not taken: the dropped batch's slot is lent again
    lent = [b for b in rest if isinstance(b["packed"], SharedBuffer)]
    assert len(lent) == _packing._RING_SLOTS
    for batch in rest:
        _check(batch)


def test_leased_views_keep_their_slot_until_collected() -> None:
    kept = []
    for batch in _loader():
        i = batch["i"]
        kept.append((i, unpack(batch)["x"]))  # a view into the slot; the batch dict is dropped
    for i, x in kept:
        assert x.shape == (1000 + i,) and bool((x == i).all()), f"batch {i} was overwritten"
    rings = list(_packing._RINGS.values())
    assert rings and any(r.flags.any() for r in rings)  # the kept views still hold slots
    del kept, x
    gc.collect()
    assert not any(r.flags.any() for r in rings)
    prune_rings()


def test_a_taken_buffer_cannot_be_read_twice_and_pickles_as_bytes() -> None:
    batch = next(iter(_loader()))
    copy = pickle.loads(pickle.dumps(batch))  # takes the slot: the copy owns the bytes
    _check(copy)
    assert isinstance(copy["packed"], torch.Tensor)
    try:
        materialize(batch["packed"])
    except Exception as exc:
        assert "already read" in str(exc)
    else:
        raise AssertionError("a second take must fail")


def test_rings_of_exited_workers_are_dropped() -> None:
    for batch in _loader():
        _check(batch)
    gc.collect()
    prune_rings()
    assert _packing._RINGS == {}
