"""Pieces of the dump loop that are not about teachers or formats: the background writer thread,
the progress line, torchrun ranks, and trimming a batch for an aligned resume.

**Background writer.** Encoding (quantise, delta-code) and writing (zstd, checksums, renames) of
batch *n* run in one thread while the device computes batch *n + 1*. The queue between them is
bounded (``depth`` batches of small sparse tensors), so a writer slower than the teacher throttles
the teacher instead of growing host memory. One thread is enough: the heavy parts (zstd, numpy)
release the GIL, and a single consumer keeps rows in stream order, which the writer's
deterministic shard cuts (and so ``--resume``) rely on. An error in the thread is kept and raised
in the main thread at its next ``put`` or at ``close``; the main thread then leaves the
``CacheWriter`` block with that exception, which aborts the cache (no manifest).

**Background reader.** With an accelerator, reading, tokenising and packing the next batch happen
in another thread (:func:`read_ahead`) while the device runs the current one: the device would
otherwise sit idle during tokenisation (fast tokenizers release the GIL). A CPU teacher reads in
the main thread, where a second thread would only compete for the same cores. One producer and a
FIFO queue keep the row order, so resume and rank splits are unchanged.

**Ranks.** Under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set) rank r takes the rows
with ``row_id % world_size == r``: disjoint, deterministic, balanced to one row, and computable
while streaming (contiguous blocks would need the row count first). A gloo process group (CPU,
also on GPU nodes: it only carries barriers) synchronises the start (after rank 0 cleared an
``--overwrite`` output) and the end (before rank 0 joins the parts). With ``--tensor-parallel T``
the "rank" here is the data-parallel index (``rank // T``, of ``world_size / T``): only the
group's tensor-parallel rank 0 writes (:class:`logitcache._distributed.ParallelLayout`).
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections.abc import Generator, Iterable
from dataclasses import replace
from typing import IO, Any, TypeVar

from logitcache._distributed import RankInfo
from logitcache.dump.inputs import TokenBatch
from logitcache.dump.sparsify import CoverageStats, SparseBatch
from logitcache.errors import ConfigError, WriterError
from logitcache.format.targets import SampledTargets, TopKTargets
from logitcache.store import CacheWriter

# -- ranks ------------------------------------------------------------------------------------


def part_name(rank: int) -> str:
    """The writer part of ``rank`` in a multi-rank dump (rank 0 of 1 writes no part)."""
    return f"rank{rank:05d}"


def rank_part(info: RankInfo) -> str | None:
    """This rank's part name, or None when it writes the manifest itself (a single process)."""
    return part_name(info.rank) if info.world_size > 1 else None


# -- resume alignment ---------------------------------------------------------------------------


def drop_leading_rows(
    batch: TokenBatch, sparse: SparseBatch, n: int
) -> tuple[TokenBatch, SparseBatch]:
    """Remove the first ``n`` rows (and their positions and entries) from a computed batch.

    A resumed dump recomputes the whole batch its first missing row falls in, so every batch
    has the same rows as in the uninterrupted run (bit-identical results even where kernels
    depend on the batch shape), and drops the rows the committed shards already hold.
    """
    if n == 0:
        return batch, sparse
    if n >= len(batch.row_ids):
        raise WriterError(
            f"resume expected more than {n} rows in the first batch, got {len(batch.row_ids)}; "
            "the input data changed since the interrupted run"
        )
    p0 = int(sparse.positions_per_row[:n].sum())
    t = sparse.targets
    targets: TopKTargets | SampledTargets
    if isinstance(t, TopKTargets):
        targets = TopKTargets(
            t.ids[p0:], t.logprobs[p0:], t.tail_logprob[p0:], t.temperature_lognorm[p0:]
        )
    else:
        e0 = int(t.num_unique[:p0].sum())
        targets = SampledTargets(
            num_unique=t.num_unique[p0:],
            ids=t.ids[e0:],
            counts=t.counts[e0:],
            logprobs=None if t.logprobs is None else t.logprobs[e0:],
            temperature_lognorm=t.temperature_lognorm[p0:],
        )
    st = sparse.stats
    stats = CoverageStats(st.captured_mass[p0:], st.entropy[p0:], st.nll[p0:])
    kept = TokenBatch(batch.row_ids[n:], batch.input_ids[n:], batch.loss_mask[n:])
    return kept, replace(
        sparse,
        row_ids=sparse.row_ids[n:],
        positions_per_row=sparse.positions_per_row[n:],
        targets=targets,
        stats=stats,
    )


# -- background writer --------------------------------------------------------------------------

_Item = tuple[TokenBatch, SparseBatch] | None


