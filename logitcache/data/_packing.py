"""One buffer per batch: every array of a collated batch packed into a single uint8 tensor.

Why: a DataLoader worker hands each tensor to the main process as its own shared-memory segment
(a file descriptor passed over a socket, a mapping, a page-faulting copy), and ``pin_memory`` and
the host-to-device copy each cost a call per tensor too. A batch of a dozen fields paid that a
dozen times; as one buffer it pays once, and on the device the fields are views into the copied
buffer (no further copy). Fields start at 64-byte offsets so that every dtype view is aligned.

Inside a DataLoader worker the buffer is a slot of the worker's **ring of shared-memory
segments** (see below), and the collate writes the big fields straight into it: a batch then
crosses to the main process as a small token, with no copy, no new segment and no descriptor
passing (a fresh segment per batch cost ~3 ms per 3.6 MB batch on both sides, as much as decoding
it). In the main process it is ordinary memory.

A packed batch is ``{"packed": uint8 [nbytes], "layout": ((name, dtype, shape, offset), ...)}``
plus its non-tensor fields (``packed`` is a :class:`SharedBuffer` when it comes from a worker's
ring); :func:`unpack` (which :class:`~logitcache.data.TargetDequantizer` calls) restores the dict
of tensors on whatever device the buffer is on.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
import torch.utils.data

from logitcache.errors import LoaderError

__all__ = ["LentBuffer", "SharedBuffer", "allocate", "materialize", "pack", "prune_rings", "unpack"]

_ALIGN = 64
_DTYPES: dict[str, torch.dtype] = {
    "bool": torch.bool,
    "uint8": torch.uint8,
    "uint16": torch.uint16,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "float16": torch.float16,
    "float32": torch.float32,
}

Layout = tuple[tuple[str, str, tuple[int, ...], int], ...]
#: ``(name, numpy dtype, shape)`` of one field to allocate
FieldSpec = tuple[str, Any, tuple[int, ...]]


def _in_worker(nbytes: int) -> bool:
    return nbytes > 0 and torch.utils.data.get_worker_info() is not None


def _buffer(nbytes: int) -> torch.Tensor:
    """A uint8 tensor of ``nbytes``: in shared memory inside a DataLoader worker."""
    if not _in_worker(nbytes):
        return torch.empty(nbytes, dtype=torch.uint8)
    # a storage born shared: the worker's pickler sends its descriptor, no copy into a new segment
    storage = torch.UntypedStorage._new_shared(nbytes)
    return torch.empty(0, dtype=torch.uint8).set_(storage)


def allocate(specs: Iterable[FieldSpec]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """One buffer for ``specs``: ``(packed batch without its other fields, numpy views)``.

    Fill the views in place, then add the non-tensor fields to the returned dict.
    """
    layout: list[tuple[str, str, tuple[int, ...], int]] = []
    offset = 0
    for name, dtype, shape in specs:
        dt = np.dtype(dtype)
        layout.append((name, dt.name, tuple(int(s) for s in shape), offset))
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        offset += -(-nbytes // _ALIGN) * _ALIGN
    packed: torch.Tensor | LentBuffer
    lent = _worker_ring().lend(offset) if _in_worker(offset) else None
    if lent is not None:
        packed, raw = lent, lent.tensor.numpy()
    else:
        packed = _buffer(offset)
        raw = packed.numpy()
    views: dict[str, np.ndarray] = {}
    for name, dtype, shape, start in layout:
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        views[name] = raw[start : start + n].view(dtype).reshape(shape)
    return {"packed": packed, "layout": tuple(layout)}, views


def pack(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Pack the numpy arrays of ``fields`` into one buffer; other values pass through."""
    arrays = {k: v for k, v in fields.items() if isinstance(v, np.ndarray)}
    out, views = allocate((k, v.dtype, v.shape) for k, v in arrays.items())
    for name, value in arrays.items():
        views[name][...] = value
    out.update({k: v for k, v in fields.items() if not isinstance(v, np.ndarray)})
    return out


