"""The top-k codec: the k most likely ids per position and their log-probs, a few bytes per entry.

Layout (all arrays position level, leading axis = positions; full spec in ``docs/codecs.md``):

- ids, sorted ascending within each position, by ``id_layout`` (see ``_decode``): ``"hi-delta"``
  (default) stores ``id_lo`` uint8 [P, k] (the low byte of each id) and ``id_hi_delta`` uint8
  [P, k] (+ ``id_hi_delta_top`` uint8 [P, k] when ``vocab_size > 65536``): the differences of
  ``id >> 8``; ``"delta"`` (caches written before format 1.2) stores ``id_delta_lo`` uint8 and
  ``id_delta_hi`` uint8/uint16 [P, k], byte planes of the id differences. Decoded entries
  therefore come back **sorted by id**, not by probability.
- values, one of three modes:
  - ``"sqrt"`` (default, quantised): ``value_code`` [P, k] and ``tail_code`` [P], uint8 when
    ``levels <= 255`` else uint16; code ``c`` means unnormalised probability
    ``((c - 0.5) / levels) ** 2`` (``c = 0``: ``-inf``, padding); decoding renormalises so the k
    probabilities plus the tail sum to 1.
  - ``"float16"``: ``logprobs`` float16 [P, k] and ``tail_logprob`` float32 [P];
  - ``"float32"``: ``logprobs`` float32 [P, k] and ``tail_logprob`` float32 [P] (lossless).
- ``temperature_lognorm`` float32 [P, num_temperatures], only when ``num_temperatures > 0``.

Why this shape. On real distributions truncation (what is outside the top k) costs ~0.5 nats while
8-bit values cost ~1e-3, so the bytes go to ids, and values get just enough precision: ``levels``
is chosen from a KL budget (default 1e-3 nats/token) rather than fixed at 255. The tail mass is
quantised like one more entry, which keeps the error bound simple: before renormalisation every
bucket's ``sqrt(p)`` is within ``1 / (2 levels)``; the expected KL(exact || decoded) over the k + 1
buckets is ``(k + 1) / (6 levels**2)`` and it never exceeds ``9 (k + 1) / (4 levels**2)``
(chi-square bound, midpoint reconstruction keeps every stored entry's ratio ``p/q <= 4``).
Dequantisation is one table gather plus a per-position normaliser, so the loader can ship the
uint8 codes to the GPU and expand them there (:meth:`TopKCodec.value_table`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from logitcache.errors import CodecError, ConfigError
from logitcache.format._decode import (
    ID_LAYOUTS,
    bad_id_positions,
    decode_ids_np,
    encode_ids,
    id_array_dtypes,
    sqrt_dequantize_np,
)
from logitcache.format._sparse import (
    MAX_LEVELS,
    check_ids,
    check_int,
    check_keys,
    code_dtype,
    levels_for_kl,
    require,
    sqrt_encode,
    sqrt_tables,
)
from logitcache.format.codec import ArraySpec, TargetCodec, Targets, register_codec
from logitcache.format.targets import TopKTargets

__all__ = ["DEFAULT_QUANT_KL", "TopKCodec"]

#: KL budget (nats/token, expected) used to pick ``levels`` when none is given.
DEFAULT_QUANT_KL = 1e-3
_VALUE_MODES = ("sqrt", "float16", "float32")


def get_array(
    arrays: Mapping[str, np.ndarray], name: str, dtype: str, shape: tuple[int, ...]
) -> np.ndarray:
    """Fetch one stored array and check its dtype and shape (-1 = any length)."""
    require(name in arrays, f"array {name!r} is missing; got {sorted(arrays)}", CodecError)
    a = np.asarray(arrays[name])
    ok = len(shape) == a.ndim and all(s in (-1, g) for s, g in zip(shape, a.shape, strict=True))
    require(
        a.dtype == np.dtype(dtype) and ok,
        f"array {name!r} should be {dtype} of shape {shape} (-1: any), got {a.dtype} {a.shape}; "
        "the shard is damaged or was written with other codec parameters",
        CodecError,
    )
    return a


def _stable_id_order(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(ids sorted ascending per row, the permutation or None for the identity) of ids [P, k]
    in ``[0, 2**31)``: exactly ``np.argsort(ids, axis=1, kind="stable")``, computed as one sort
    of ``id << 32 | column`` uint64 keys (distinct, so any sort is stable; numpy sorts them with
    SIMD), or nothing when the ids come sorted (``logitcache import`` sorts them). Measured on
    100k positions at k=64 (``scripts/bench_interop.py``): ~4x faster than the stable argsort
    and its two gathers, which were the largest single cost of encoding."""
    if ids.size and _ascending(ids[:1]) and _ascending(ids):  # row 0 first: a cheap "no"
        return ids, None
    key = ids.astype(np.uint64)
    key <<= np.uint64(32)
    key |= np.arange(ids.shape[1], dtype=np.uint64)
    key.sort(axis=1)
    order = key.astype(np.uint32).astype(np.intp)  # the cast keeps the low 32 bits
    key >>= np.uint64(32)
    return key.view(np.int64), order