T = TypeVar("T")
_DONE = object()


class _Raised:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def read_ahead(items: Iterable[T], depth: int = 2) -> Generator[T, None, None]:
    """``items`` in order, produced by a background thread up to ``depth`` ahead.

    An exception in the producer is raised here, in order; closing or dropping the generator stops
    the producer (it notices within 0.1 s) so no thread outlives the dump.
    """
    out: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def produce() -> None:
        item: Any = _DONE
        try:
            for x in items:
                while not stop.is_set():
                    try:
                        out.put(x, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as exc:  # handed to the consumer, which re-raises it
            item = _Raised(exc)
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    thread = threading.Thread(target=produce, name="logitcache-reader", daemon=True)
    thread.start()
    try:
        while True:
            x = out.get()
            if x is _DONE:
                return
            if isinstance(x, _Raised):
                raise x.exc
            yield x
    finally:
        stop.set()
        thread.join(timeout=5.0)


class BackgroundWriter:
    """Feed (rows, sparse targets) to a :class:`CacheWriter` from a thread; see module doc."""

    def __init__(self, writer: CacheWriter, depth: int = 4) -> None:
        if depth < 1:
            raise ConfigError(f"queue depth must be >= 1, got {depth}")
        self._writer = writer
        self._queue: queue.Queue[_Item] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self.busy_seconds = 0.0  # time spent in write(): how close the writer is to the limit
        self._thread = threading.Thread(target=self._run, name="logitcache-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._stop.is_set() or self._error is not None:
                continue  # drain: the producer is leaving, or an error is waiting to be raised
            batch, sparse = item
            start = time.perf_counter()
            try:
                self._writer.write(
                    batch.row_ids,
                    batch.input_ids,
                    batch.loss_mask,
                    sparse.targets,
                    captured_mass=sparse.stats.captured_mass,
                    entropy=sparse.stats.entropy,
                    nll=sparse.stats.nll,
                )
            except BaseException as e:  # raised again in the main thread
                self._error = e
            self.busy_seconds += time.perf_counter() - start

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, batch: TokenBatch, sparse: SparseBatch) -> None:
        """Queue a batch; blocks while ``depth`` batches wait; raises the thread's error."""
        while True:
            self._raise_if_failed()
            try:
                self._queue.put((batch, sparse), timeout=0.2)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Wait until every queued batch is written; raise the thread's error if there was one."""
        self._send_stop()
        self._raise_if_failed()

    def abandon(self) -> None:
        """Stop without writing what is queued (the main thread is failing)."""
        self._stop.set()
        self._send_stop()

    def _send_stop(self) -> None:
        while self._thread.is_alive():
            try:
                self._queue.put(None, timeout=0.2)
                break
            except queue.Full:
                continue
        self._thread.join()


# -- progress -----------------------------------------------------------------------------------


class Progress:
    """A one-line progress report on stderr: rows, tokens/s and ETA.

    On a terminal the line is redrawn twice a second; in a log file a line is appended every
    30 s. ``total`` may be None (rows not counted up front): then there is no ETA.
    """

    def __init__(
        self,
        total: int | None,
        tokens_per_row: int,
        *,
        done: int = 0,
        enabled: bool = True,
        stream: IO[str] | None = None,
    ) -> None:
        self.total = total
        self.tokens_per_row = tokens_per_row
        self.start_done = done
        self.done = done
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = 0.5 if self.tty else 30.0
        self.t0 = time.perf_counter()
        self.last = self.t0

    def update(self, rows: int) -> None:
        self.done += rows
        now = time.perf_counter()
        if self.enabled and now - self.last >= self.interval:
            self.last = now
            self._emit(now)

    def tokens_per_s(self, now: float | None = None) -> float:
        elapsed = (now or time.perf_counter()) - self.t0
        return (self.done - self.start_done) * self.tokens_per_row / max(elapsed, 1e-9)

    def _emit(self, now: float) -> None:
        rate = self.tokens_per_s(now)
        line = f"dump: {self.done:,}"
        if self.total:
            line += f"/{self.total:,} rows ({100.0 * self.done / self.total:.1f}%)"
            left = (self.total - self.done) * self.tokens_per_row / max(rate, 1e-9)
            line += f"  {rate:,.0f} tok/s  ETA {_hms(left)}"
        else:
            line += f" rows  {rate:,.0f} tok/s"
        self.stream.write(("\r" + line + "\x1b[K") if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._emit(time.perf_counter())
            if self.tty:
                self.stream.write("\n")
                self.stream.flush()


def _hms(seconds: float) -> str:
    s = int(min(seconds, 1e8))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