def unpack(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The dict of tensors a packed batch holds (views into its buffer); others pass through."""
    if "packed" not in batch:
        return dict(batch)
    buffer: torch.Tensor = materialize(batch["packed"])
    out = {k: v for k, v in batch.items() if k not in ("packed", "layout")}
    for name, dtype, shape, start in batch["layout"]:
        td = _DTYPES[dtype]
        n = int(np.prod(shape, dtype=np.int64)) * torch.empty(0, dtype=td).element_size()
        out[name] = buffer[start : start + n].view(td).view(shape)
    return out


# -- reusable shared buffers for DataLoader workers ------------------------------------------------
#
# Each worker keeps a small ring of segments and lends one per batch. A segment crosses to the
# main process once (its descriptor, with its first batch); after that a batch pickles as a
# (ring, slot, size) token. The main process maps the slot in place (or copies it into pinned
# memory for a CUDA copy) and the slot is marked free in a shared flags array, which the worker
# reads before reusing it, when the last view of the batch's bytes is garbage-collected. A batch
# dropped unread frees its slot when it is collected; a worker that finds no free slot allocates
# a one-off segment as before, so a consumer that holds on to batches costs speed, never
# correctness.

#: slots per worker: the DataLoader keeps ``prefetch_factor`` (2) batches per worker in flight,
#: the pin-memory thread and the prefetcher hold one or two more
_RING_SLOTS = 6


class _Ring:
    """A worker's lendable segments and the shared flags (1 = lent) that the consumer clears."""

    def __init__(self) -> None:
        self.key = (os.getpid(), secrets.token_hex(8))
        self.flags = torch.zeros(_RING_SLOTS, dtype=torch.uint8).share_memory_()
        self.buffers: list[torch.Tensor | None] = [None] * _RING_SLOTS
        self.announced = False

    def lend(self, nbytes: int) -> LentBuffer | None:
        """A free slot of at least ``nbytes``, marked lent; None when every slot is out."""
        flags = self.flags.numpy()
        free = np.flatnonzero(flags == 0)
        if free.size == 0:
            return None
        slot = int(free[0])
        flags[slot] = 1
        buffer = self.buffers[slot]
        segment_once = None  # a new segment crosses to the consumer with this batch
        if buffer is None or buffer.numel() < nbytes:  # with headroom: batch sizes vary
            storage = torch.UntypedStorage._new_shared(nbytes + nbytes // 4)
            buffer = segment_once = torch.empty(0, dtype=torch.uint8).set_(storage)
            self.buffers[slot] = buffer
        flags_once = None if self.announced else self.flags
        self.announced = True
        return LentBuffer(self.key, slot, buffer[:nbytes], segment_once, flags_once)


_WORKER_RING: _Ring | None = None


def _worker_ring() -> _Ring:
    global _WORKER_RING
    if _WORKER_RING is None or _WORKER_RING.key[0] != os.getpid():
        _WORKER_RING = _Ring()
    return _WORKER_RING


class LentBuffer:
    """Worker side: a batch buffer in a ring slot; pickles as a token plus, once, the segment."""

    def __init__(
        self,
        ring: tuple[int, str],
        slot: int,
        tensor: torch.Tensor,
        segment: torch.Tensor | None,
        flags: torch.Tensor | None,
    ) -> None:
        self.ring, self.slot, self.tensor = ring, slot, tensor
        self._segment, self._flags = segment, flags

    def __reduce__(self) -> tuple[Any, ...]:
        args = (self.ring, self.slot, self.tensor.numel(), self._segment, self._flags)
        return (_received, args)


class _RingEntry:
    """The main process's mapping of one worker ring."""

    def __init__(self, flags: torch.Tensor) -> None:
        self.flags = flags.numpy()
        self._flags_tensor = flags
        self.segments: dict[int, torch.Tensor] = {}


_RINGS: dict[tuple[int, str], _RingEntry] = {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prune_rings() -> None:
    """Drop the main process's mappings of rings whose worker has exited."""
    for key in [k for k in _RINGS if not _alive(k[0])]:
        del _RINGS[key]


def _received(
    ring: tuple[int, str],
    slot: int,
    nbytes: int,
    segment: torch.Tensor | None,
    flags: torch.Tensor | None,
) -> SharedBuffer:
    entry = _RINGS.get(ring)
    if entry is None:
        if flags is None:
            raise LoaderError(
                f"a batch from DataLoader worker {ring[0]} names a shared buffer this process "
                "never received; batches of one worker must be unpickled in one process"
            )
        prune_rings()
        entry = _RINGS[ring] = _RingEntry(flags)
    if segment is not None:
        entry.segments[slot] = segment
    return SharedBuffer(entry, slot, nbytes)


class SharedBuffer:
    """Main side: a batch still in a worker's ring slot.

    :meth:`lease` maps it without a copy; the slot is freed when the last tensor or array viewing
    it is garbage-collected (a finalizer on the one numpy array every view keeps alive).
    :meth:`take` copies it out (e.g. into pinned memory) and frees the slot at once. A batch that
    is never read frees its slot when it is collected.
    """

    def __init__(self, entry: _RingEntry, slot: int, nbytes: int) -> None:
        self._entry: _RingEntry | None = entry
        self._slot, self.nbytes = slot, nbytes

    def _segment(self) -> tuple[_RingEntry, torch.Tensor]:
        """The ring entry and the slot's segment; raises once the buffer has been read."""
        entry = self._entry
        if entry is None:
            raise LoaderError("this shared batch buffer was already read (a batch is read once)")
        segment = entry.segments.get(self._slot)
        if segment is None:
            raise LoaderError(
                f"a worker batch names ring slot {self._slot}, whose shared segment never reached "
                "this process (a batch of that worker was lost in transit); restart the loader"
            )
        return entry, segment

    def lease(self) -> torch.Tensor:
        """The batch bytes in place; the slot stays lent while any view of them is alive."""
        entry, segment = self._segment()
        owner = segment.numpy()  # a new array object: every view below keeps it alive
        weakref.finalize(owner, _release, entry, self._slot)
        self._entry = None  # the finalizer frees the slot now, not this object
        return torch.from_numpy(owner[: self.nbytes])

    def take(self, pin: bool = False) -> torch.Tensor:
        """The batch bytes copied into this process's memory (pinned if ``pin``); frees the slot."""
        out = torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=pin)
        # numpy's copy: torch's would wake its intra-op threads, which spin against the workers
        np.copyto(out.numpy(), self._segment()[1][: self.nbytes].numpy())
        self.release()
        return out

    def pin_memory(self, device: Any = None) -> torch.Tensor:
        """The DataLoader's pin-memory thread calls this: copy into pinned memory, free the slot."""
        return self.take(pin=True)

    def release(self) -> None:
        if self._entry is not None:
            _release(self._entry, self._slot)
            self._entry = None

    def __reduce__(self) -> tuple[Any, ...]:
        return (_as_is, (self.take(),))

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.release()


def _release(entry: _RingEntry, slot: int) -> None:
    entry.flags[slot] = 0


def _as_is(value: Any) -> Any:
    return value


def materialize(value: Any, pin: bool = False) -> Any:
    """A batch's buffer as a tensor of this process: a :class:`SharedBuffer` is leased in place,
    or copied into pinned memory with ``pin``."""
    if isinstance(value, SharedBuffer):
        return value.take(pin=True) if pin else value.lease()
    if isinstance(value, LentBuffer):
        return value.tensor
    return value
