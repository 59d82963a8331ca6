"""The sampled codec (RS-KD, Anshumann et al. 2025): unique ids drawn in ``samples`` draws.

Layout (full spec in ``docs/codecs.md``); P positions, E = sum of ``num_unique`` entries:

- ``num_unique`` [P], position level, the entry count array: uint8 when
  ``min(samples, vocab_size) <= 255``, uint16 when ``<= 65535``, else int32;
- ``id_delta_lo`` uint8 [E] and ``id_delta_hi`` uint8/uint16 [E] (uint16 when ``vocab_size >
  65536``): ids ascending within a position, difference coded with the first entry of each position
  absolute, split in byte planes (the top-k codec's ``"delta"`` id layout);
- ``count_minus1`` [E]: draws per id minus one, uint8 when ``samples <= 256``, uint16 when
  ``samples <= 65536``, else int32 (counts are >= 1 and most are 1 on real text, so the plane is
  mostly zeros);
- the sampled ids' teacher log-probs, by ``logprobs`` mode: ``"none"`` (nothing stored),
  ``"uint8"`` (``logprob_code`` uint8 [E], uniform in log space, see below) or ``"float16"``
  (``logprobs`` float16 [E]);
- ``temperature_lognorm`` float32 [P, num_temperatures], only when ``num_temperatures > 0``.

Why log-uniform for stored log-probs, unlike the top-k codec's sqrt quantiser: sampled log-probs
serve to reweight the draws at another temperature (``p ** (1/T - 1)``), where a *relative* error
matters, so the step is constant in log space: code ``c`` in ``1..255`` stands for
``floor + (c - 0.5) * (-floor / 255)`` (``c = 0``: ``-inf``); values below ``floor`` clip to code 1.
The error is at most half a step (0.039 nats with the default floor of -20) for log-probs in
``[floor, 0]``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from logitcache.errors import CodecError, ConfigError
from logitcache.format._decode import decode_entry_ids_np
from logitcache.format._sparse import (
    check_ids,
    check_int,
    check_keys,
    hi_dtype,
    require,
    split_planes,
)
from logitcache.format.codec import ArraySpec, TargetCodec, Targets, register_codec
from logitcache.format.targets import SampledTargets
from logitcache.format.topk import get_array

__all__ = ["SampledCodec"]

_LOGPROB_MODES = ("none", "uint8", "float16")


def _count_dtype(limit: int) -> str:
    return "uint8" if limit <= 255 else "uint16" if limit <= 65535 else "int32"


@functools.lru_cache(maxsize=16)
def _log_table(floor: float) -> np.ndarray:
    c = np.arange(256, dtype=np.float64)
    table = floor + (c - 0.5) * (-floor / 255.0)
    table[0] = -np.inf
    out = table.astype(np.float32)
    out.flags.writeable = False
    return out


def _segment_sums(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Per-position sums of an entry-level array (empty positions give 0)."""
    cs = np.zeros(values.shape[0] + 1, dtype=np.int64)
    np.cumsum(values, out=cs[1:])
    return cs[offsets[1:]] - cs[offsets[:-1]]


