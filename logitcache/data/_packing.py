"""One buffer per batch: every array of a collated batch packed into a single uint8 tensor.

Why: a DataLoader worker hands each tensor to the main process as its own shared-memory segment
(a file descriptor passed over a socket, a mapping, a page-faulting copy), and ``pin_memory`` and
the host-to-device copy each cost a call per tensor too. A batch of a dozen fields paid that a
dozen times; as one buffer it pays once, and on the device the fields are views into the copied
buffer (no further copy). Fields start at 64-byte offsets so that every dtype view is aligned.

Inside a DataLoader worker the buffer is allocated **in shared memory** from the start
(:func:`allocate`), and the collate writes the big fields straight into it: torch then sends the
existing segment's descriptor instead of copying the batch into a fresh segment (pack-then-copy
cost a 5 MB copy and as many page faults per batch). In the main process it is ordinary memory.

A packed batch is ``{"packed": uint8 [nbytes], "layout": ((name, dtype, shape, offset), ...)}``
plus its non-tensor fields; :func:`unpack` (which :class:`~logitcache.data.TargetDequantizer`
calls) restores the dict of tensors on whatever device the buffer is on.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
import torch.utils.data

__all__ = ["allocate", "pack", "unpack"]

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


def _buffer(nbytes: int) -> torch.Tensor:
    """A uint8 tensor of ``nbytes``: in shared memory inside a DataLoader worker."""
    if torch.utils.data.get_worker_info() is None or nbytes == 0:
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
    buffer = _buffer(offset)
    raw = buffer.numpy()
    views: dict[str, np.ndarray] = {}
    for name, dtype, shape, start in layout:
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        views[name] = raw[start : start + n].view(dtype).reshape(shape)
    return {"packed": buffer, "layout": tuple(layout)}, views


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
    buffer: torch.Tensor = batch["packed"]
    out = {k: v for k, v in batch.items() if k not in ("packed", "layout")}
    for name, dtype, shape, start in batch["layout"]:
        td = _DTYPES[dtype]
        n = int(np.prod(shape, dtype=np.int64)) * torch.empty(0, dtype=td).element_size()
        out[name] = buffer[start : start + n].view(td).view(shape)
    return out
