"""Which rows of the cache each rank and DataLoader worker reads, in which order, and how to resume.

The sampler knows nothing about shards' contents: only how many rows each shard holds. For each
epoch it **assigns whole shards to reading processes**: a *unit* is DataLoader worker ``w`` of
rank ``r`` (``W = max(1, num_workers)`` units per rank, ``world_size * W`` in all). Each unit
reads only its own shards, so every shard is fetched and decoded **once per epoch over all ranks
and workers** (before this design every rank and worker read every shard of a window: 256 reads
of each shard at 64 ranks x 4 workers). The plan (``_assignment.py``) is a pure function of
``(seed, epoch, world_size, num_workers, batch_size, drop_last)`` and the shard sizes:

1. shards in the epoch's order go whole, one by one, to the rank with the fewest rows, then each
   rank's shards to its lightest unit: no rank is more than one shard's rows ahead of another;
2. a unit's rows are shuffled within **windows** of ``window_shards`` consecutive shards of its
   own and cut into batches; a rank delivers its units' batches round-robin (a unit that has run
   out is skipped), which is the order a DataLoader collects from the workers of an
   ``IterableDataset``. A map-style DataLoader deals batch ``i`` to worker ``i % W``: the same
   unit while the units' batch counts are equal (all but the epoch's last few batches).

Orders (``order=``):

- ``"streaming"``: shards in a hashed order per epoch; windows of ``window_shards`` shards
  (default 4); for :class:`~logitcache.data.StreamingLogitDataset`, which reads a window's shards
  ahead and drops each after its last use.
- ``"random"``: the same with its own hash streams, for map-style (random access) datasets: a
  unit's rows are drawn from *blocks* of ``window_shards`` shards, so its shard LRU (at least two
  blocks) hits on every row but a block's first ones, at any world size; read amplification is
  that of streaming (1.0 when every unit owns a shard).
- ``"sequential"``: shards in cache order, rows ascending within each unit, for evaluation (one
  rank, one worker: rows 0..N-1).

Shuffle quality: a rank's batch mixes rows of the shards of one window (measured at batch 8,
window 4: ~3.6 distinct shards) and a global batch those of ``world_size`` disjoint windows.
Shuffles hash ``(seed, epoch, row)`` with splitmix64 and sort the hashes, never ``numpy.random``,
whose streams may change between numpy versions; ``ORDER_VERSION`` in the state guards the
algorithm.

Splits (``split=("train" | "eval", fraction)``): :func:`split_mask` holds out a fixed,
seed-independent ``fraction`` of the rows (by a hash of the global row index); the "train" sampler
never yields them and the "eval" sampler yields only them.

**Uneven rows under DDP.** Every rank must take the same number of optimizer steps, or DDP hangs.
With ``drop_last=False`` (default, what the trainer uses) nothing is dropped: a unit's last batch
is filled with repeats of its own rows and a rank with fewer batches than the longest gets whole
padding batches; every batch has exactly ``batch_size`` rows (static shapes), and each
:class:`RowBatch` carries ``is_pad`` (the collate zeroes those rows' loss mask, so counting only
non-padded rows every row is seen exactly once per epoch; losses normalised by the all-reduced
count are unchanged). Padding is at most ``batch_size - 1`` rows per unit plus one shard's rows
and one batch per rank, e.g. <1% of the steps with 120-row shards and 60 shards per rank; it is
the price of reading each shard once. With ``drop_last=True`` a unit's partial batch is dropped
and every rank stops at the smallest rank's step count (those rows are skipped this epoch).

**Resume.** The trainer calls :meth:`RowSampler.advance` after each step (the DataLoader
prefetches ahead: only the loop knows what it finished). :meth:`state_dict` stores the epoch, the
seed, and the epoch's **segments**: ``[world_size, W, batch_size, drop_last, steps]`` for each run
of settings the epoch was iterated with. The rule:

- *same settings*: the last segment continues where it stopped: the same remaining rows, in the
  same order, per rank (exact). Its DataLoader worker ``j`` plays the ``j``-th unit in the order
  the remaining steps first need them, so the round-robin collection order is the old one.
- *other world size, workers, batch size or drop_last*: a new segment starts. Proof that every row
  is still served exactly once: let ``R_0`` be the epoch's rows and ``R_{i+1} = R_i \\ C_i``,
  where ``C_i`` is what segment ``i``'s first ``k_i`` steps served. The plan of segment ``i`` is a
  function of ``R_i`` and its settings only (step 1 above deals every shard with rows in ``R_i``
  to one unit, and a unit serves each of its rows once), so every process, now or at any later
  resume, rebuilds the same ``C_i`` from the state: ``C_i`` are disjoint subsets of ``R_0``, and
  the last segment serves all of ``R_last``. The union is ``R_0``, with no row twice.
  A shard a previous segment was halfway through is read again by its new unit (at most a
  window per old unit, once per resume).

A state whose cache (row count, shard sizes) or order settings differ is refused with
:class:`ConfigError`; a state of the older global-order sampler (``order_version`` 1) is accepted
at an epoch boundary only. Workers copy the sampler when they start, so use
``persistent_workers=False`` (the default): each ``iter(loader)`` then sees the current state.

Cost: planning is O(shards log ranks) per epoch in each process; a unit's rows are sorted within
windows (O(rows/units log)); replaying earlier segments at a resume touches every row once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import astuple, dataclass
from typing import Any

import numpy as np
import torch.utils.data

from logitcache._distributed import current_rank_world
from logitcache.data._assignment import Segment, SegmentPlan, hash_keys
from logitcache.errors import ConfigError, LoaderError

__all__ = ["ORDERS", "ORDER_VERSION", "SPLITS", "RowBatch", "RowSampler", "split_mask"]

ORDERS = ("random", "streaming", "sequential")
ORDER_VERSION = 2
_STATE_KEYS = frozenset(
    {"order_version", "epoch", "seed", "num_rows", "shards", "order", "window", "split"}
)
_U64 = np.uint64
_HASH_STREAMS = {"random": (4, 5), "streaming": (1, 2)}  # (shard order, rows in windows)


@dataclass(frozen=True, eq=False)
class RowBatch:
    """One rank's rows for one global step.

    ``rows``: [batch_size] int64 global row ids; ``is_pad``: [batch_size] bool, True for repeats
    that only fill a batch (mask them out of the loss); ``epoch`` and ``start`` (the step's index
    in the epoch, steps of earlier segments included) identify the step.
    """

    epoch: int
    start: int
    rows: np.ndarray
    is_pad: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def num_real(self) -> int:
        """How many rows are not padding."""
        return int(len(self.rows) - np.count_nonzero(self.is_pad))


SPLITS = ("train", "eval")
_SPLIT_SEED = 0x5EED_E7A1  # fixed: the held-out rows do not change with the training seed


def split_mask(num_rows: int, name: str, fraction: float) -> np.ndarray:
    """bool [num_rows]: the global rows in split ``name`` when ``fraction`` of them are held out.

    A row is held out ("eval") when the hash of its global index falls below ``fraction``: a
    fixed, seed-independent selection spread over all shards, so every run on a cache evaluates
    on the same rows and the two splits never overlap.
    """
    if name not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {name!r}")
    if not 0.0 < float(fraction) < 1.0:
        raise ConfigError(f"held-out fraction must be in (0, 1), got {fraction!r}")
    keys = hash_keys(_SPLIT_SEED, 0, 3, np.arange(num_rows, dtype=np.int64))
    held_out = keys < _U64(int(float(fraction) * 2.0**64))
    return held_out if name == "eval" else ~held_out


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class RowSampler:
    """Deterministic, resumable, shard-aware split of a cache's rows over ranks and workers.

    Map-style datasets: ``DataLoader(ds, sampler=sampler, batch_size=None)``; ``ds[batch]``
    receives a :class:`RowBatch`. Iterable datasets: ``__iter__`` of the dataset loops over
    ``sampler.iter_batches()`` (which picks this DataLoader worker's unit) and the DataLoader gets
    ``batch_size=None``. In both cases pass the DataLoader's ``num_workers`` here too, and the
    training loop calls :meth:`advance` once per step. Rank and world size default to
    ``torch.distributed``'s when it is initialised.
    """

    def __init__(
        self,
        shard_sizes: Sequence[int],
        batch_size: int,
        *,
        order: str = "random",
        seed: int = 0,
        window_shards: int = 4,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = False,
        split: tuple[str, float] | None = None,
        num_workers: int = 0,
    ) -> None:
        sizes = [_check_int("shard size", s, 0) for s in shard_sizes]
        if not sizes or sum(sizes) == 0:
            raise ConfigError(f"the cache has no rows to sample (shard sizes {list(shard_sizes)})")
        if order not in ORDERS:
            raise ConfigError(f"order must be one of {ORDERS}, got {order!r}")
        self._sizes = np.asarray(sizes, dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(self._sizes)]).astype(np.int64)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.order = order
        self.seed = _check_int("seed", seed, 0)
        self.window_shards = _check_int("window_shards", window_shards, 1)
        self.rank, self.world_size = astuple(current_rank_world(rank, world_size))
        self.drop_last = bool(drop_last)
        self.num_workers = _check_int("num_workers", num_workers, 0)
        self.epoch = 0
        self._history: list[tuple[Segment, int]] = []  # finished segments of this epoch
        self._steps = 0  # steps of the current segment
        self._cached: tuple[Any, tuple[SegmentPlan | None, list[SegmentPlan]]] | None = None
        self.split = split
        self._keep = None if split is None else split_mask(int(self._offsets[-1]), *split)
        self._num_rows = int(self._offsets[-1]) if self._keep is None else int(self._keep.sum())
        if self._num_rows == 0:
            raise ConfigError(
                f"the {split[0]!r} split (held-out fraction {split[1]}) of this cache is empty; "  # type: ignore[index]
                "raise the fraction or use a bigger cache"
            )

    # -- shape of the cache ------------------------------------------------------------------

    @property
    def num_rows(self) -> int:
        """Rows this sampler serves: the whole cache, or the rows of its split."""
        return self._num_rows

    @property
    def num_shards(self) -> int:
        return len(self._sizes)

    @property
    def shard_offsets(self) -> np.ndarray:
        """[num_shards + 1] int64: shard ``s`` holds global rows ``offsets[s]:offsets[s+1]``."""
        return self._offsets.copy()

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Map global row ids to ``(shard index, row index within the shard)``."""
        rows = np.asarray(rows, dtype=np.int64)
        total = int(self._offsets[-1])
        if rows.size and (rows.min() < 0 or rows.max() >= total):
            raise ConfigError(f"row ids must be in [0, {total}), got {rows.min()}..{rows.max()}")
        shard = np.searchsorted(self._offsets, rows, side="right") - 1
        return shard, rows - self._offsets[shard]

    # -- the plan ------------------------------------------------------------------------------

    @property
    def segment(self) -> Segment:
        """The settings this sampler iterates with (one segment of the resume state)."""
        workers = max(1, self.num_workers)
        return Segment(self.world_size, workers, self.batch_size, self.drop_last)

    def shard_order(self, epoch: int) -> np.ndarray:
        """Shard ids in the order the assignment deals them in ``epoch``."""
        ids = np.arange(self.num_shards)
        if self.order == "sequential":
            return ids
        return np.argsort(hash_keys(self.seed, epoch, _HASH_STREAMS[self.order][0], ids))

    def _make_plan(self, epoch: int, remaining: np.ndarray, segment: Segment) -> SegmentPlan:
        shuffle = None
        if self.order != "sequential":
            shuffle = (self.seed, epoch, _HASH_STREAMS[self.order][1], self.window_shards)
        return SegmentPlan(remaining, self._offsets, self.shard_order(epoch), segment, shuffle)

    def _plans(self) -> tuple[SegmentPlan | None, list[SegmentPlan]]:
        """(the current segment's plan, or None when an earlier one finished the epoch; the
        earlier segments' plans)."""
        key = (self.seed, self.epoch, tuple(self._history), self.segment)
        if self._cached is None or self._cached[0] != key:
            remaining = (
                np.ones(int(self._offsets[-1]), bool) if self._keep is None else self._keep.copy()
            )
            done: list[SegmentPlan] = []
            over = False
            for seg, steps in self._history:
                plan = self._make_plan(self.epoch, remaining, seg)
                if steps > plan.steps:
                    raise ConfigError(
                        f"cannot resume: the state says {steps} steps were taken with {seg} in "
                        f"epoch {self.epoch}, but that segment has only {plan.steps}; the state "
                        "belongs to another cache or was edited"
                    )
                done.append(plan)
                over = over or steps == plan.steps
                remaining = remaining & ~plan.consumed(steps)
            current = None if over else self._make_plan(self.epoch, remaining, self.segment)
            self._cached = (key, (current, done))
        return self._cached[1]

    # -- steps ---------------------------------------------------------------------------------

    @property
    def global_batch_size(self) -> int:
        return self.world_size * self.batch_size

    @property
    def steps_per_epoch(self) -> int:
        """Steps every rank takes in a whole epoch with these settings (the same on every rank;
        it may differ by one between epochs, with the shard assignment)."""
        remaining = np.ones(int(self._offsets[-1]), bool) if self._keep is None else self._keep
        return self._make_plan(self.epoch, remaining, self.segment).steps

    def __len__(self) -> int:
        """Steps left in the current epoch."""
        current = self._plans()[0]
        return 0 if current is None else current.steps - self._steps

    def iter_batches(
        self, worker_id: int | None = None, num_workers: int | None = None
    ) -> Iterator[RowBatch]:
        """This rank's remaining batches of the epoch: all of them (``num_workers`` 1, or in the
        main process), or those of DataLoader worker ``worker_id`` of ``num_workers``, which must
        be the sampler's ``num_workers``. Without arguments the worker comes from
        ``torch.utils.data.get_worker_info()``.
        """
        if worker_id is None and num_workers is None:
            info = torch.utils.data.get_worker_info()
            worker_id, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        elif worker_id is None or num_workers is None:
            raise ConfigError("pass both worker_id and num_workers, or neither")
        num_workers = _check_int("num_workers", num_workers, 1)
        worker_id = _check_int("worker_id", worker_id, 0)
        if worker_id >= num_workers:
            raise ConfigError(f"worker_id must be in [0, {num_workers}), got {worker_id}")
        if num_workers not in (1, self.segment.workers):
            raise ConfigError(
                f"this sampler plans for {self.segment.workers} reading process(es) per rank "
                f"(num_workers={self.num_workers}) but is iterated by DataLoader worker "
                f"{worker_id} of {num_workers}; build it with RowSampler(..., "
                f"num_workers={num_workers}), the DataLoader's value"
            )
        # snapshot now: in the main process the loop calls advance() while this generator runs
        current = self._plans()[0]
        if current is None:
            return iter(())
        first = sum(steps for _, steps in self._history)
        unit = None if num_workers == 1 else worker_id
        return self._generate(current, self.epoch, first, self._steps, unit)

    def _generate(
        self, plan: SegmentPlan, epoch: int, first: int, done: int, worker: int | None
    ) -> Iterator[RowBatch]:
        seq = plan.sequence(self.rank)
        rest = seq[done:]
        if worker is not None:
            # worker j plays the j-th unit in the order the remaining steps first need them: a
            # DataLoader's round-robin over its workers then reproduces the plan's order
            units, first_at = np.unique(rest, return_index=True)
            units = units[np.argsort(first_at)]
            if worker >= len(units):
                return
            slots = done + np.flatnonzero(rest == units[worker])
        else:
            slots = np.arange(done, len(seq))
        nth = np.zeros(len(seq), dtype=np.int64)  # the j-th batch of its unit
        for u in range(plan.segment.workers):
            at = np.flatnonzero(seq == u)
            nth[at] = np.arange(len(at))
        for slot in slots.tolist():
            rows, is_pad = plan.batch(self.rank, int(seq[slot]), int(nth[slot]))
            yield RowBatch(epoch=epoch, start=first + slot, rows=rows, is_pad=is_pad)

    def __iter__(self) -> Iterator[RowBatch]:
        return self.iter_batches()

    def unit_shards(self, worker: int = 0) -> list[int]:
        """The shards DataLoader worker ``worker`` of this rank reads in the current segment."""
        current = self._plans()[0]
        return [] if current is None else list(current.unit_shards[self.rank][worker])

    # -- progress and resume -------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning (call before each epoch, like DistributedSampler)."""
        self.epoch = _check_int("epoch", epoch, 0)
        self._history = []
        self._steps = 0

    def advance(self, steps: int = 1) -> None:
        """Record that the training loop finished ``steps`` more global steps."""
        steps = _check_int("steps", steps, 0)
        if steps > len(self):
            raise LoaderError(
                f"advance({steps}) goes past the end of epoch {self.epoch}: only {len(self)} "
                f"step(s) were left; call set_epoch() to start the next epoch"
            )
        self._steps += steps

    @property
    def consumed_rows(self) -> int:
        """Real (not padding) rows of this epoch served so far, over all ranks."""
        current, done = self._plans()
        total = sum(p.consumed_count(k) for p, (_, k) in zip(done, self._history, strict=True))
        return total + (0 if current is None else current.consumed_count(self._steps))

    def _fingerprint(self) -> str:
        return hashlib.sha256(self._sizes.astype("<i8").tobytes()).hexdigest()[:16]

    def state_dict(self) -> dict[str, Any]:
        """A small JSON-able dict: the epoch and the segments of it already iterated."""
        segments = [[*astuple(seg), steps] for seg, steps in self._history]
        if self._steps:
            segments.append([*astuple(self.segment), self._steps])
        return {
            "order_version": ORDER_VERSION,
            "epoch": self.epoch,
            "seed": self.seed,
            "consumed_rows": self.consumed_rows,
            "num_rows": self.num_rows,
            "shards": self._fingerprint(),
            "order": self.order,
            "window": None if self.order == "sequential" else self.window_shards,
            "split": None if self.split is None else [self.split[0], float(self.split[1])],
            "segments": segments,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`; world size, batch size and workers may differ."""
        missing = _STATE_KEYS - set(state)
        if missing:
            raise ConfigError(f"sampler state lacks {sorted(missing)}; got keys {sorted(state)}")
        mine = self.state_dict()
        legacy = state["order_version"] == 1 and state.get("consumed_rows") == 0
        fields = ("num_rows", "shards", "order", "split")
        problems = [
            f"{k}: state has {state[k]!r}, this sampler has {mine[k]!r}"
            for k in (fields if legacy else ("order_version", *fields, "window"))
            if state[k] != mine[k]
        ]
        if problems:
            raise ConfigError(
                "cannot resume: the sampler state was saved for another cache or order ("
                + "; ".join(problems)
                + "); resume with the same cache and order settings, or start a fresh run "
                "(a state of order_version 1 resumes only at an epoch boundary)"
            )
        segments = [] if legacy else state.get("segments")
        if not isinstance(segments, list):
            raise ConfigError(f"sampler state 'segments' must be a list, got {segments!r}")
        history = [seg for seg in map(_parse_segment, segments) if seg[1] != 0]
        before = (self.seed, self.epoch, self._history, self._steps)
        self.seed = _check_int("seed", state["seed"], 0)
        self.epoch = _check_int("epoch", state["epoch"], 0)
        self._history, self._steps = history, 0
        if history and history[-1][0] == self.segment:  # same settings: continue exactly
            self._history, self._steps = history[:-1], history[-1][1]
        self._cached = None
        try:
            current = self._plans()[0]  # replays the segments: refuses a state that does not fit
            if current is not None and self._steps > current.steps:
                raise ConfigError(
                    f"cannot resume: the state says {self._steps} steps were taken with "
                    f"{self.segment} in epoch {self.epoch}, but that segment has only "
                    f"{current.steps}; the state belongs to another cache or was edited"
                )
        except ConfigError:
            self.seed, self.epoch, self._history, self._steps = before
            self._cached = None
            raise


def _parse_segment(entry: object) -> tuple[Segment, int]:
    if not isinstance(entry, list | tuple) or len(entry) != 5:
        raise ConfigError(
            f"a sampler state segment is [world_size, workers, batch_size, drop_last, steps], "
            f"got {entry!r}"
        )
    drop_last, steps = entry[3], entry[4]
    if not isinstance(drop_last, bool):
        raise ConfigError(f"segment drop_last must be true or false, got {drop_last!r}")
    ints = zip(_SEGMENT_INTS, entry[:3], strict=True)
    sizes = [_check_int(f"segment {n}", v, 1) for n, v in ints]
    return Segment(sizes[0], sizes[1], sizes[2], drop_last), _check_int("segment steps", steps, 0)


_SEGMENT_INTS = ("world_size", "workers", "batch_size")
