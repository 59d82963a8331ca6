"""The training data path: sampler, datasets, collate, device prefetcher and ``make_loader``.

Read ``docs/loader.md`` first. The shortest path is :func:`make_loader`, which wires a
:class:`RowSampler`, a dataset (:class:`StreamingLogitDataset` or :class:`CachedLogitDataset`), a
DataLoader and a :class:`DevicePrefetcher` with :class:`TargetDequantizer`, and exposes
``state_dict()``/``load_state_dict()`` for exact resume. :func:`teacher_targets` hands a batch's
targets to ``logitcache.loss``.
"""

from __future__ import annotations

from logitcache.data.collate import IGNORE_INDEX, Collator, PositionSelector, TargetOptions
from logitcache.data.dataset import CachedLogitDataset, StreamingLogitDataset
from logitcache.data.loader import CachedLogitLoader, make_loader
from logitcache.data.prefetch import DequantizeFields, DevicePrefetcher, dequantize_table
from logitcache.data.sampler import RowBatch, RowSampler
from logitcache.data.targets import TargetDequantizer, teacher_targets

__all__ = [
    "IGNORE_INDEX",
    "CachedLogitDataset",
    "CachedLogitLoader",
    "Collator",
    "DequantizeFields",
    "DevicePrefetcher",
    "PositionSelector",
    "RowBatch",
    "RowSampler",
    "StreamingLogitDataset",
    "TargetDequantizer",
    "TargetOptions",
    "dequantize_table",
    "make_loader",
    "teacher_targets",
]
