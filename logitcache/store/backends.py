"""Backend registry: the manifest's ``backend`` name -> a :class:`ShardBackend`."""

from __future__ import annotations

from logitcache.errors import ConfigError
from logitcache.format.codec import TargetCodec
from logitcache.store._arrow import ArrowBackend
from logitcache.store._zarr import ZarrBackend
from logitcache.store.base import ShardBackend

__all__ = ["BACKENDS", "backend_for"]

BACKENDS = ("zarr", "arrow")


def backend_for(name: str, codec: TargetCodec) -> ShardBackend:
    """The backend called ``name``, set up for ``codec``'s arrays."""
    if name == "zarr":
        return ZarrBackend()
    if name == "arrow":
        return ArrowBackend(codec.entry_count_array)
    raise ConfigError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
