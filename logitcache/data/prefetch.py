"""Device prefetch: the next batch is on the GPU, dequantised, before the current step finishes.

A batch is a dict; its tensor values travel to the device, anything else passes through unchanged.
On CUDA, :class:`DevicePrefetcher` keeps one batch in flight: it issues the host-to-device copies
of batch ``i + 1`` on a side :class:`torch.cuda.Stream` with ``non_blocking=True`` (truly
asynchronous only from pinned memory, which the collate provides) and runs ``transform`` there too,
right after handing batch ``i`` to the loop, so copy and dequantisation overlap the step on the
default stream. Handing a batch over makes the consumer's stream wait for the side stream (a GPU
side wait, the host does not block) and calls ``record_stream`` on every tensor, so the caching
allocator does not recycle their memory while the step still reads it.

The transform is where codes become values: they cross PCIe compact (uint8 codes are a quarter of
float32 log-probs) and :func:`dequantize_table` turns them into float32 with one gather on a lookup
table. Tensors a transform captures (tables) must exist before iteration starts: the side stream
waits once for the consumer's stream at the first batch, not at every batch (that would serialise
the copy behind the step it is meant to overlap).

An optional background thread (``background=True``, the default on CUDA) pulls host batches from
the source iterator into a small queue, so a loader running in the main process (``num_workers=0``)
also overlaps the step; on a CPU device that thread runs the transform too. On CPU the default is
synchronous: no stream, no look-ahead, no thread.

``wait_seconds`` counts the host time the consumer spent blocked on data inside ``__next__``; the
loader benchmark divides it by the step time to report the data-wait fraction. ``close()`` (also
called by ``__exit__``, ``__del__`` and exhaustion) stops and joins the thread; the thread never
holds a reference to the prefetcher, so dropping the prefetcher is enough to shut it down.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from logitcache._distributed import resolve_device
from logitcache.data._packing import materialize
from logitcache.errors import ConfigError

__all__ = ["Batch", "DequantizeFields", "DevicePrefetcher", "dequantize_table"]

Batch = dict[str, Any]
_END = object()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def dequantize_table(codes: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``table[codes]``: integer codes of any shape to the table's values, on the codes' device.

    ``table`` is 1-D (e.g. 256 float32 log-probs for 8-bit codes); the result has the codes' shape
    and the table's dtype. Codes must be < ``len(table)``; that is checked on CPU only (a check on
    the GPU would synchronise the stream; an out-of-range code there is a device-side assert).
    """
    if table.ndim != 1:
        raise ConfigError(f"a dequantisation table must be 1-D, got shape {tuple(table.shape)}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ConfigError(f"codes must have an integer dtype, got {codes.dtype}")
    if table.device != codes.device:
        table = table.to(codes.device, non_blocking=True)
    if codes.device.type == "cpu" and codes.numel():
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= table.numel():
            raise ConfigError(
                f"codes span {lo}..{hi} but the table has {table.numel()} entries; "
                "the cache's codec and the table do not match"
            )
    flat = codes.reshape(-1).to(torch.int32 if table.numel() < 2**31 else torch.int64)
    return torch.index_select(table, 0, flat).reshape(codes.shape)


class DequantizeFields:
    """A prefetch ``transform``: replaces code fields by their dequantised values.

    ``fields`` maps a code field to ``(output field, table)``, e.g.
    ``{"logprob_codes": ("logprobs", table)}``; the code field is removed from the batch. Each table
    is copied to the batch's device once and kept there.
    """

    def __init__(self, fields: Mapping[str, tuple[str, torch.Tensor]]) -> None:
        for name, (_, table) in fields.items():
            if table.ndim != 1:
                raise ConfigError(f"table for {name!r} must be 1-D, got {tuple(table.shape)}")
        self._fields = dict(fields)
        self._on_device: dict[tuple[str, torch.device], torch.Tensor] = {}

    def __call__(self, batch: Batch) -> Batch:
        out = dict(batch)
        for name, (target, table) in self._fields.items():
            if name not in out:
                raise ConfigError(f"batch has no field {name!r} to dequantise (has {sorted(out)})")
            codes = out.pop(name)
            key = (name, codes.device)
            if key not in self._on_device:
                self._on_device[key] = table.to(codes.device)
            out[target] = dequantize_table(codes, self._on_device[key])
        return out


def _to_device(batch: Batch, device: torch.device, non_blocking: bool) -> Batch:
    if not isinstance(batch, Mapping):
        raise ConfigError(
            f"the prefetcher expects batches that are dicts, got {type(batch).__name__}"
        )
    pin = non_blocking and device.type == "cuda"
    # a worker ring slot: mapped in place on the CPU, copied into pinned memory for CUDA
    out = {k: materialize(v, pin=pin) for k, v in batch.items()}
    return {
        k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
        for k, v in out.items()
    }


def _on_device(
    source: Iterator[Batch], device: torch.device, transform: Callable[[Batch], Batch] | None
) -> Iterator[Batch]:
    """The source's batches copied to ``device`` (CPU: synchronously) and transformed."""
    for host in source:
        batch = _to_device(host, device, non_blocking=False)
        yield transform(batch) if transform else batch


def _produce(source: Iterator[Batch], out: queue.Queue[Any], stop: threading.Event) -> None:
    """Thread body: move items from ``source`` to ``out`` until exhausted, failed or stopped."""
    item: Any
    try:
        for batch in source:
            item = batch
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.05)
                    break
                except queue.Full:
                    continue
            if stop.is_set():
                return
        item = _END
    except BaseException as exc:  # handed to the consumer, which re-raises it
        item = _Failure(exc)
    while not stop.is_set():
        try:
            out.put(item, timeout=0.05)
            return
        except queue.Full:
            continue


