"""``make_loader``: sampler + dataset + DataLoader + device prefetcher, resumable in one object.

:class:`CachedLogitLoader` is what a training loop iterates: each item is a batch on the training
device with log-probs already dequantised (see ``collate.py`` for the keys). It owns the
:class:`~logitcache.data.RowSampler` and counts a batch as consumed **when it is delivered** to the
loop, so ``state_dict()`` taken after a step (the usual checkpoint point) resumes with the next
batch. The DataLoader and the prefetcher read ahead of the loop; those batches are not counted and
are simply produced again after a resume. Each ``iter(loader)`` continues where the last one
stopped (a fresh DataLoader iterator, with workers that copy the sampler's current state) and, at
the end of an epoch, the loader moves on to the next one: a loop is just
``for epoch in ...: for batch in loader: ...``, with no ``set_epoch`` call.

Resume rule (from the sampler): with the same world size, batch size and number of workers the
run continues exactly (same remaining rows, same order); with other values the rows the epoch
has not served yet are assigned anew: nothing is repeated or skipped.

Failure handling: errors raised while reading (``CacheIncompleteError`` when opening,
``ChecksumMismatchError`` naming the shard) reach the loop with their class and message, also from
worker processes. A worker that dies (OOM killer, segfault) or produces nothing for ``timeout``
seconds becomes a :class:`~logitcache.errors.LoaderError` saying so, instead of a hang or a bare
``RuntimeError``. ``close()`` (also on ``del`` and at the end of each pass) stops the prefetch
thread and the worker processes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.utils.data

from logitcache._distributed import resolve_device
from logitcache.data._packing import prune_rings
from logitcache.data.collate import BatchTransform, PositionSelector, TargetOptions
from logitcache.data.dataset import CachedLogitDataset, StreamingLogitDataset
from logitcache.data.prefetch import Batch, DevicePrefetcher
from logitcache.data.sampler import RowSampler
from logitcache.data.targets import TargetDequantizer
from logitcache.errors import ConfigError, LoaderError
from logitcache.store.reader import CacheReader

__all__ = ["CachedLogitLoader", "make_loader"]


def _shutdown(batches: Iterator[Batch]) -> None:
    """Stop a DataLoader iterator's workers now, not whenever a traceback lets go of it.

    Besides freeing the processes, this unregisters them from torch's SIGCHLD handler, which
    would otherwise raise a dead worker's error again, anywhere in the main thread, whenever any
    child process exits later.
    """
    shutdown = getattr(batches, "_shutdown_workers", None)
    if callable(shutdown):
        # the pipes of a dead worker may fail; the caller raises the error that matters
        with contextlib.suppress(OSError, EOFError, RuntimeError):
            shutdown()


def _guarded(batches: Iterator[Batch], timeout: float) -> Iterator[Batch]:
    """Turn the DataLoader's dead-worker and timeout ``RuntimeError`` into a LoaderError."""
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (RuntimeError, ConnectionError, EOFError) as exc:
            _shutdown(batches)
            msg = f"{type(exc).__name__}: {exc}"
            # a worker's own errors come back wrapped ("Caught ... in DataLoader worker process")
            dead = (
                isinstance(exc, ConnectionError | EOFError)
                and getattr(batches, "_num_workers", 0) > 0
                and "in DataLoader worker process" not in msg
            )
            if not dead and "DataLoader worker" not in msg and "DataLoader timed out" not in msg:
                raise
            raise LoaderError(
                f"the data loader failed: {msg.strip()}. A worker process died (the OOM killer? "
                f"see dmesg) or produced no batch within timeout={timeout:g} s; fix: lower "
                "num_workers or batch_size, raise timeout for slow storage, or run with "
                "num_workers=0 to see the underlying error in-process"
            ) from exc
        except BaseException:
            _shutdown(batches)
            raise
        yield batch


