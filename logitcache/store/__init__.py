"""Shard stores: Zarr v3 and Arrow IPC backends behind one writer and one reader."""

from logitcache.store.backends import BACKENDS
from logitcache.store.base import EncodedRows
from logitcache.store.finalize import finalize_cache
from logitcache.store.header import CacheHeader
from logitcache.store.reader import CacheReader, Rows, read_manifest
from logitcache.store.share import CopyReport, copy_cache, merge_caches
from logitcache.store.writer import CacheWriter, check_output

__all__ = [
    "BACKENDS",
    "CacheHeader",
    "CacheReader",
    "CacheWriter",
    "CopyReport",
    "EncodedRows",
    "Rows",
    "check_output",
    "copy_cache",
    "finalize_cache",
    "merge_caches",
    "read_manifest",
]
