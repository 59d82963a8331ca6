"""One buffer per batch: every array of a collated batch packed into a single uint8 tensor.

Why: a DataLoader worker hands each tensor to the main process as its own shared-memory segment
(a file descriptor passed over a socket, a mapping, a page-faulting copy), and ``pin_memory`` and
the host-to-device copy each cost a call per tensor too. A batch of a dozen fields paid that a
dozen times; as one buffer it pays once, and on the device the fields are views into the copied
buffer (no further copy). Fields start at 64-byte offsets so that every dtype view is aligned.

A packed batch is ``{"packed": uint8 [nbytes], "layout": ((name, dtype, shape, offset), ...)}``
plus its non-tensor fields; :func:`unpack` (which :class:`~logitcache.data.TargetDequantizer`
calls) restores the dict of tensors on whatever device the buffer is on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["pack", "unpack"]

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


def pack(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Pack the numpy arrays of ``fields`` into one buffer; other values pass through."""
    layout: list[tuple[str, str, tuple[int, ...], int]] = []
    offset = 0
    for name, value in fields.items():
        if isinstance(value, np.ndarray):
            layout.append((name, value.dtype.name, tuple(value.shape), offset))
            offset += -(-value.nbytes // _ALIGN) * _ALIGN
    buffer = np.empty(offset, dtype=np.uint8)
    for name, dtype, shape, start in layout:
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        buffer[start : start + n].view(dtype).reshape(shape)[...] = fields[name]
    out = {k: v for k, v in fields.items() if not isinstance(v, np.ndarray)}
    out["packed"] = torch.from_numpy(buffer)
    out["layout"] = tuple(layout)
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
