"""The shard-aware assignment of one segment of an epoch: which process reads which rows, and when.

A *unit* is one reading process: DataLoader worker ``w`` of rank ``r`` (``W = max(1,
num_workers)`` units per rank). :class:`SegmentPlan` is a pure function of the rows still to be
served (a boolean mask over the cache's rows), the shard order of the epoch, the segment's
``(world_size, workers, batch_size, drop_last)`` and the shuffle key ``(seed, epoch, window)``:

1. **Shards to ranks, whole.** Shards with remaining rows, in the epoch's shard order, go one by
   one to the rank holding the fewest rows so far (ties: the lowest rank). Each rank then deals
   its shards the same way to its ``W`` units. A shard belongs to exactly one unit, so it is
   fetched and decoded once per epoch over all ranks and workers (read amplification 1 when every
   unit owns a shard). Greedy-to-the-lightest keeps ranks within one shard's rows of each other:
   when a shard joins the lightest rank, that rank ends at most one shard above the others.
2. **Rows within a unit.** The unit's rows (its shards in order, rows ascending) are shuffled
   within *windows* of ``window`` consecutive shards (hash of ``(seed, epoch, row)``, no numpy
   RNG) and cut into batches of ``batch_size``; a unit's last partial batch is filled with
   ``is_pad`` repeats of that batch's own rows (so no other shard is needed).
3. **Equal steps per rank (DDP).** A rank's step count is the sum of its units' batch counts;
   ranks below the largest get whole padding batches (repeats of a unit's last rows), appended
   to their shortest unit. Padding is at most ``batch_size - 1`` rows per unit plus the rank
   imbalance (at most one shard's rows plus a batch) per rank. ``drop_last`` drops instead: only
   full batches, and every rank stops at the smallest rank's count.
4. **Delivery order.** A rank delivers its units' batches round-robin, skipping a unit that has
   run out: exactly how a DataLoader over an ``IterableDataset`` collects from its workers.

Everything here is integer arithmetic on the shard sizes except the within-window sort, so every
process rebuilds the same plan; :meth:`SegmentPlan.consumed` replays the first ``k`` steps of all
ranks (an elastic resume needs the rows a previous world size already served).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from logitcache.errors import ConfigError

__all__ = ["Segment", "SegmentPlan", "hash_keys"]

_U64 = np.uint64


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A bijection on uint64 with good avalanche (Steele et al.); wraps on overflow by design."""
    x = x + _U64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


def hash_keys(seed: int, epoch: int, stream: int, ids: np.ndarray) -> np.ndarray:
    """Distinct uint64 keys for distinct ``ids``, a fixed function of ``(seed, epoch, stream)``."""
    base = np.zeros(1, dtype=_U64)
    for part in (seed, epoch, stream):
        base = _splitmix64(base ^ _U64(part))
    # xor with a constant and splitmix64 are both bijections: distinct ids give distinct keys.
    with np.errstate(over="ignore"):
        return _splitmix64(ids.astype(_U64) ^ base)


@dataclass(frozen=True)
class Segment:
    """The settings a run iterated part of an epoch with (one entry of the resume state)."""

    world_size: int
    workers: int
    batch_size: int
    drop_last: bool

    def __post_init__(self) -> None:
        for name in ("world_size", "workers", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"segment {name} must be an integer >= 1, got {value!r}")


def _greedy(loads: list[int], items: list[tuple[int, int]]) -> list[list[int]]:
    """Deal ``(id, weight)`` items in order to the lightest bin (ties: lowest bin)."""
    heap = [(load, b) for b, load in enumerate(loads)]
    heapq.heapify(heap)
    out: list[list[int]] = [[] for _ in loads]
    for item, weight in items:
        load, b = heapq.heappop(heap)
        out[b].append(item)
        heapq.heappush(heap, (load + weight, b))
    return out


