"""Which rows of the cache each rank and DataLoader worker reads, in which order, and how to resume.

The sampler knows nothing about shards' contents: only how many rows each shard holds. It turns
(seed, epoch) into one **global order** of all rows, cuts that order into **global steps** of
``world_size * batch_size`` rows, and gives rank ``r`` the ``r``-th ``batch_size`` slice of every
step. Everything below follows from that choice.

Orders (``order=``):

- ``"random"``: a full random permutation of the rows; for map-style (random access) datasets.
- ``"streaming"``: shards in random order, grouped in windows of ``window_shards`` consecutive
  shards; rows are shuffled within a window only. Each shard is touched during one window of steps
  and never again in the epoch, so a streaming reader fetches it once (the object-store path). The
  price: a weaker shuffle (rows only mix with rows of the same window), and every rank reads a
  slice of every shard in the window (each rank touches ``window_shards`` shards at a time).
- ``"sequential"``: rows 0..N-1, for evaluation.

Splits (``split=("train" | "eval", fraction)``): :func:`split_mask` holds out a fixed,
seed-independent ``fraction`` of the rows (by a hash of the global row index); the "train" sampler
never yields them and the "eval" sampler yields only them. Orders are built over all rows and then
filtered, so a split keeps each order's locality (streaming windows stay windows).

Shuffles hash ``(seed, epoch, row)`` with splitmix64 and sort the hashes; they do not use
``numpy.random``, whose streams may change between numpy versions: a resumed run on another machine
must rebuild the very same order, and ``ORDER_VERSION`` in the state dict guards the algorithm.

**Uneven rows under DDP.** Every rank must take the same number of optimizer steps, or DDP hangs in
an all-reduce. The last global step usually holds fewer than ``world_size * batch_size`` rows:

- ``drop_last=False`` (default, what the trainer uses): the last step is *padded* with repeats of
  the epoch's first rows and every rank still gets exactly ``batch_size`` rows (static shapes, no
  empty batch). Each :class:`RowBatch` carries ``is_pad``; the collate must zero the loss mask of
  padded rows, so that, counting only non-padded rows, every row is seen exactly once per epoch.
  Losses return ``(sum, count)`` and normalise by the all-reduced count, so padding changes nothing
  else; a rank whose whole slice is padding contributes ``(0, 0)``. At most
  ``world_size * batch_size - 1`` padded rows per epoch: negligible compute.
- ``drop_last=True``: the last partial step is dropped; those rows are skipped in this epoch (a
  different shuffle next epoch drops different rows).

**Resume.** :meth:`RowSampler.state_dict` stores the epoch, the seed and ``consumed_rows``: how many
rows of the global order the trainer has *finished* (the loop calls :meth:`RowSampler.advance`
after each step; the DataLoader prefetches ahead, so only the loop knows). Because the consumed
rows are always a prefix of a global order that depends on neither the world size nor the number of
workers nor the batch size, a run resumes at that prefix and re-splits the rest over whatever world
size and batch size it now has: nothing is repeated or skipped, with any world size. A state whose
cache (row count, shard sizes) or order settings differ is refused with :class:`ConfigError`.

**Workers.** :meth:`RowSampler.iter_batches` splits this rank's batches over DataLoader workers
round-robin (worker ``w`` gets local batches ``w, w + W, ...``), which is exactly the order in which
the DataLoader collects from the workers of an ``IterableDataset``. The stream a rank sees is
therefore independent of ``num_workers``, which is what makes a resume with another worker count
exact. Workers copy the sampler when they start, so create the DataLoader with
``persistent_workers=False`` (the default): each ``iter(loader)`` then sees the current epoch and
``consumed_rows``.

The global order costs 4 bytes per row (8 above 2**31 rows) and an O(N log N) sort per epoch in each
process that iterates; 10M rows take 1-3 s.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import astuple, dataclass
from typing import Any

import numpy as np
import torch.utils.data

from logitcache._distributed import current_rank_world
from logitcache.errors import ConfigError, LoaderError

__all__ = ["ORDERS", "ORDER_VERSION", "SPLITS", "RowBatch", "RowSampler", "split_mask"]

ORDERS = ("random", "streaming", "sequential")
ORDER_VERSION = 1
_STATE_KEYS = frozenset(
    {
        "order_version",
        "epoch",
        "seed",
        "consumed_rows",
        "num_rows",
        "shards",
        "order",
        "window",
        "split",
    }
)
_U64 = np.uint64


@dataclass(frozen=True, eq=False)
class RowBatch:
    """One rank's rows for one global step.

    ``rows``: [batch_size] int64 global row ids; ``is_pad``: [batch_size] bool, True for repeats
    that only fill the last step (mask them out of the loss); ``epoch`` and ``start`` (the offset in
    the epoch's global order where this global step begins) identify the step.
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


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A bijection on uint64 with good avalanche (Steele et al.); wraps on overflow by design."""
    x = x + _U64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


def _hash_keys(seed: int, epoch: int, stream: int, ids: np.ndarray) -> np.ndarray:
    base = np.zeros(1, dtype=_U64)
    for part in (seed, epoch, stream):
        base = _splitmix64(base ^ _U64(part))
    # xor with a constant and splitmix64 are both bijections: distinct ids give distinct keys.
    return _splitmix64(ids.astype(_U64) ^ base)


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
    keys = _hash_keys(_SPLIT_SEED, 0, 3, np.arange(num_rows, dtype=np.int64))
    held_out = keys < _U64(int(float(fraction) * 2.0**64))
    return held_out if name == "eval" else ~held_out


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class RowSampler:
    """Deterministic, resumable, rank- and worker-split order over a cache's rows.

    Map-style datasets: ``DataLoader(ds, sampler=sampler, batch_size=None)``; ``ds[batch]``
    receives a :class:`RowBatch`. Iterable datasets: ``__iter__`` of the dataset loops over
    ``sampler.iter_batches()`` (which splits by DataLoader worker) and the DataLoader gets
    ``batch_size=None``. In both cases the training loop calls :meth:`advance` once per step.
    Rank and world size default to ``torch.distributed``'s when it is initialised.
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
        self.epoch = 0
        self.consumed_rows = 0
        self._cached: tuple[tuple[int, int], np.ndarray] | None = None
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

    # -- the order -----------------------------------------------------------------------------

    def epoch_order(self, epoch: int | None = None) -> np.ndarray:
        """The global order of all rows for ``epoch`` (default: the current one); read-only."""
        epoch = self.epoch if epoch is None else _check_int("epoch", epoch, 0)
        key = (self.seed, epoch)
        if self._cached is None or self._cached[0] != key:
            built = self._build_order(epoch)
            built.flags.writeable = False
            self._cached = (key, built)
        return self._cached[1]

    def _build_order(self, epoch: int) -> np.ndarray:
        rows = self._build_full_order(epoch)
        return rows if self._keep is None else rows[self._keep[rows]]

    def _build_full_order(self, epoch: int) -> np.ndarray:
        n = int(self._offsets[-1])
        dtype = np.int32 if n < 2**31 else np.int64
        if self.order == "sequential":
            return np.arange(n, dtype=dtype)
        if self.order == "random":
            # keys are distinct, so any correct sort gives the same permutation
            return np.argsort(_hash_keys(self.seed, epoch, 0, np.arange(n))).astype(dtype)
        # streaming: shards in hashed order, then rows hashed within windows of shards.
        shard_perm = np.argsort(_hash_keys(self.seed, epoch, 1, np.arange(self.num_shards)))
        sizes = self._sizes[shard_perm]
        out_start = np.cumsum(sizes) - sizes
        shift = np.repeat(self._offsets[:-1][shard_perm] - out_start, sizes)
        rows = (np.arange(n, dtype=np.int64) + shift).astype(dtype)
        bounds = [*np.concatenate([[0], np.cumsum(sizes)])[:: self.window_shards].tolist(), n]
        for lo, hi in itertools.pairwise(bounds):
            if hi > lo:
                window = rows[lo:hi]
                rows[lo:hi] = window[np.argsort(_hash_keys(self.seed, epoch, 2, window))]
        return rows

    # -- steps ---------------------------------------------------------------------------------

    @property
    def global_batch_size(self) -> int:
        return self.world_size * self.batch_size

    def _steps_from(self, consumed: int) -> int:
        remaining = self.num_rows - consumed
        g = self.global_batch_size
        return remaining // g if self.drop_last else -(-remaining // g)

    @property
    def steps_per_epoch(self) -> int:
        """Steps every rank takes in a whole epoch (the same on every rank)."""
        return self._steps_from(0)

    def __len__(self) -> int:
        """Steps left in the current epoch from ``consumed_rows``."""
        return self._steps_from(self.consumed_rows)

    def _batch(self, epoch: int, order: np.ndarray, start: int) -> RowBatch:
        idx = start + self.rank * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
        is_pad = idx >= self.num_rows
        rows = order[idx % self.num_rows].astype(np.int64)
        return RowBatch(epoch=epoch, start=start, rows=rows, is_pad=is_pad)

    def iter_batches(
        self, worker_id: int | None = None, num_workers: int | None = None
    ) -> Iterator[RowBatch]:
        """This rank's remaining batches of the epoch, split round-robin over DataLoader workers.

        Without arguments the worker comes from ``torch.utils.data.get_worker_info()`` (no split in
        the main process). Batch ``i`` of this rank goes to worker ``i % num_workers``.
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
        # snapshot now: in the main process the loop calls advance() while this generator runs
        return self._generate(self.epoch, self.consumed_rows, worker_id, num_workers)

    def _generate(
        self, epoch: int, consumed: int, worker_id: int, num_workers: int
    ) -> Iterator[RowBatch]:
        order = self.epoch_order(epoch)
        g = self.global_batch_size
        for step in range(worker_id, self._steps_from(consumed), num_workers):
            yield self._batch(epoch, order, consumed + step * g)

    def __iter__(self) -> Iterator[RowBatch]:
        return self.iter_batches()

    # -- progress and resume -------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning (call before each epoch, like DistributedSampler)."""
        self.epoch = _check_int("epoch", epoch, 0)
        self.consumed_rows = 0

    def advance(self, steps: int = 1) -> None:
        """Record that the training loop finished ``steps`` more global steps."""
        steps = _check_int("steps", steps, 0)
        if steps > len(self):
            raise LoaderError(
                f"advance({steps}) goes past the end of epoch {self.epoch}: only {len(self)} "
                f"step(s) were left; call set_epoch() to start the next epoch"
            )
        self.consumed_rows = min(self.num_rows, self.consumed_rows + steps * self.global_batch_size)

    def _fingerprint(self) -> str:
        return hashlib.sha256(self._sizes.astype("<i8").tobytes()).hexdigest()[:16]

    def state_dict(self) -> dict[str, Any]:
        """A small JSON-able dict: where in which epoch's order the run stands."""
        return {
            "order_version": ORDER_VERSION,
            "epoch": self.epoch,
            "seed": self.seed,
            "consumed_rows": self.consumed_rows,
            "num_rows": self.num_rows,
            "shards": self._fingerprint(),
            "order": self.order,
            "window": self.window_shards if self.order == "streaming" else None,
            "split": None if self.split is None else [self.split[0], float(self.split[1])],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`; any world size, batch size or worker count may differ."""
        missing = _STATE_KEYS - set(state)
        if missing:
            raise ConfigError(f"sampler state lacks {sorted(missing)}; got keys {sorted(state)}")
        mine = self.state_dict()
        problems = [
            f"{k}: state has {state[k]!r}, this sampler has {mine[k]!r}"
            for k in ("order_version", "num_rows", "shards", "order", "window", "split")
            if state[k] != mine[k]
        ]
        if problems:
            raise ConfigError(
                "cannot resume: the sampler state was saved for another cache or order ("
                + "; ".join(problems)
                + "); resume with the same cache and order settings, or start a fresh run"
            )
        consumed = _check_int("consumed_rows", state["consumed_rows"], 0)
        if consumed > self.num_rows:
            raise ConfigError(f"consumed_rows {consumed} exceeds the cache's {self.num_rows} rows")
        self.seed = _check_int("seed", state["seed"], 0)
        self.epoch = _check_int("epoch", state["epoch"], 0)
        self.consumed_rows = consumed
