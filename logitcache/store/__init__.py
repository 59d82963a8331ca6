"""Shard stores: Zarr v3 and Arrow IPC backends behind one writer and one reader."""

from logitcache.store.backends import BACKENDS
from logitcache.store.base import ShardData
from logitcache.store.reader import CacheReader, Rows, read_manifest
from logitcache.store.share import CopyReport, copy_cache, merge_caches
from logitcache.store.writer import CacheHeader, CacheWriter, check_output, finalize_cache

__all__ = [
    "BACKENDS",
    "CacheHeader",
    "CacheReader",
    "CacheWriter",
    "CopyReport",
    "Rows",
    "ShardData",
    "check_output",
    "copy_cache",
    "finalize_cache",
    "merge_caches",
    "read_manifest",
]