class CachedLogitLoader:
    """Iterable over device batches of a cache; see :func:`make_loader` for the arguments."""

    def __init__(
        self,
        url: str,
        batch_size: int,
        *,
        seed: int = 0,
        num_workers: int = 0,
        order: str = "streaming",
        rank: int | None = None,
        world_size: int | None = None,
        device: torch.device | str | None = None,
        options: TargetOptions | None = None,
        window_shards: int | None = None,
        readahead: int | None = None,
        drop_last: bool = False,
        verify: bool = True,
        timeout: float = 300.0,
        max_cached_shards: int = 16,
        storage_options: Mapping[str, Any] | None = None,
        background: bool | None = None,
        split: tuple[str, float] | None = None,
    ) -> None:
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigError(f"num_workers must be an integer >= 0, got {num_workers!r}")
        if not timeout > 0:
            raise ConfigError(f"timeout must be > 0 seconds, got {timeout!r}")
        reader = CacheReader(url, verify=verify, storage_options=storage_options)
        self.manifest = reader.manifest
        if window_shards is None:  # random: two blocks fit the shard LRU
            window_shards = max(1, max_cached_shards // 2) if order == "random" else 4
        self.sampler = RowSampler(
            [s.rows for s in reader.manifest.shards],
            batch_size,
            order=order,
            seed=seed,
            window_shards=window_shards,
            rank=rank,
            world_size=world_size,
            drop_last=drop_last,
            split=split,
            num_workers=num_workers,
        )
        self.dataset: CachedLogitDataset | StreamingLogitDataset
        if order == "random":
            self.dataset = CachedLogitDataset(
                url,
                options=options,
                verify=verify,
                max_cached_shards=max_cached_shards,
                storage_options=storage_options,
            )
        else:
            self.dataset = StreamingLogitDataset(
                url,
                self.sampler,
                options=options,
                readahead=readahead,
                verify=verify,
                storage_options=storage_options,
            )
        # None: the process's own accelerator (cuda:$LOCAL_RANK under torchrun), else the CPU
        self.device = resolve_device("auto") if device is None else torch.device(device)
        self.num_workers = num_workers
        self.timeout = float(timeout)
        self.background = background
        self.dequantize = TargetDequantizer(reader.codec)
        self._prefetcher: DevicePrefetcher | None = None
        self.wait_seconds = 0.0  # time the loop spent blocked on data, over all passes

    # -- iteration ---------------------------------------------------------------------------

    def _dataloader(self) -> torch.utils.data.DataLoader[Any]:
        workers = self.num_workers
        return torch.utils.data.DataLoader(
            self.dataset,
            batch_size=None,
            sampler=self.sampler if isinstance(self.dataset, CachedLogitDataset) else None,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            timeout=self.timeout if workers else 0,
            persistent_workers=False,
        )

    def __iter__(self) -> Iterator[Batch]:
        self.close()
        if len(self.sampler) == 0:  # a finished epoch (e.g. restored from its last step)
            self.sampler.set_epoch(self.sampler.epoch + 1)
        source = _guarded(iter(self._dataloader()), self.timeout)
        prefetcher = DevicePrefetcher(
            source, self.device, transform=self.dequantize, background=self.background
        )
        self._prefetcher = prefetcher
        return self._deliver(prefetcher)

    def _deliver(self, prefetcher: DevicePrefetcher) -> Iterator[Batch]:
        try:
            for batch in prefetcher:
                self.sampler.advance(1)
                yield batch
            self.sampler.set_epoch(self.sampler.epoch + 1)
        finally:
            self.wait_seconds += prefetcher.wait_seconds
            prefetcher.wait_seconds = 0.0
            prefetcher.close()
            if self._prefetcher is prefetcher:
                self._prefetcher = None

    def __len__(self) -> int:
        """Steps left in the current epoch (the whole next epoch once this one is finished)."""
        return len(self.sampler) or self.sampler.steps_per_epoch

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def close(self) -> None:
        """Stop the current pass: its prefetch thread and DataLoader workers."""
        if self._prefetcher is not None:
            self.wait_seconds += self._prefetcher.wait_seconds
            self._prefetcher.wait_seconds = 0.0
            self._prefetcher.close()
            self._prefetcher = None
        prune_rings()  # the main process's mappings of exited workers' batch buffers

    def __del__(self) -> None:
        if getattr(self, "_prefetcher", None) is not None:
            self.close()

    # -- resume --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The loader state to checkpoint (JSON-able): the sampler's position in the epoch."""
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`; world size, batch size and workers may differ."""
        if "sampler" not in state:
            raise ConfigError(f"loader state lacks 'sampler'; got keys {sorted(state)}")
        self.close()
        self.sampler.load_state_dict(state["sampler"])


def make_loader(
    url: str,
    batch_size: int,
    *,
    seed: int = 0,
    num_workers: int = 0,
    order: str = "streaming",
    rank: int | None = None,
    world_size: int | None = None,
    device: torch.device | str | None = None,
    top_k: int | None = None,
    keep_tail: bool = True,
    temperature: float | None = None,
    positions: PositionSelector | None = None,
    transform: BatchTransform | None = None,
    student_vocab: int | None = None,
    **kwargs: Any,
) -> CachedLogitLoader:
    """A resumable loader of device batches from the cache at ``url``.

    ``order``: ``"streaming"`` (default; each rank and worker reads its own shards with
    read-ahead, rows shuffled within windows of ``window_shards`` shards, default 4),
    ``"random"`` (map-style random access; rows shuffled within blocks of ``window_shards``
    shards, default ``max_cached_shards // 2``) or ``"sequential"``. ``rank``/``world_size``
    default to torch.distributed's. ``device`` defaults to CUDA when available (pinned memory, side
    stream copies) else CPU. ``top_k``, ``keep_tail``, ``temperature``, ``positions``,
    ``student_vocab``: see
    :class:`~logitcache.data.collate.TargetOptions` (``transform`` too). Other keyword arguments
    go to :class:`CachedLogitLoader` (``split``: ``("train" | "eval", held-out fraction)``,
    ``window_shards``, ``readahead`` (shards read ahead; default: a window's), ``drop_last``,
    ``verify``, ``timeout``, ``max_cached_shards``, ``storage_options``, ``background``).
    """
    options = TargetOptions(
        top_k=top_k,
        keep_tail=keep_tail,
        temperature=temperature,
        positions=positions,
        transform=transform,
        student_vocab=student_vocab,
    )
    return CachedLogitLoader(
        url,
        batch_size,
        seed=seed,
        num_workers=num_workers,
        order=order,
        rank=rank,
        world_size=world_size,
        device=device,
        options=options,
        **kwargs,
    )
