"""The top-k decode arithmetic, written once: ids from their byte planes, log-probs from sqrt codes.

Three callers run it: :meth:`TopKCodec.decode` (numpy, whole shards), the host collate
(``data/collate.py``, numpy, a ``top_k`` cut) and the device dequantiser
(``data/targets.py::TargetDequantizer``, torch on the GPU or numpy on the CPU). Each formula has
two twins side by side, ``*_np`` for numpy arrays and ``*_torch`` for torch tensors. The torch
twins call only tensor methods, so this module, on the bottom floor, imports no torch. They agree
**bit for bit** on the same codes (``tests/format/test_codecs.py`` checks it on real
distributions): every sum is a sum of integers, exact in any order, and the only transcendental
step is one float64 ``log`` per position, rounded to float32.

Id layouts (``TopKCodec.id_layout``; full spec in ``docs/codecs.md``). Ids are sorted ascending
within a position.

- ``"hi-delta"`` (default since format 1.2): ``id_lo`` uint8 = ``id & 0xFF`` (raw, not delta
  coded) and ``h = diff(id >> 8)`` (first entry absolute) stored as ``id_hi_delta`` uint8 =
  ``h & 0xFF`` plus, when ``vocab_size > 65536``, ``id_hi_delta_top`` uint8 = ``h >> 8``.
  Decode: ``id = (cumsum(h) << 8) | id_lo``. Why: the low byte of an id is a property of the token,
  so a token that recurs gives the same byte wherever it sits in the set, which zstd's matcher
  finds; only the high part, small steps between 256-id blocks, is delta coded. Measured on the
  real SmolLM2 top-64 (``scripts/bench_codec.py``, zstd 15), id bytes per entry, old layout ->
  this one: 49k vocabulary 1.063 -> 1.040; ids spread into 262,144 by a frequency-ordered map
  1.232 -> 1.139, by a uniform order-preserving map 1.403 -> 1.263, by a random map 1.696 ->
  1.454. (Tried and dropped: byte planes of the delta, 1.326 on the uniform map; raw low 6, 7, 9
  or 10 bits; second differences; one concatenated plane.)
- ``"delta"`` (caches written before format 1.2; the codec entry has no ``id_layout``):
  ``d = diff(id)`` (first entry absolute), ``id_delta_lo`` uint8 = ``d & 0xFF`` and
  ``id_delta_hi`` = ``d >> 8``, uint8 when ``vocab_size <= 65536`` else uint16.
  Decode: ``id = cumsum(d)``.

Sqrt values (``levels = L``). Code ``c`` stands for the unnormalised probability
``q(c) = ((c - 0.5) / L) ** 2 = sq(c) / (4 L**2)`` with the integer ``sq(c) = (2c - 1) ** 2``
(``sq(0) = 0``: padding). Per position, over the k entries and the tail:

    S = sum_j sq(c_j) + sq(c_tail)                        exact integer
    lognorm = float32(log(float64(S)) - log(4 L**2))      one float64 log per position
    logprobs = logt[c] - lognorm; tail_logprob = logt[c_tail] - lognorm     (float32)

with ``logt = float32(log(q))`` (``TopKCodec.value_table``). ``S`` is summed in float32 when
``(k + 1) (2L - 1)**2 < 2**24`` (every partial sum is then an exact integer: k=64 at the default
105 levels needs 2.8e6), else in float64; either way the order of summation cannot change it.
An earlier version summed float32 ``q`` values, which made the CPU and GPU paths differ by
summation order (~1e-7).
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from logitcache.format._sparse import sqrt_tables

__all__ = [
    "ID_LAYOUTS",
    "bad_id_positions",
    "decode_entry_ids_np",
    "decode_ids_np",
    "decode_ids_torch",
    "encode_ids",
    "id_array_dtypes",
    "last_ids_np",
    "sqrt_cut_np",
    "sqrt_dequantize_np",
    "sqrt_dequantize_torch",
    "sqrt_device_tables",
    "sqrt_logprobs_np",
    "sqrt_logprobs_torch",
    "sqrt_sum_dtype",
]

#: id layouts, newest first; a codec entry without ``id_layout`` means ``"delta"``
ID_LAYOUTS = ("hi-delta", "delta")
_TOP = "id_hi_delta_top"

Array = Any  # a numpy array or a torch tensor, as each function's name says


# -- ids ------------------------------------------------------------------------------------------


def id_array_dtypes(layout: str, vocab_size: int) -> dict[str, str]:
    """Name -> dtype of the id arrays a layout stores, in order."""
    if layout == "delta":
        hi = "uint8" if vocab_size <= 1 << 16 else "uint16"
        return {"id_delta_lo": "uint8", "id_delta_hi": hi}
    out = {"id_lo": "uint8", "id_hi_delta": "uint8"}
    if vocab_size > 1 << 16:
        out[_TOP] = "uint8"
    return out


def encode_ids(ids_sorted: np.ndarray, layout: str, vocab_size: int) -> dict[str, np.ndarray]:
    """Ids [P, k] ascending within each row (int64, in range) -> the layout's arrays."""
    if layout == "delta":
        d = np.diff(ids_sorted, axis=1, prepend=0)
        hi = (d >> 8).astype(id_array_dtypes(layout, vocab_size)["id_delta_hi"])
        return {"id_delta_lo": (d & 0xFF).astype(np.uint8), "id_delta_hi": hi}
    h = np.diff(ids_sorted >> 8, axis=1, prepend=0)
    out = {
        "id_lo": (ids_sorted & 0xFF).astype(np.uint8),
        "id_hi_delta": (h & 0xFF).astype(np.uint8),
    }
    if vocab_size > 1 << 16:
        out[_TOP] = (h >> 8).astype(np.uint8)
    return out


