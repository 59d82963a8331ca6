"""What a cache's stored targets say, computed from a seeded sample of its positions (numpy only).

**The sample.** A cache of at most ``max_positions`` target positions (default 1,000,000) is read
whole. A larger one is sampled, so that a report of a 100 GB cache reads about as much as one of
1M positions: the shards are visited in a random order (``numpy.random.default_rng(seed)``,
seed 0 by default) until the visited ones hold ``max_positions`` positions, and
``max_positions`` positions are then drawn uniformly without replacement from them. Shards are
the unit of reading (a shard is fetched whole), so the sample is clustered by shard: all shards
are equally likely to be in it, but positions of one shard come together. :func:`sample_positions`
is that rule, public so that a test or a notebook can recompute any figure on the same positions.

**Top-k caches.** Per position, the stored log-probs are sorted (the codec stores them in id
order) and exponentiated: ``p_1 >= ... >= p_k`` and the tail bucket ``t`` (mass outside the k
ids, stored as ``tail_logprob``).

- captured mass at k' = ``p_1 + ... + p_k'`` as stored (so at the stored k it is the dump's
  ``coverage.captured_mass`` up to the 8-bit quantisation of the values); its mean is exact, its
  median and 5th percentile per k' come from a 1,000-bin histogram (within 0.001);
- fidelity at k': ``KL(P || Q_k')`` where the reference ``P`` is the stored top-k plus the tail
  (renormalised to sum to 1, which undoes the quantisation's drift) and ``Q_k'`` keeps the first
  k' ids and puts the rest of the mass in one tail bucket. Both spread their tail evenly over the
  ids they do not list (the maximum-entropy completion, the only one the stored numbers allow).
  With ``T_j = t + p_{j+1} + ... + p_k`` and vocabulary V:
  ``KL_j = sum_{i>j} p_i log p_i + t log(t / (V - k)) - T_j log(T_j / (V - j))``, zero at j = k.
  This is *relative to the stored distribution*: it says what a smaller k would lose against this
  cache, not what the cache loses against the teacher;
- against the full vocabulary: the dump records each position's full entropy and the manifest
  keeps their mean ``H``; since ``KL(full || Q_j) = H_max(Q_j) - H_full`` per position (``Q_j``
  with its tail spread evenly, ``H_max`` its entropy), the mean KL to the *full* distribution is
  ``mean(H_max(Q_j)) - H``: exact over all positions, an estimate when positions are sampled;
- entropy: of the stored distribution with the tail as one outcome (a lower bound of the
  teacher's; the manifest's full-vocabulary mean is drawn next to it); top-1 probability exact.

**Sampled caches** (n draws per position): unique ids per position; the drawn ids' mass, the
top-1 probability among them and an unbiased entropy estimate ``sum_u (c_u / n) (-log p_u)`` when
log-probs are stored; without them the top-1 is the most drawn id's share of the n draws.

Speed (scripts/bench_report.py, 2 shared CPU cores, top-64, vocab 49k, 128 MiB shards): 1M
positions (2 shards) in 6.3 s, 10M (1M read from 2 of 15 shards) in 5.9 s, ratio 0.94; decoding
the sampled shards is the time, the figures and page add well under a second.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from logitcache.errors import ConfigError
from logitcache.format.manifest import Manifest
from logitcache.format.targets import SampledTargets, TopKTargets
from logitcache.report.usage import ByteUsage, byte_usage
from logitcache.store.reader import CacheReader

__all__ = [
    "DEFAULT_MAX_POSITIONS",
    "CacheStats",
    "TopKCurves",
    "cache_stats",
    "candidate_ks",
    "quantile_from_histogram",
    "sample_positions",
]

DEFAULT_MAX_POSITIONS = 1_000_000
MASS_BINS = 1000
_CHUNK = 32_768  # positions per vectorised step: [chunk, k] float64 stays ~16 MB at k=64


def sample_positions(
    m: Manifest, max_positions: int = DEFAULT_MAX_POSITIONS, seed: int = 0
) -> dict[int, np.ndarray]:
    """Shard index -> sorted positions (indices into that shard's target arrays) to read; see
    the module docstring. Every position of every shard when the cache holds at most
    ``max_positions``."""
    if max_positions < 1:
        raise ConfigError(f"max_positions must be >= 1, got {max_positions}")
    sizes = np.array([s.positions for s in m.shards], dtype=np.int64)
    if int(sizes.sum()) <= max_positions:
        return {i: np.arange(n, dtype=np.int64) for i, n in enumerate(sizes.tolist()) if n}
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(sizes))
    reach = np.cumsum(sizes[order])
    picked = np.sort(order[: int(np.searchsorted(reach, max_positions)) + 1])
    starts = np.concatenate([[0], np.cumsum(sizes[picked])])
    chosen = np.sort(rng.choice(int(starts[-1]), size=max_positions, replace=False))
    cut = np.searchsorted(chosen, starts)
    out = {}
    for j, shard in enumerate(picked.tolist()):
        local = chosen[cut[j] : cut[j + 1]] - starts[j]
        if local.size:
            out[shard] = local
    return out


def candidate_ks(k: int) -> list[int]:
    """The k' the report tabulates and may propose: 1, 2, 4, ... below k, then k."""
    out, j = [], 1
    while j < k:
        out.append(j)
        j *= 2
    return [*out, k]


def quantile_from_histogram(hist: np.ndarray, q: float) -> float:
    """The q-quantile of values in [0, 1] binned into ``len(hist)`` equal bins (bin centre)."""
    c = np.cumsum(hist)
    if c[-1] == 0:
        return float("nan")
    b = int(np.searchsorted(c, q * c[-1]))
    return (min(b, len(hist) - 1) + 0.5) / len(hist)


@dataclass(frozen=True)
class TopKCurves:
    """Per k' = 1..k: mean captured mass, its median and 5th percentile, the mean KL to the
    stored distribution and (with the manifest's entropy) to the full vocabulary."""

    k: int
    mass_mean: np.ndarray
    mass_median: np.ndarray
    mass_p5: np.ndarray
    kl_stored: np.ndarray
    kl_full: np.ndarray | None


@dataclass(frozen=True)
class CacheStats:
    """Everything the cache report shows (the figures draw from this, the page prints it)."""

    url: str
    manifest: Manifest
    positions: int  # in the sample
    total_positions: int  # in the cache
    shards_read: int
    seed: int
    max_positions: int
    usage: ByteUsage
    captured_mass: np.ndarray | None  # per sampled position (top-k: at stored k; sampled: drawn)
    entropy: np.ndarray | None  # top-k: stored-distribution lower bound; sampled: estimate
    top1: np.ndarray
    unique: np.ndarray | None  # sampled caches: unique ids per position
    curves: TopKCurves | None  # top-k caches
    notes: tuple[str, ...] = field(default=())

    @property
    def sampled(self) -> bool:
        return self.positions < self.total_positions


class _TopKAccumulator:
    def __init__(self, k: int, vocab: int) -> None:
        self.k, self.vocab = k, vocab
        self.mass_sum = np.zeros(k)
        self.hist = np.zeros((k, MASS_BINS), dtype=np.int64)
        self.kl_sum = np.zeros(k)
        self.hmax_sum = np.zeros(k)
        self.n = 0
        self.mass: list[np.ndarray] = []
        self.entropy: list[np.ndarray] = []
        self.top1: list[np.ndarray] = []

    def add(self, t: TopKTargets) -> None:
        for lo in range(0, t.num_positions, _CHUNK):
            lp = t.logprobs[lo : lo + _CHUNK].astype(np.float64)
            tail = np.exp(t.tail_logprob[lo : lo + _CHUNK].astype(np.float64))
            self._add(np.exp(-np.sort(-lp, axis=1)), tail)

    def _add(self, p: np.ndarray, tail: np.ndarray) -> None:
        n, k = p.shape
        cum = np.cumsum(p, axis=1)
        self.mass_sum += cum.sum(axis=0)
        bins = np.minimum((cum * MASS_BINS).astype(np.int64), MASS_BINS - 1)
        bins += np.arange(k, dtype=np.int64) * MASS_BINS
        self.hist += np.bincount(bins.ravel(), minlength=k * MASS_BINS).reshape(k, MASS_BINS)
        self.mass.append(cum[:, -1].astype(np.float32))
        self.top1.append(p[:, 0].astype(np.float32))
        z = cum[:, -1] + tail  # renormalise: 8-bit values drift from summing to 1
        q, t = p / z[:, None], tail / z
        qlogq = _xlogx(q)
        after = np.cumsum(qlogq[:, ::-1], axis=1)[:, ::-1]  # sum_{i>=j}
        rest = np.zeros_like(q)
        rest[:, :-1] = after[:, 1:]  # R_j = sum_{i>j} q_i log q_i
        mass_after = np.cumsum(q[:, ::-1], axis=1)[:, ::-1]
        tj = t[:, None].copy().repeat(k, axis=1)
        tj[:, :-1] += mass_after[:, 1:]  # T_j = t + sum_{i>j} q_i
        spread_k = np.log(max(self.vocab - k, 1))
        spread_j = np.log(np.maximum(self.vocab - np.arange(1, k + 1), 1))
        tail_term = _xlogx(t) - t * spread_k
        kl = rest + tail_term[:, None] - _xlogx(tj) + tj * spread_j
        self.kl_sum += np.maximum(kl, 0.0).sum(axis=0)
        hmax = -np.cumsum(qlogq, axis=1) - _xlogx(tj) + tj * spread_j
        self.hmax_sum += hmax.sum(axis=0)
        self.entropy.append((-qlogq.sum(axis=1) - _xlogx(t)).astype(np.float32))
        self.n += n

    def curves(self, full_entropy: float | None) -> TopKCurves:
        n = max(self.n, 1)
        kl_full = None
        if full_entropy is not None:
            kl_full = np.maximum(self.hmax_sum / n - full_entropy, 0.0)
        return TopKCurves(
            k=self.k,
            mass_mean=self.mass_sum / n,
            mass_median=np.array([quantile_from_histogram(h, 0.5) for h in self.hist]),
            mass_p5=np.array([quantile_from_histogram(h, 0.05) for h in self.hist]),
            kl_stored=self.kl_sum / n,
            kl_full=kl_full,
        )


def _xlogx(x: np.ndarray) -> np.ndarray:
    return np.where(x > 0, x * np.log(np.where(x > 0, x, 1.0)), 0.0)


def _sampled_stats(t: SampledTargets, n: int) -> dict[str, np.ndarray]:
    off = t.offsets()[:-1]
    out = {"unique": t.num_unique.astype(np.int32)}
    if not t.num_positions:
        return out
    if t.logprobs is not None:
        lp = t.logprobs.astype(np.float64)
        p = np.exp(lp)
        out["mass"] = np.add.reduceat(p, off).astype(np.float32)
        out["top1"] = np.maximum.reduceat(p, off).astype(np.float32)
        out["entropy"] = np.add.reduceat(t.counts / n * -lp, off).astype(np.float32)
    else:
        out["top1"] = (np.maximum.reduceat(t.counts, off) / n).astype(np.float32)
    return out


def _select(t: TopKTargets | SampledTargets, idx: np.ndarray) -> TopKTargets | SampledTargets:
    if isinstance(t, TopKTargets):
        return TopKTargets(
            t.ids[idx], t.logprobs[idx], t.tail_logprob[idx], t.temperature_lognorm[idx]
        )
    cnt = t.num_unique[idx].astype(np.int64)
    before = np.concatenate([[0], np.cumsum(cnt)[:-1]])  # entry ranges of the chosen positions
    entries = np.repeat(t.offsets()[idx] - before, cnt) + np.arange(int(cnt.sum()))
    return SampledTargets(
        t.num_unique[idx],
        t.ids[entries],
        t.counts[entries],
        None if t.logprobs is None else t.logprobs[entries],
        t.temperature_lognorm[idx],
    )


def cache_stats(
    url: str,
    max_positions: int = DEFAULT_MAX_POSITIONS,
    seed: int = 0,
    storage_options: Mapping[str, Any] | None = None,
) -> CacheStats:
    """Read the sampled positions of the cache at ``url`` and compute the report's statistics.

    Shard files are checked by size and CRC-32C (``verify=False``: the sha256 of every sampled
    shard would cost more than the statistics; ``logitcache verify`` is the full check)."""
    reader = CacheReader(url, verify=False, max_cached_shards=1, storage_options=storage_options)
    m = reader.manifest
    plan = sample_positions(m, max_positions, seed)
    topk = m.targets.method == "topk"
    acc = _TopKAccumulator(int(m.targets.k or 0), m.vocab_size) if topk else None
    parts: dict[str, list[np.ndarray]] = {}
    for shard, idx in sorted(plan.items()):
        lo, hi = int(reader.shard_row_offsets[shard]), int(reader.shard_row_offsets[shard + 1])
        rows = reader.read_rows(lo, hi)
        if acc is not None:  # top-k arrays are all per position: decode only the chosen ones
            enc = {name: a[idx] for name, a in rows.encoded.items()}
            t = reader.codec.decode(enc)
            if not isinstance(t, TopKTargets):
                raise ConfigError(f"{url}: a top-k manifest whose codec decodes {type(t)}")
            acc.add(t)
        else:
            t = _select(rows.targets, idx)
            if not isinstance(t, SampledTargets):
                raise ConfigError(f"{url}: a sampled manifest whose codec decodes {type(t)}")
            for key, arr in _sampled_stats(t, int(m.targets.samples or 1)).items():
                parts.setdefault(key, []).append(arr)
    usage = byte_usage(reader, sorted(plan)[:1])
    full_h = m.coverage.entropy
    notes: list[str] = []

    def cat(xs: list[np.ndarray] | None) -> np.ndarray | None:
        return np.concatenate(xs) if xs else None

    if acc is not None:
        mass, entropy, top1 = cat(acc.mass), cat(acc.entropy), cat(acc.top1)
        curves: TopKCurves | None = acc.curves(full_h)
        if m.targets.tail != "bucket":
            notes.append(
                "the tail mass was not stored (tail 'unknown': values renormalised over the k "
                "ids), so captured mass reads 1 and the fidelity curves ignore the tail"
            )
    else:
        mass, entropy, top1 = cat(parts.get("mass")), cat(parts.get("entropy")), cat(parts["top1"])
        curves = None
    return CacheStats(
        url=url,
        manifest=m,
        positions=int(sum(len(i) for i in plan.values())),
        total_positions=m.num_positions,
        shards_read=len(plan),
        seed=seed,
        max_positions=max_positions,
        usage=usage,
        captured_mass=mass,
        entropy=entropy,
        top1=top1 if top1 is not None else np.zeros(0, np.float32),
        unique=cat(parts.get("unique")),
        curves=curves,
        notes=tuple(notes),
    )
