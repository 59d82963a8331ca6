"""The codec interface: sparse targets <-> a few named numpy arrays that a store writes as-is.

A codec turns :class:`TopKTargets` or :class:`SampledTargets` (a flat run of positions) into named
arrays whose leading axis is one of two *levels*:

- ``"position"``: one item per stored position, e.g. ``[P, k]`` uint8 codes;
- ``"entry"``: one item per ragged entry (sampled targets), ``[E]``; the position-level array named
  by :attr:`TargetCodec.entry_count_array` says how many entries each position has.

Everything a plain-zarr or plain-pyarrow reader must undo (delta coding, quantisation, byte
planes) happens here and is documented in ``docs/format.md``; the store only adds standard
lossless compression (zstd). Because every array is per position or per entry, any run of whole
positions decodes independently of the rest of the shard: that is what makes random access by
(row id, position) cheap.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np

from logitcache.errors import CodecError
from logitcache.format.targets import SampledTargets, TopKTargets

__all__ = ["ArraySpec", "Level", "TargetCodec", "Targets", "codec_from_dict", "register_codec"]

Level = Literal["position", "entry"]
Targets = TopKTargets | SampledTargets


@dataclass(frozen=True)
class ArraySpec:
    """One stored array: its name, numpy dtype string, level, and shape after the leading axis."""

    name: str
    dtype: str
    level: Level
    inner_shape: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "level": self.level,
            "inner_shape": list(self.inner_shape),
        }


class TargetCodec(ABC):
    """Base of the target codecs. Subclasses are frozen dataclasses of their parameters."""

    #: codec name as written in the manifest (``codec.name``)
    name: ClassVar[str]
    #: position-level array holding the number of entries per position (None: no entry level)
    entry_count_array: ClassVar[str | None] = None

    @abstractmethod
    def array_specs(self) -> tuple[ArraySpec, ...]:
        """The arrays :meth:`encode` produces, in a fixed order."""

    @abstractmethod
    def encode(self, targets: Targets) -> dict[str, np.ndarray]:
        """Encode a run of positions; every array in :meth:`array_specs` is present."""

    @abstractmethod
    def decode(self, arrays: Mapping[str, np.ndarray]) -> Targets:
        """Decode arrays holding a run of whole positions (and all of their entries)."""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """JSON-able parameters, including ``"name"``; :func:`codec_from_dict` inverts it."""

    @classmethod
    @abstractmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TargetCodec:
        """Rebuild from :meth:`to_dict` output, validating every field."""


_REGISTRY: dict[str, type[TargetCodec]] = {}


def register_codec(cls: type[TargetCodec]) -> type[TargetCodec]:
    """Class decorator: make ``cls`` constructible from a manifest's ``codec`` entry."""
    _REGISTRY[cls.name] = cls
    return cls


def codec_from_dict(d: Mapping[str, Any]) -> TargetCodec:
    """Build the codec a manifest describes; unknown names are refused with the known ones."""
    name = d.get("name") if isinstance(d, Mapping) else None
    if name not in _REGISTRY:
        raise CodecError(
            f"unknown codec {name!r} in manifest; this logitcache knows {sorted(_REGISTRY)}. "
            "The cache was probably written by a newer logitcache: upgrade to read it."
        )
    return _REGISTRY[name].from_dict(d)