def _ascending(ids: np.ndarray) -> bool:
    return bool((ids[:, 1:] >= ids[:, :-1]).all())


@register_codec
@dataclass(frozen=True)
class TopKCodec(TargetCodec):
    """Codec for :class:`TopKTargets`. ``levels=None`` picks levels for a 1e-3 nats/token budget.

    ``id_layout``: how ids are stored (``"hi-delta"``, the default, or ``"delta"``, what caches
    before format 1.2 hold; a manifest's codec entry without the key means ``"delta"``).
    """

    name: ClassVar[str] = "topk"

    k: int
    vocab_size: int
    num_temperatures: int = 0
    values: str = "sqrt"
    levels: int | None = None
    id_layout: str = ID_LAYOUTS[0]

    def __post_init__(self) -> None:
        require(
            self.id_layout in ID_LAYOUTS,
            f"top-k id_layout must be one of {ID_LAYOUTS}, got {self.id_layout!r}",
        )
        check_int("k", self.k, 1, 1 << 24)
        check_int("vocab_size", self.vocab_size, 1, 1 << 24)
        check_int("num_temperatures", self.num_temperatures, 0, 1024)
        require(
            self.values in _VALUE_MODES,
            f"top-k values mode must be one of {_VALUE_MODES}, got {self.values!r}",
        )
        if self.values != "sqrt":
            require(
                self.levels is None,
                f"levels applies to values='sqrt' only, got levels={self.levels} with "
                f"values={self.values!r}; drop levels",
            )
            return
        if self.levels is None:
            object.__setattr__(self, "levels", levels_for_kl(self.k + 1, DEFAULT_QUANT_KL))
        check_int("levels", self.levels, 1, MAX_LEVELS)

    # -- parameters ---------------------------------------------------------------------------

    @property
    def quant_levels(self) -> int:
        """Sqrt quantiser levels (``values='sqrt'`` only)."""
        if self.levels is None:
            raise ConfigError(f"values={self.values!r} is not quantised: it has no levels")
        return int(self.levels)

    def expected_kl(self) -> float:
        """Expected quantisation KL(exact || decoded) per position, nats: ``(k+1) / (6 L**2)``."""
        return (self.k + 1) / (6.0 * self.quant_levels**2)

    def kl_bound(self) -> float:
        """Worst-case quantisation KL per position, nats: ``9 (k+1) / (4 L**2)``."""
        return 9.0 * (self.k + 1) / (4.0 * self.quant_levels**2)

    def value_table(self) -> np.ndarray:
        """float32 [levels + 1]: code -> unnormalised log-prob (``table[0] = -inf``).

        Dequantise a run of positions (on any device) as::

            logq = table[value_code]; logt = table[tail_code]
            logz = logsumexp(concat(logq, logt[:, None]), axis=1)
            logprobs = logq - logz[:, None]; tail_logprob = logt - logz
        """
        return sqrt_tables(self.quant_levels)[0].copy()

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "k": self.k,
            "vocab_size": self.vocab_size,
            "num_temperatures": self.num_temperatures,
            "values": self.values,
        }
        if self.values == "sqrt":
            d["levels"] = self.levels
        if self.id_layout != "delta":  # absent: the layout of caches before format 1.2
            d["id_layout"] = self.id_layout
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TopKCodec:
        required = {"k", "vocab_size", "num_temperatures", "values"}
        check_keys(d, "topk", required, {"levels", "id_layout"})
        require(d.get("name", cls.name) == cls.name, f"not a topk codec entry: {d.get('name')!r}")
        return cls(
            k=d["k"],
            vocab_size=d["vocab_size"],
            num_temperatures=d["num_temperatures"],
            values=d["values"],
            levels=d.get("levels"),
            id_layout=d.get("id_layout", "delta"),
        )

    def array_specs(self) -> tuple[ArraySpec, ...]:
        k = (self.k,)
        specs = [
            ArraySpec(name, dtype, "position", k)
            for name, dtype in id_array_dtypes(self.id_layout, self.vocab_size).items()
        ]
        if self.values == "sqrt":
            cd = code_dtype(self.quant_levels)
            specs += [
                ArraySpec("value_code", cd, "position", k),
                ArraySpec("tail_code", cd, "position"),
            ]
        else:
            specs += [
                ArraySpec("logprobs", self.values, "position", k),
                ArraySpec("tail_logprob", "float32", "position"),
            ]
        if self.num_temperatures:
            specs.append(
                ArraySpec("temperature_lognorm", "float32", "position", (self.num_temperatures,))
            )
        return tuple(specs)

    # -- encode / decode ----------------------------------------------------------------------

    def encode(self, targets: Targets) -> dict[str, np.ndarray]:
        if not isinstance(targets, TopKTargets):
            raise CodecError(f"the topk codec encodes TopKTargets, got {type(targets).__name__}")
        self._check_targets(targets)
        ids_sorted, order = _stable_id_order(np.asarray(targets.ids))
        out = encode_ids(ids_sorted, self.id_layout, self.vocab_size)
        logprobs = np.asarray(targets.logprobs)
        if order is not None:
            logprobs = np.take_along_axis(logprobs, order, axis=1)
        if self.values == "sqrt":
            out["value_code"] = sqrt_encode(logprobs, self.quant_levels)
            out["tail_code"] = sqrt_encode(np.asarray(targets.tail_logprob), self.quant_levels)
        else:
            out["logprobs"] = logprobs.astype(self.values)
            out["tail_logprob"] = np.asarray(targets.tail_logprob, dtype=np.float32)
        if self.num_temperatures:
            out["temperature_lognorm"] = np.ascontiguousarray(
                targets.temperature_lognorm, dtype=np.float32
            )
        return out

    def _check_targets(self, t: TopKTargets) -> None:
        require(
            t.k == self.k,
            f"targets have k={t.k} but the codec was built for k={self.k}",
            CodecError,
        )
        require(
            t.temperature_lognorm.shape[1] == self.num_temperatures,
            f"targets carry {t.temperature_lognorm.shape[1]} temperature log-norms, the codec "
            f"expects num_temperatures={self.num_temperatures}",
            CodecError,
        )
        check_ids(np.asarray(t.ids), self.vocab_size, "top-k")
        require(
            not (np.isnan(t.logprobs).any() or np.isnan(t.tail_logprob).any()),
            "top-k log-probs or tail_logprob contain NaN; the teacher output is broken",
            CodecError,
        )

    def decode(self, arrays: Mapping[str, np.ndarray]) -> TopKTargets:
        id_dtypes = id_array_dtypes(self.id_layout, self.vocab_size)
        first = next(iter(id_dtypes))
        p = get_array(arrays, first, "uint8", (-1, self.k)).shape[0]
        planes = {n: get_array(arrays, n, dt, (p, self.k)) for n, dt in id_dtypes.items()}
        bad = bad_id_positions(planes, self.vocab_size)
        if bad.size:
            raise CodecError(
                f"decoded top-k ids reach vocab_size {self.vocab_size} or more at {bad.size} of "
                f"{p} positions (first: {bad[0]}): the id arrays are corrupted or belong to "
                "another codec"
            )
        ids = decode_ids_np(planes)
        if self.values == "sqrt":
            logprobs, tail = self._decode_sqrt(arrays, p)
        else:
            logprobs = get_array(arrays, "logprobs", self.values, (p, self.k)).astype(np.float32)
            tail = get_array(arrays, "tail_logprob", "float32", (p,))
        if self.num_temperatures:
            tln = get_array(arrays, "temperature_lognorm", "float32", (p, self.num_temperatures))
        else:
            tln = np.zeros((p, 0), dtype=np.float32)
        return TopKTargets(ids, logprobs, tail, tln)

    def _decode_sqrt(self, arrays: Mapping[str, np.ndarray], p: int) -> tuple[np.ndarray, ...]:
        levels = self.quant_levels
        cd = code_dtype(levels)
        codes = get_array(arrays, "value_code", cd, (p, self.k))
        tail_codes = get_array(arrays, "tail_code", cd, (p,))
        if p and (int(codes.max()) > levels or int(tail_codes.max()) > levels):
            raise CodecError(
                f"top-k value codes exceed levels={levels}: the value arrays are corrupted"
            )
        empty_tail = tail_codes == 0  # rare: only where k reaches the vocabulary
        if empty_tail.any() and (codes[empty_tail].max(axis=1, initial=0) == 0).any():
            raise CodecError(
                "a position decodes to zero total mass: the value arrays are corrupted"
            )
        logprobs, tail = sqrt_dequantize_np(codes, tail_codes, levels)
        return logprobs, tail