class SegmentPlan:
    """Units, their rows and batches, and each rank's delivery order, for one segment."""

    def __init__(
        self,
        remaining: np.ndarray,
        offsets: np.ndarray,
        shard_order: np.ndarray,
        segment: Segment,
        shuffle: tuple[int, int, int, int] | None,
    ) -> None:
        """``remaining``: bool [rows]; ``offsets``: [shards + 1]; ``shard_order``: shard ids in
        the epoch's order; ``shuffle``: ``(seed, epoch, hash stream, window)`` or None."""
        self.remaining = remaining
        self.offsets = offsets
        self.segment = segment
        self.shuffle = shuffle
        cum = np.concatenate([[0], np.cumsum(remaining, dtype=np.int64)])
        counts = cum[offsets[1:]] - cum[offsets[:-1]]
        items = [(int(s), int(counts[s])) for s in shard_order if counts[s] > 0]
        world, w, b = segment.world_size, segment.workers, segment.batch_size
        per_rank = _greedy([0] * world, items)
        self.unit_shards: list[list[list[int]]] = []
        for shards in per_rank:
            mine = [(s, int(counts[s])) for s in shards]
            self.unit_shards.append(_greedy([0] * w, mine))
        self.unit_rows_count = np.array(
            [[sum(int(counts[s]) for s in u) for u in rank] for rank in self.unit_shards],
            dtype=np.int64,
        ).reshape(world, w)
        n = self.unit_rows_count
        full = n // b
        self.batches = full.copy() if segment.drop_last else -(-n // b)
        if segment.drop_last:
            self.steps = int(self.batches.sum(axis=1).min()) if world else 0
        else:
            self.steps = int(self.batches.sum(axis=1).max())
            for r in range(world):  # equal steps: whole padding batches on the shortest unit
                for _ in range(self.steps - int(self.batches[r].sum())):
                    have = [u for u in range(w) if n[r, u] > 0] or [0]
                    u = min(have, key=lambda x: (self.batches[r, x], x))
                    self.batches[r, u] += 1
        first = np.flatnonzero(remaining)
        self._fallback = int(first[0]) if first.size else 0
        self._rows: dict[tuple[int, int], np.ndarray] = {}

    # -- per unit ------------------------------------------------------------------------------

    def unit_rows(self, rank: int, unit: int) -> np.ndarray:
        """int64: the unit's real rows in delivery order (window-shuffled)."""
        key = (rank, unit)
        hit = self._rows.get(key)
        if hit is not None:
            return hit
        parts = []
        window_of = []
        for i, s in enumerate(self.unit_shards[rank][unit]):
            lo, hi = int(self.offsets[s]), int(self.offsets[s + 1])
            rows = np.flatnonzero(self.remaining[lo:hi]) + lo
            parts.append(rows)
            if self.shuffle is not None:
                window_of.append(np.full(len(rows), i // self.shuffle[3], dtype=np.int64))
        rows = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
        if self.shuffle is not None and rows.size:
            seed, epoch, stream, _ = self.shuffle
            keys = hash_keys(seed, epoch, stream, rows)
            rows = rows[np.lexsort((keys, np.concatenate(window_of)))]
        self._rows[key] = rows
        return rows

    def batch(self, rank: int, unit: int, j: int) -> tuple[np.ndarray, np.ndarray]:
        """``(rows [b] int64, is_pad [b] bool)`` of the unit's ``j``-th batch."""
        b = self.segment.batch_size
        rows = self.unit_rows(rank, unit)
        pos = j * b + np.arange(b, dtype=np.int64)
        is_pad = pos >= len(rows)
        out = np.empty(b, dtype=np.int64)
        out[~is_pad] = rows[pos[~is_pad]]
        if is_pad.any():
            if len(rows):  # cycle through the last real batch: its shards are the loaded ones
                last = ((len(rows) - 1) // b) * b
                out[is_pad] = rows[last + (pos[is_pad] - len(rows)) % (len(rows) - last)]
            else:
                out[is_pad] = self._fallback
        return out, is_pad

    # -- per rank ------------------------------------------------------------------------------

    @cached_property
    def _sequences(self) -> list[np.ndarray]:
        out = []
        for r in range(self.segment.world_size):
            c = self.batches[r]
            units = np.repeat(np.arange(len(c)), c)
            rounds = np.concatenate([np.arange(x) for x in c]) if len(c) else units
            out.append(units[np.lexsort((units, rounds))][: self.steps])
        return out

    def sequence(self, rank: int) -> np.ndarray:
        """int64 [steps]: the unit that delivers each of the rank's steps (round-robin, a unit
        that has run out skipped); its ``j``-th appearance is its batch ``j``."""
        return self._sequences[rank]

    def delivered(self, rank: int, steps: int) -> np.ndarray:
        """int64 [W]: batches each unit of ``rank`` has delivered after ``steps`` steps."""
        return np.bincount(self.sequence(rank)[:steps], minlength=self.segment.workers)

    def consumed(self, steps: int) -> np.ndarray:
        """bool [rows]: the real rows all ranks were served in the first ``steps`` steps."""
        out = np.zeros_like(self.remaining)
        b = self.segment.batch_size
        for r in range(self.segment.world_size):
            for u, d in enumerate(self.delivered(r, steps).tolist()):
                out[self.unit_rows(r, u)[: d * b]] = True
        return out

    def consumed_count(self, steps: int) -> int:
        """How many real rows the first ``steps`` steps served (no shuffle needed)."""
        b = self.segment.batch_size
        total = 0
        for r in range(self.segment.world_size):
            d = self.delivered(r, steps)
            total += int(np.minimum(d * b, self.unit_rows_count[r]).sum())
        return total