@register_codec
@dataclass(frozen=True)
class SampledCodec(TargetCodec):
    """Codec for :class:`SampledTargets` with ``samples`` draws per position.

    The manifest's codec entry spells the number of draws ``"n"`` (the on-disk key since format
    1.0); everywhere in Python it is ``samples``, as in ``TargetsInfo.samples`` and the dump's
    ``--samples``.
    """

    name: ClassVar[str] = "sampled"
    entry_count_array: ClassVar[str | None] = "num_unique"

    samples: int
    vocab_size: int
    num_temperatures: int = 0
    logprobs: str = "none"
    logprob_floor: float = -20.0

    def __post_init__(self) -> None:
        check_int("samples", self.samples, 1, 1 << 24)
        check_int("vocab_size", self.vocab_size, 1, 1 << 24)
        check_int("num_temperatures", self.num_temperatures, 0, 1024)
        require(
            self.logprobs in _LOGPROB_MODES,
            f"sampled logprobs mode must be one of {_LOGPROB_MODES}, got {self.logprobs!r}",
        )
        floor = self.logprob_floor
        require(
            isinstance(floor, int | float)
            and not isinstance(floor, bool)
            and math.isfinite(floor)
            and -1000.0 <= floor < 0,
            f"logprob_floor must be a finite negative number >= -1000, got {floor!r}",
        )
        object.__setattr__(self, "logprob_floor", float(floor))

    def value_table(self) -> np.ndarray:
        """float32 [256]: ``logprob_code`` -> log-prob (``table[0] = -inf``); mode ``"uint8"``."""
        if self.logprobs != "uint8":
            raise ConfigError(f"logprobs={self.logprobs!r} has no code table")
        return _log_table(self.logprob_floor).copy()

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "n": self.samples,  # the on-disk key
            "vocab_size": self.vocab_size,
            "num_temperatures": self.num_temperatures,
            "logprobs": self.logprobs,
            "logprob_floor": self.logprob_floor,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SampledCodec:
        keys = {"vocab_size", "num_temperatures", "logprobs", "logprob_floor"}
        check_keys(d, "sampled", keys | {"n"}, set())
        require(
            d.get("name", cls.name) == cls.name, f"not a sampled codec entry: {d.get('name')!r}"
        )
        return cls(samples=d["n"], **{key: d[key] for key in keys})

    def array_specs(self) -> tuple[ArraySpec, ...]:
        specs = [
            ArraySpec("num_unique", _count_dtype(min(self.samples, self.vocab_size)), "position"),
            ArraySpec("id_delta_lo", "uint8", "entry"),
            ArraySpec("id_delta_hi", hi_dtype(self.vocab_size), "entry"),
            ArraySpec("count_minus1", _count_dtype(self.samples - 1), "entry"),
        ]
        if self.logprobs == "uint8":
            specs.append(ArraySpec("logprob_code", "uint8", "entry"))
        elif self.logprobs == "float16":
            specs.append(ArraySpec("logprobs", "float16", "entry"))
        if self.num_temperatures:
            specs.append(
                ArraySpec("temperature_lognorm", "float32", "position", (self.num_temperatures,))
            )
        return tuple(specs)

    def encode(self, targets: Targets) -> dict[str, np.ndarray]:
        if not isinstance(targets, SampledTargets):
            raise CodecError(
                f"the sampled codec encodes SampledTargets, got {type(targets).__name__}"
            )
        t = targets
        offsets = t.offsets()
        ids = np.asarray(t.ids).astype(np.int64)
        self._check_targets(t, ids, offsets)
        d = np.diff(ids, prepend=0)
        starts = offsets[:-1][np.asarray(t.num_unique) > 0]
        d[starts] = ids[starts]
        lo, hi = split_planes(d, self.vocab_size)
        out = {
            "num_unique": np.asarray(t.num_unique).astype(
                _count_dtype(min(self.samples, self.vocab_size))
            ),
            "id_delta_lo": lo,
            "id_delta_hi": hi,
            "count_minus1": (np.asarray(t.counts) - 1).astype(_count_dtype(self.samples - 1)),
        }
        if self.logprobs != "none":
            out.update(self._encode_logprobs(t.logprobs))
        if self.num_temperatures:
            out["temperature_lognorm"] = np.ascontiguousarray(t.temperature_lognorm, np.float32)
        return out

    def _check_targets(self, t: SampledTargets, ids: np.ndarray, offsets: np.ndarray) -> None:
        require(
            t.temperature_lognorm.shape[1] == self.num_temperatures,
            f"targets carry {t.temperature_lognorm.shape[1]} temperature log-norms, the codec "
            f"expects num_temperatures={self.num_temperatures}",
            CodecError,
        )
        check_ids(ids, self.vocab_size, "sampled")
        counts = np.asarray(t.counts)
        require(
            counts.size == 0 or int(counts.min()) >= 1,
            "sampled counts must be >= 1 (an id that was not drawn is not stored)",
            CodecError,
        )
        sums = _segment_sums(counts, offsets)
        bad = np.flatnonzero(sums != self.samples)
        require(
            bad.size == 0,
            f"sampled counts of each position must sum to samples={self.samples}; position "
            f"{bad[0] if bad.size else -1} sums to {sums[bad[0]] if bad.size else -1}",
            CodecError,
        )
        first = np.zeros(ids.shape[0], dtype=bool)
        first[offsets[:-1][np.asarray(t.num_unique) > 0]] = True
        steps = np.diff(ids, prepend=-1)
        require(
            bool(np.all((steps > 0) | first)),
            "sampled ids must be strictly ascending (unique) within each position; "
            "sort them and merge duplicates (np.unique with return_counts) before encoding",
            CodecError,
        )
        require(
            (t.logprobs is not None) == (self.logprobs != "none"),
            f"codec logprobs={self.logprobs!r} but targets "
            f"{'carry' if t.logprobs is not None else 'lack'} log-probs",
            CodecError,
        )

    def _encode_logprobs(self, logprobs: np.ndarray | None) -> dict[str, np.ndarray]:
        lp = np.asarray(logprobs, dtype=np.float32)
        require(
            not np.isnan(lp).any() and not (lp > 1e-3).any(),
            "sampled log-probs must be <= 0 and not NaN (log-probs at T=1, not logits)",
            CodecError,
        )
        if self.logprobs == "float16":
            return {"logprobs": lp.astype(np.float16)}
        floor = self.logprob_floor
        c = np.clip(np.floor((lp.astype(np.float64) - floor) * (255.0 / -floor)), 0, 254) + 1
        c[np.isneginf(lp)] = 0
        return {"logprob_code": c.astype(np.uint8)}

    def decode(self, arrays: Mapping[str, np.ndarray]) -> SampledTargets:
        nu_dtype = _count_dtype(min(self.samples, self.vocab_size))
        num_unique = get_array(arrays, "num_unique", nu_dtype, (-1,)).astype(np.int32)
        p = num_unique.shape[0]
        offsets = np.zeros(p + 1, dtype=np.int64)
        np.cumsum(num_unique, out=offsets[1:])
        e = int(offsets[-1])
        lo = get_array(arrays, "id_delta_lo", "uint8", (e,))
        hi = get_array(arrays, "id_delta_hi", hi_dtype(self.vocab_size), (e,))
        ids = decode_entry_ids_np(lo, hi, num_unique)
        if e and int(ids.max()) >= self.vocab_size:
            raise CodecError(
                f"decoded sampled id {int(ids.max())} >= vocab_size {self.vocab_size}: "
                "the id arrays are corrupted or belong to another codec"
            )
        count_dtype = _count_dtype(self.samples - 1)
        counts = get_array(arrays, "count_minus1", count_dtype, (e,)).astype(np.int32)
        counts += 1
        sums = _segment_sums(counts, offsets)
        if p and not (bool(np.all(sums == self.samples)) and int(num_unique.min()) >= 1):
            raise CodecError(
                f"decoded sampled counts do not sum to samples={self.samples} at every position: "
                "the count arrays are corrupted"
            )
        logprobs: np.ndarray | None = None
        if self.logprobs == "uint8":
            codes = get_array(arrays, "logprob_code", "uint8", (e,))
            logprobs = _log_table(self.logprob_floor)[codes]
        elif self.logprobs == "float16":
            logprobs = get_array(arrays, "logprobs", "float16", (e,)).astype(np.float32)
        if self.num_temperatures:
            tln = get_array(arrays, "temperature_lognorm", "float32", (p, self.num_temperatures))
        else:
            tln = np.zeros((p, 0), dtype=np.float32)
        return SampledTargets(num_unique, ids.astype(np.int32), counts, logprobs, tln)