class DevicePrefetcher:
    """Iterate ``batches`` with each batch already on ``device`` and transformed.

    ``device`` defaults to the current CUDA device when CUDA is available, else CPU.
    ``background`` (default: on for CUDA) reads the source in a thread, ``depth`` batches ahead.
    Use as an iterator; ``close()`` or a ``with`` block stops the thread early.
    """

    def __init__(
        self,
        batches: Iterable[Batch],
        device: torch.device | str | None = None,
        *,
        transform: Callable[[Batch], Batch] | None = None,
        background: bool | None = None,
        depth: int = 2,
    ) -> None:
        # None: the process's own accelerator (cuda:$LOCAL_RANK under torchrun), else the CPU
        self.device = resolve_device("auto") if device is None else torch.device(device)
        self._cuda = self.device.type == "cuda"
        if self._cuda and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device} requested but CUDA is not available")
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ConfigError(f"depth must be an integer >= 1, got {depth!r}")
        self.transform = transform
        self.wait_seconds = 0.0
        self.batches = 0
        self._source: Iterator[Batch] | None = iter(batches)
        self._stream = torch.cuda.Stream(device=self.device) if self._cuda else None
        self._first = True
        self._pending: Any = None  # the batch in flight on the side stream (CUDA only)
        self._closed = False
        self._queue: queue.Queue[Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # on CPU a background thread also runs the transform (numpy releases the GIL), so the
        # decode overlaps the step; on CUDA the transform stays on the side stream, in order
        self._ready = False
        if self._cuda if background is None else background:
            self._queue = queue.Queue(maxsize=depth)
            produced = self._source
            if not self._cuda:
                produced = _on_device(self._source, self.device, transform)
                self._ready = True
            self._thread = threading.Thread(
                target=_produce,
                args=(produced, self._queue, self._stop),
                name="logitcache-prefetch",
                daemon=True,
            )
            self._thread.start()

    def __iter__(self) -> DevicePrefetcher:
        return self

    def _next_host(self) -> Any:
        """The next host batch, or ``_END``."""
        if self._queue is None:
            if self._source is None:
                return _END
            return next(self._source, _END)
        item = self._queue.get()
        if isinstance(item, _Failure):
            self.close()
            raise item.exc
        return item

    def _load(self) -> Any:
        """Fetch, copy and transform one batch (on the side stream on CUDA); ``_END`` at the end."""
        host = self._next_host()
        if host is _END or self._ready:
            return host
        if self._stream is None:
            batch = _to_device(host, self.device, non_blocking=False)
            return self.transform(batch) if self.transform else batch
        with torch.cuda.stream(self._stream):
            if self._first:
                self._stream.wait_stream(torch.cuda.current_stream(self.device))
                self._first = False
            batch = _to_device(host, self.device, non_blocking=True)
            return self.transform(batch) if self.transform else batch

    def __next__(self) -> Batch:
        if self._closed:
            raise StopIteration
        t0 = time.perf_counter()
        try:
            batch = self._pending if self._pending is not None else self._load()
            self._pending = None
            if isinstance(batch, _Failure):  # the look-ahead failed: raise it in order
                self.close()
                raise batch.exc
            if batch is not _END and self._stream is not None:
                current = torch.cuda.current_stream(self.device)
                current.wait_stream(self._stream)
                for value in batch.values():
                    if isinstance(value, torch.Tensor) and value.device.type == "cuda":
                        value.record_stream(current)
                try:  # start the next copy before the step runs
                    self._pending = self._load()
                except Exception as exc:
                    self._pending = _Failure(exc)
        finally:
            self.wait_seconds += time.perf_counter() - t0
        if batch is _END:
            self.close()
            raise StopIteration
        self.batches += 1
        return batch

    def close(self, timeout: float = 5.0) -> None:
        """Stop the background thread (waiting up to ``timeout`` s) and drop the source."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._queue is not None:
            while True:  # unblock a producer stuck on a full queue
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._thread = None
        self._pending = None
        self._source = None

    def stats(self) -> dict[str, float]:
        """``{"batches": n, "wait_seconds": s}`` so far."""
        return {"batches": float(self.batches), "wait_seconds": self.wait_seconds}

    def __enter__(self) -> DevicePrefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # getattr: __init__ may have failed before the attributes existed
        if not getattr(self, "_closed", True):
            self.close(timeout=1.0)
