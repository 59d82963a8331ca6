"""``logitcache verify``: a full check of a cache.

It is the command to run after copying a cache or before trusting one from another team:
it reads every shard, checks every file's size and sha256 against the manifest, decodes every
target and checks what decoding cannot: ids inside the vocabulary, log-probs that are finite or
``-inf`` (padding) and never positive beyond rounding, sampled counts that add up to ``n``, row
ids that are unique across the cache, and the manifest's coverage against the shards (every
position counted once; since format 1.2 the means equal the shards' own coverage sums), and,
since format 1.3, the stored tokenizer's files (size and sha256). It stops at the first bad
shard or file and names it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from logitcache.errors import CacheCorruptError, LogitCacheError
from logitcache.format.codec import Targets
from logitcache.format.manifest import CoverageSums, Manifest
from logitcache.format.targets import SampledTargets, TopKTargets
from logitcache.store.reader import CacheReader
from logitcache.store.tokenizer import read_tokenizer_files

__all__ = ["VerifyReport", "verify_cache"]

# decoded log-probs may exceed 0 by rounding (float16, renormalisation), never by more
_LOGPROB_SLACK = 1e-3


@dataclass(frozen=True)
class VerifyReport:
    shards: int
    rows: int
    positions: int
    bytes: int


def _check_targets(t: Targets, vocab: int, samples: int | None, where: str) -> None:
    def bad(msg: str) -> CacheCorruptError:
        return CacheCorruptError(f"{where}: {msg}; re-copy or re-dump the cache")

    if t.ids.size and (int(t.ids.min()) < 0 or int(t.ids.max()) >= vocab):
        raise bad(f"target ids outside [0, {vocab}): range [{t.ids.min()}, {t.ids.max()}]")
    if not np.isfinite(t.temperature_lognorm).all():
        raise bad("temperature_lognorm holds NaN or inf")
    values: list[tuple[str, np.ndarray]] = []
    if isinstance(t, TopKTargets):
        values += [("logprobs", t.logprobs), ("tail_logprob", t.tail_logprob)]
    elif t.logprobs is not None:
        values.append(("logprobs", t.logprobs))
    for name, v in values:
        if np.isnan(v).any() or np.isposinf(v).any():
            raise bad(f"{name} holds NaN or +inf")
        if v.size and float(v.max()) > _LOGPROB_SLACK:
            raise bad(f"{name} holds a log-prob > 0 ({float(v.max()):.4g})")
    if isinstance(t, SampledTargets) and samples is not None and t.num_positions:
        sums = np.add.reduceat(t.counts.astype(np.int64), t.offsets()[:-1]) if t.counts.size else 0
        if t.num_unique.min() < 1 or np.any(sums != samples):
            raise bad(f"sampled counts do not add up to n={samples} at every position")


def verify_cache(
    url: str,
    storage_options: Mapping[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> VerifyReport:
    """Check every shard of a cache; raise a :class:`CacheCorruptError` naming the first bad one."""
    reader = CacheReader(
        url, verify=True, max_cached_shards=1, storage_options=storage_options, reuse=False
    )
    m = reader.manifest
    m.check_digest(where=url)
    seen: set[int] = set()
    for i, rec in enumerate(m.shards):
        rows = reader.read_rows(
            int(reader.shard_row_offsets[i]), int(reader.shard_row_offsets[i + 1])
        )
        where = f"shard {rec.path}"
        ids = rows.input_ids
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= m.padded_vocab_size):
            raise CacheCorruptError(f"{where}: input_ids outside [0, {m.padded_vocab_size})")
        dup = set(rows.row_id.tolist())
        if len(dup) != rows.num_rows or not seen.isdisjoint(dup):
            raise CacheCorruptError(f"{where}: row ids repeat (within the shard or across shards)")
        seen |= dup
        try:
            targets = rows.targets
        except LogitCacheError as e:
            raise CacheCorruptError(f"{where}: targets do not decode: {e}") from e
        _check_targets(targets, m.vocab_size, m.targets.samples, where)
        if progress is not None:
            progress(i + 1, len(m.shards))
    _check_coverage(m, url)
    read_tokenizer_files(reader.loc, m)  # each file against its size and sha256
    return VerifyReport(
        shards=len(m.shards), rows=m.num_rows, positions=m.num_positions, bytes=m.num_bytes
    )


def _check_coverage(m: Manifest, url: str) -> None:
    """The manifest's coverage against the shards: it counts every stored position once and
    (format 1.2) its means are the shards' own sums. A cache dumped before 1.2 and resumed could
    count buffered rows twice; this names it."""
    cov = m.coverage
    if cov.positions not in (0, m.num_positions):
        raise CacheCorruptError(
            f"{url}: manifest coverage counts {cov.positions} positions but the shards hold "
            f"{m.num_positions}; its captured_mass/entropy means are off (a resumed dump of a "
            "logitcache before format 1.2 counted rows twice): re-dump, or ignore the coverage"
        )
    sums = CoverageSums.total(m.shards)
    if sums is None:
        return
    want = sums.coverage()
    for name in ("captured_mass", "entropy", "teacher_nll"):
        got, exp = getattr(cov, name), getattr(want, name)
        if (got is None) != (exp is None) or (
            got is not None and exp is not None and not math.isclose(got, exp, rel_tol=1e-9)
        ):
            raise CacheCorruptError(
                f"{url}: manifest coverage.{name} is {got} but the shards' coverage sums give "
                f"{exp}; the manifest was edited: re-copy or re-dump the cache"
            )