def _interleave(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Two uint8 planes -> little-endian uint16 ``lo | hi << 8``, without an int32 pass."""
    out = np.empty(lo.shape, dtype=np.uint16)
    pairs = out.view(np.uint8).reshape(*lo.shape, 2)
    pairs[..., 0] = lo
    pairs[..., 1] = hi
    return out


def _steps_np(planes: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
    """(the delta coded part, the raw low byte or None) of either layout."""
    if "id_lo" in planes:
        hd = planes["id_hi_delta"]
        top = planes.get(_TOP)
        return (hd if top is None else _interleave(hd, top)), planes["id_lo"]
    lo, hi = planes["id_delta_lo"], planes["id_delta_hi"]
    if hi.dtype == np.uint8:
        return _interleave(lo, hi), None
    return lo.astype(np.int64) | (hi.astype(np.int64) << 8), None


def decode_ids_np(planes: Mapping[str, np.ndarray], out: np.ndarray | None = None) -> np.ndarray:
    """The id arrays of either layout -> ids int32 [P, k] (ascending within a position).

    Ids of damaged arrays may wrap: check them with :func:`bad_id_positions` first.
    """
    steps, low = _steps_np(planes)
    ids = np.empty(steps.shape, dtype=np.int32) if out is None else out
    np.cumsum(steps, axis=1, out=ids)
    if low is not None:
        ids <<= 8
        ids |= low
    return ids


def decode_ids_torch(planes: Mapping[str, Any]) -> Any:
    """Torch twin of :func:`decode_ids_np` (tensors on any device; no range check: a check would
    synchronise the stream, so ranges are checked on the host where shards are loaded)."""
    if "id_lo" in planes:
        h = planes["id_hi_delta"].int()
        if _TOP in planes:
            h = h | (planes[_TOP].int() << 8)
        return (h.cumsum(1, dtype=h.dtype) << 8) | planes["id_lo"].int()
    d = planes["id_delta_lo"].int() | (planes["id_delta_hi"].int() << 8)
    return d.cumsum(1, dtype=d.dtype)


def last_ids_np(planes: Mapping[str, np.ndarray]) -> np.ndarray:
    """The largest id of each position, int64 [P], exact even for damaged arrays (no wrap)."""
    steps, low = _steps_np(planes)
    # einsum into uint32 is ~2.5x faster than .sum(dtype=int64) (0.2 vs 0.5 ms at 16k x 64) and
    # exact while k * max step < 2**32 (uint16 steps: k < 65537); wider steps use int64
    wide = steps.dtype.itemsize > 2 or steps.shape[-1] * 0xFFFF >= 1 << 32
    total = np.einsum("ij->i", steps, dtype=np.int64 if wide else np.uint32).astype(np.int64)
    if low is None:
        return total
    return (total << 8) | low[:, -1] if low.shape[1] else total


def decode_entry_ids_np(lo: np.ndarray, hi: np.ndarray, num_unique: np.ndarray) -> np.ndarray:
    """Entry-level ``"delta"`` planes [E] whose first entry per position is absolute (the sampled
    codec) -> ids int64 [E]: one cumulative sum, minus the running sum before each position."""
    steps, _ = _steps_np({"id_delta_lo": lo, "id_delta_hi": hi})
    cs = np.cumsum(steps, dtype=np.int64)
    offsets = np.zeros(num_unique.shape[0] + 1, dtype=np.int64)
    np.cumsum(num_unique, out=offsets[1:])
    before = np.concatenate(([0], cs))[offsets[:-1]]
    return cs - np.repeat(before, num_unique)


def bad_id_positions(planes: Mapping[str, np.ndarray], vocab_size: int) -> np.ndarray:
    """Positions (int64 indices) whose decoded ids leave ``[0, vocab_size)``: damage."""
    last = last_ids_np(planes)
    return np.flatnonzero(last >= vocab_size)


# -- sqrt values ----------------------------------------------------------------------------------


def sqrt_sum_dtype(k: int, levels: int) -> str:
    """``"float32"`` when every partial sum of ``k + 1`` squares is an exact float32 integer."""
    return "float32" if (k + 1) * (2 * levels - 1) ** 2 < 1 << 24 else "float64"


@functools.lru_cache(maxsize=64)
def _squares(levels: int, dtype: str) -> np.ndarray:
    c = np.arange(levels + 1, dtype=np.float64)
    sq = (2 * c - 1) ** 2
    sq[0] = 0.0
    out = sq.astype(dtype)
    out.flags.writeable = False
    return out


def _log_scale(levels: int) -> float:
    return math.log(4.0 * levels * levels)


@functools.lru_cache(maxsize=16)
def _pair_tables(levels: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Tables indexed by two adjacent uint8 codes read as one little-endian uint16 ``a + 256 b``:
    (log pair [65536] float64 whose two float32 halves are ``(logt[a], logt[b])``, square pair sum
    [65536] ``sq(a) + sq(b)``). numpy's gather costs per index (the index array is widened to intp
    first), so one gather per two codes halves the dequantisation on the CPU (768 KiB of tables:
    they stay in cache). Codes above ``levels`` map to ``levels`` (they are refused beforehand)."""
    logt, sq = sqrt_tables(levels)[0], _squares(levels, dtype)
    pair = np.arange(1 << 16)
    a = np.minimum(pair & 0xFF, levels)
    b = np.minimum(pair >> 8, levels)
    log_pair = np.empty((1 << 16, 2), dtype=np.float32)
    log_pair[:, 0], log_pair[:, 1] = logt[a], logt[b]
    sq_pair = (sq[a] + sq[b]).astype(dtype)  # exact integers
    for t in (log_pair, sq_pair):
        t.flags.writeable = False
    return log_pair.view(np.float64).reshape(-1), sq_pair


def _pairable(codes: np.ndarray) -> bool:
    return (
        codes.dtype == np.uint8
        and codes.ndim == 2
        and codes.shape[1] % 2 == 0
        and codes.flags.c_contiguous
        and sys.byteorder == "little"
    )


def _lognorm_np(s: np.ndarray, levels: int) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return (np.log(s.astype(np.float64)) - _log_scale(levels)).astype(np.float32)


def _sums_np(codes: np.ndarray, tail_codes: np.ndarray, levels: int) -> np.ndarray:
    """``S`` per position (see the module docstring), in :func:`sqrt_sum_dtype`."""
    dtype = sqrt_sum_dtype(codes.shape[1] if codes.ndim == 2 else 0, levels)
    sq = _squares(levels, dtype)
    if _pairable(codes) and levels <= 255:
        part = np.take(_pair_tables(levels, dtype)[1], codes.view(np.uint16))
    else:
        part = np.take(sq, codes)
    # einsum sums rows ~4x faster than ndarray.sum(axis=1), and unlike a BLAS matrix-vector
    # product it starts no threads (which spin on a busy host); the order does not matter here
    s = np.einsum("ij->i", part)
    s += np.take(sq, tail_codes)
    return s


def sqrt_dequantize_np(
    codes: np.ndarray, tail_codes: np.ndarray, levels: int
) -> tuple[np.ndarray, np.ndarray]:
    """Codes [P, k] and tail codes [P] (all ``<= levels``) -> float32 (logprobs, tail_logprob)."""
    lognorm = _lognorm_np(_sums_np(codes, tail_codes, levels), levels)
    logt = sqrt_tables(levels)[0]
    if _pairable(codes) and levels <= 255:
        dtype = sqrt_sum_dtype(codes.shape[1], levels)
        logq = np.take(_pair_tables(levels, dtype)[0], codes.view(np.uint16)).view(np.float32)
    else:
        logq = np.take(logt, codes)
    np.subtract(logq, lognorm[:, None], out=logq)
    tail = np.take(logt, tail_codes)
    tail -= lognorm
    return logq, tail


def sqrt_logprobs_np(codes: np.ndarray, lognorm: np.ndarray, levels: int) -> np.ndarray:
    """Codes [N, k'] and a normaliser computed before a cut (:func:`sqrt_cut_np`) -> logprobs."""
    logq = np.take(sqrt_tables(levels)[0], codes)
    np.subtract(logq, np.asarray(lognorm, dtype=np.float32)[:, None], out=logq)
    return logq


def sqrt_cut_np(
    codes: np.ndarray, tail_codes: np.ndarray, levels: int, cols: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep columns ``cols`` [N, k'] of ``codes`` (None: all); the dropped entries join the tail.

    Returns ``(kept codes, lognorm float32 [N], tail_logprob float32 [N])``: the normaliser stays
    the one over all k + 1 stored buckets, so the kept log-probs are those of the full decode
    (:func:`sqrt_logprobs_np` with this ``lognorm``), and the tail is
    ``log((S - sum of the kept squares) / S)``, exact integers again.
    """
    s = _sums_np(codes, tail_codes, levels)
    lognorm = _lognorm_np(s, levels)
    sq = _squares(levels, str(s.dtype))
    if cols is None:
        tail_sq = np.take(sq, tail_codes)
    else:
        codes = np.take_along_axis(codes, cols, axis=1)
        tail_sq = s - np.take(sq, codes).sum(axis=1, dtype=s.dtype)
    with np.errstate(divide="ignore"):
        tail = (np.log(tail_sq.astype(np.float64)) - np.log(s.astype(np.float64))).astype(
            np.float32
        )
    return codes, lognorm, tail


def sqrt_device_tables(levels: int, k: int) -> tuple[np.ndarray, np.ndarray, float]:
    """What :func:`sqrt_dequantize_torch` needs, as host arrays to copy to a device once:
    ``(logt float32 [L + 1], sq [L + 1] in sqrt_sum_dtype, log(4 L**2))``."""
    return (
        np.array(sqrt_tables(levels)[0]),
        np.array(_squares(levels, sqrt_sum_dtype(k, levels))),
        _log_scale(levels),
    )


def sqrt_dequantize_torch(
    codes: Any, tail_codes: Any, logt: Any, sq: Any, log_scale: float
) -> tuple[Any, Any]:
    """Torch twin of :func:`sqrt_dequantize_np`; ``logt``/``sq`` from :func:`sqrt_device_tables`
    on the codes' device."""
    flat = codes.reshape(-1).int()
    tail_flat = tail_codes.int()
    s = sq.index_select(0, flat).view(codes.shape).sum(dim=1)
    s += sq.index_select(0, tail_flat)
    lognorm = s.double().log_().sub_(log_scale).float()
    logq = logt.index_select(0, flat).view(codes.shape).sub_(lognorm[:, None])
    return logq, logt.index_select(0, tail_flat).sub_(lognorm)


def sqrt_logprobs_torch(codes: Any, lognorm: Any, logt: Any) -> Any:
    """Torch twin of :func:`sqrt_logprobs_np`."""
    flat = codes.reshape(-1).int()
    return logt.index_select(0, flat).view(codes.shape).sub_(lognorm.float()[:, None])
