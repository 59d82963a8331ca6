"""Shared pieces of the top-k and sampled codecs: parameter checks, id delta planes, sqrt quantiser.

Id delta planes (the sampled codec, and top-k caches written before format 1.2). Ids are sorted
ascending within a position and replaced by their differences (``d[0] = id[0]``,
``d[j] = id[j] - id[j-1] >= 0``). The differences are split into a low byte plane (``d & 0xFF``,
uint8) and a high plane (``d >> 8``: uint8 when ``vocab_size <= 65536``, else uint16), stored as
two arrays. On real top-k sets ~70% of the differences are below 256, so the high plane is mostly
zeros and compresses to ~0.27 B/entry, while the low plane keeps the byte sequences that repeat
between neighbouring positions intact for zstd's matcher (splitting the differences further, into
exponent/mantissa or nibbles, broke those matches and cost 10-20% more). Decoding, and the top-k
codec's newer ``"hi-delta"`` layout, live in ``_decode``.

Sqrt quantiser. A probability ``p`` is stored as a code ``c = min(floor(sqrt(p) * L), L - 1) + 1``
in ``1..L`` (``c = 0`` means zero mass, log-prob ``-inf``) and read back at the bin midpoint,
``q(c) = ((c - 0.5) / L) ** 2``, so a stored entry never decodes to probability 0. The KL cost of a
small error ``e`` in ``sqrt(p)`` is ``~2 e**2`` whatever ``p`` is, so a uniform step in ``sqrt(p)``
spreads the error where KL is least sensitive; with a uniformly distributed error the expected
cost is ``s**2 / 6`` per entry (``s = 1 / L``).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from logitcache.errors import CodecError, ConfigError

#: Largest supported number of sqrt quantiser levels (codes must fit in uint16).
MAX_LEVELS = 65535


def require(cond: bool, msg: str, exc: type[Exception] = ConfigError) -> None:
    """Raise ``exc(msg)`` unless ``cond``; the codecs' replacement for ``assert``."""
    if not cond:
        raise exc(msg)


def check_int(name: str, value: Any, lo: int, hi: int | None = None) -> None:
    """Validate an integer codec parameter (bools are refused)."""
    ok = isinstance(value, int | np.integer) and not isinstance(value, bool)
    require(ok, f"codec parameter {name} must be an integer, got {value!r}")
    upper = "" if hi is None else f" and <= {hi}"
    require(
        value >= lo and (hi is None or value <= hi),
        f"codec parameter {name} must be >= {lo}{upper}, got {value}; pass a value in range",
    )


def check_keys(d: Any, codec: str, required: set[str], optional: set[str]) -> None:
    """Refuse a codec dict that misses a required key or has one this version does not know."""
    require(isinstance(d, dict) or hasattr(d, "keys"), f"{codec} codec entry must be a mapping")
    keys = set(d.keys()) - {"name"}
    missing = required - keys
    unknown = keys - required - optional
    require(not missing, f"{codec} codec entry lacks {sorted(missing)}; the manifest is damaged")
    require(
        not unknown,
        f"{codec} codec entry has unknown fields {sorted(unknown)}; it was probably written by a "
        "newer logitcache: upgrade to read it",
    )


def hi_dtype(vocab_size: int) -> str:
    """Dtype of the high plane of id differences."""
    return "uint8" if vocab_size <= 1 << 16 else "uint16"


def code_dtype(levels: int) -> str:
    """Dtype of sqrt quantiser codes (code 0 is reserved for zero mass)."""
    return "uint8" if levels <= 255 else "uint16"


def check_ids(ids: np.ndarray, vocab_size: int, what: str) -> None:
    """Encode-side refusal of ids that do not fit the vocabulary (they would wrap silently)."""
    if ids.size == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    require(
        lo >= 0 and hi < vocab_size,
        f"{what} ids must lie in [0, {vocab_size}) (vocab_size), got min {lo} max {hi}; "
        "check the codec's vocab_size against the teacher's vocabulary",
        CodecError,
    )


def split_planes(d: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative id differences -> (low byte plane uint8, high plane)."""
    lo = (d & 0xFF).astype(np.uint8)
    hi = (d >> 8).astype(hi_dtype(vocab_size))
    return lo, hi


def levels_for_kl(num_entries: int, kl: float) -> int:
    """Sqrt quantiser levels whose expected KL over ``num_entries`` buckets is at most ``kl``.

    Expected KL per bucket is ``1 / (6 L**2)``, so ``L = ceil(sqrt(num_entries / (6 kl)))``.
    """
    require(kl > 0 and math.isfinite(kl), f"target KL must be a positive number, got {kl}")
    return max(1, min(MAX_LEVELS, math.ceil(math.sqrt(num_entries / (6.0 * kl)))))


@functools.lru_cache(maxsize=64)
def sqrt_tables(levels: int) -> tuple[np.ndarray, np.ndarray]:
    """(log-prob table, prob table), float32 [levels + 1]: code -> unnormalised value."""
    c = np.arange(levels + 1, dtype=np.float64)
    prob = ((c - 0.5) / levels) ** 2
    prob[0] = 0.0
    with np.errstate(divide="ignore"):
        logp = np.log(prob)
    logp_t, prob_t = logp.astype(np.float32), prob.astype(np.float32)
    logp_t.flags.writeable = False
    prob_t.flags.writeable = False
    return logp_t, prob_t


def sqrt_encode(logprobs: np.ndarray, levels: int) -> np.ndarray:
    """Log-probs (any shape, ``-inf`` allowed) -> sqrt quantiser codes."""
    with np.errstate(over="ignore", invalid="ignore"):
        u = np.exp(logprobs.astype(np.float64) * 0.5)
    require(
        not np.isnan(u).any() and not (logprobs > 1e-3).any(),
        "log-probs must be finite or -inf and <= 0 (log of probabilities at T=1); got NaN or "
        "positive values: pass log_softmax outputs, not logits",
        CodecError,
    )
    c = np.minimum(np.floor(u * levels), levels - 1) + 1
    c[np.isneginf(logprobs)] = 0
    return c.astype(code_dtype(levels))
