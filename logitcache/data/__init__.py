"""The training data path: sampler, (later) dataset and collate, and the device prefetcher."""

from __future__ import annotations

from logitcache.data.prefetch import DequantizeFields, DevicePrefetcher, dequantize_table
from logitcache.data.sampler import RowBatch, RowSampler

__all__ = [
    "DequantizeFields",
    "DevicePrefetcher",
    "RowBatch",
    "RowSampler",
    "dequantize_table",
]
