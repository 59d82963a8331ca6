"""Turn a teacher's forward pass into sparse targets, on the device.

**Chunked head.** At vocab 128k-262k the full [batch, seq, vocab] logits are the dump's memory
ceiling. So the base model gives final hidden states, only positions with ``loss_mask = 1`` are
kept (row-major), and the output projection (:mod:`logitcache.dump.head`) is applied to
``chunk_tokens`` positions at a time, sparsifying each chunk before the next. Extra device memory
per chunk is about ``chunk_tokens x vocab x 14`` bytes (the model-dtype matmul output, float32
log-probs, one float32 temporary); ``chunk_tokens`` defaults to what fits ``chunk_bytes``
(1 GiB). A teacher whose head could not be split off gets full logits per batch instead.

Non-finite logits raise :class:`NonFiniteLogitsError` naming the rows, before anything reaches the
host. Results are the numpy containers of :mod:`logitcache.format.targets`.

**The math of one chunk.**

Everything here is float32 on whatever device the logits live on; only the small results leave.

- log-probs are ``z - logsumexp(z)`` over the *real* vocabulary (the caller has already dropped the
  padded columns, so they are neither candidates nor part of the normaliser);
- ``tail_logprob`` is ``logsumexp`` of the log-probs outside the top-k, computed directly (the
  top-k entries are overwritten with -inf in place) instead of ``log(1 - sum p)``, which cancels
  catastrophically when the top-k holds almost all the mass;
- ``temperature_lognorm[:, j] = log sum_v p_v^(1/T_j) = logsumexp(logp / T_j)``, which equals
  ``lse(z / T) - lse(z) / T``;
- entropy ``-sum p log p`` and captured mass (top-k: ``sum p`` of the kept ids; samples: ``sum p``
  of the distinct drawn ids) are the coverage stats.

Sampling is inverse-CDF (``searchsorted`` on the cumulative probabilities) driven by a
counter-based hash of ``(seed, row_id, position, draw)`` instead of a stateful generator: a draw
depends on nothing else, so it is the same whatever the batch composition, chunk size or device.
Uniforms have 24 bits, like the float32 CDF, so ids with p below ~6e-8 are (almost) never drawn:
a bias far below anything a loss can see.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from logitcache.dump.head import forward_logits
from logitcache.dump.teacher import Teacher
from logitcache.errors import ConfigError, NonFiniteLogitsError
from logitcache.format.targets import SampledTargets, TopKTargets

__all__ = ["CoverageStats", "SparseBatch", "SparsifyConfig", "sparsify_batch", "sparsify_chunk"]

_M32 = 0xFFFFFFFF
_BYTES_PER_LOGIT = 14


@dataclass(frozen=True)
class SparsifyConfig:
    """What to keep per position: top-k (``k``) or ``num_samples`` draws (``seed``)."""

    method: Literal["topk", "sample"] = "topk"
    k: int = 64
    num_samples: int = 64
    seed: int = 0
    temperatures: tuple[float, ...] = ()
    sample_logprobs: bool = True
    chunk_tokens: int | None = None
    chunk_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        if self.method not in ("topk", "sample"):
            raise ConfigError(f"method must be 'topk' or 'sample', got {self.method!r}")
        if self.k < 1 or self.num_samples < 1:
            raise ConfigError(f"k and num_samples must be >= 1, got {self.k}, {self.num_samples}")
        if any(not (t > 0 and np.isfinite(t)) for t in self.temperatures):
            raise ConfigError(f"temperatures must be finite and > 0, got {self.temperatures}")
        if self.chunk_tokens is not None and self.chunk_tokens < 1:
            raise ConfigError(f"chunk_tokens must be >= 1, got {self.chunk_tokens}")


@dataclass(frozen=True, eq=False)
class CoverageStats:
    """Per position: captured_mass [P] float32 (mass of the stored ids), entropy [P] (nats)."""

    captured_mass: np.ndarray
    entropy: np.ndarray


@dataclass(frozen=True, eq=False)
class SparseBatch:
    """Targets of one batch: positions of row i are the i-th run of ``positions_per_row[i]``."""

    row_ids: np.ndarray
    positions_per_row: np.ndarray
    targets: TopKTargets | SampledTargets
    stats: CoverageStats


@dataclass
class ChunkResult:
    """Device tensors for one chunk; ``ids`` etc. are [N, k] for top-k, flat [E] for samples."""

    ids: torch.Tensor
    logprobs: torch.Tensor | None
    tail_logprob: torch.Tensor | None
    num_unique: torch.Tensor | None
    counts: torch.Tensor | None
    temperature_lognorm: torch.Tensor
    captured_mass: torch.Tensor
    entropy: torch.Tensor
    finite: torch.Tensor


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x * c) mod 2^32 for x, c < 2^32 without int64 overflow: split x into 16-bit halves.
    lo = (x & 0xFFFF) * c
    hi = ((x >> 16) * c) & 0xFFFF
    return (lo + (hi << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # "lowbias32" integer hash (hash-prospector); int64 tensors holding values in [0, 2^32).
    x = x ^ (x >> 16)
    x = _mul32(x, 0x21F0AAAD)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x735A2D97)
    return x ^ (x >> 15)


def uniforms(
    seed: int, row_ids: torch.Tensor, positions: torch.Tensor, num_draws: int
) -> torch.Tensor:
    """[N, num_draws] float32 uniforms in (0, 1), a pure function of (seed, row, position, draw)."""
    dev = row_ids.device
    h = torch.full_like(row_ids, (seed & _M32) ^ 0x9E3779B9)
    h = _mix32(h)
    h = _mix32(h ^ ((seed >> 32) & _M32))
    h = _mix32(h ^ (row_ids & _M32))
    h = _mix32(h ^ ((row_ids >> 32) & _M32))
    h = _mix32(h ^ (positions & _M32))
    draws = torch.arange(num_draws, device=dev, dtype=torch.int64)
    g = _mix32(_mix32(h[:, None] ^ (draws[None, :] * 0x9E3779B9 & _M32)))
    return ((g >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def sparsify_chunk(
    z: torch.Tensor,
    *,
    method: str,
    k: int,
    num_samples: int,
    seed: int,
    temperatures: tuple[float, ...],
    row_ids: torch.Tensor,
    positions: torch.Tensor,
    work: torch.Tensor | None = None,
) -> ChunkResult:
    """Sparsify float32 logits ``z`` [N, V] (overwritten). row_ids/positions [N] int64.

    ``work`` (optional, float32, at least [N, V]) is scratch space reused across chunks: a fresh
    [N, V] buffer costs page faults on every chunk on a CPU. The passes over [N, V] are kept to a
    minimum (max, subtract, exp, sum, subtract, dot, top-k, sum): at V = 49k this is memory-bound
    work beside the head's matmul, and each pass shows in the dump's throughput.
    """
    n, vocab = z.shape
    # the row sum is finite iff every logit is (logits are O(100), far from float32 overflow)
    finite = torch.isfinite(z.sum(dim=1))
    z.sub_(z.amax(dim=1, keepdim=True))
    e = torch.exp(z, out=work[:n] if work is not None else None)  # exp(z - max), unnormalised
    total = e.sum(dim=1)
    log_total = total.log()
    logp = z.sub_(log_total[:, None])
    # entropy = -sum p logp as a batched dot product: no [N, V] temporary
    entropy = -torch.bmm(e[:, None, :], logp[:, :, None]).view(n) / total
    tln = (
        torch.stack([torch.logsumexp(logp / t, dim=1) for t in temperatures], dim=1)
        if temperatures
        else logp.new_zeros((n, 0))
    )
    if method == "topk":
        k_eff = min(k, vocab)
        vals, ids = logp.topk(k_eff, dim=1, sorted=True)
        captured = vals.exp().sum(dim=1)
        # the tail summed directly over the ids outside the top-k, never as 1 - captured
        tail = e.scatter_(1, ids, 0.0).sum(dim=1).log_() - log_total
        if k_eff < k:  # fewer ids than k exist: pad as TopKTargets documents
            ids = torch.cat([ids, ids.new_zeros((n, k - k_eff))], dim=1)
            vals = torch.cat([vals, vals.new_full((n, k - k_eff), float("-inf"))], dim=1)
        return ChunkResult(ids, vals, tail, None, None, tln, captured, entropy, finite)
    cdf = torch.cumsum(e, dim=1, out=e)  # unnormalised: the uniforms are scaled by its end
    u = uniforms(seed, row_ids, positions, num_samples) * cdf[:, -1:]
    drawn = torch.searchsorted(cdf, u, right=True).clamp_(max=vocab - 1)
    drawn, _ = drawn.sort(dim=1)
    starts = torch.ones_like(drawn, dtype=torch.bool)
    starts[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
    flat_start = starts.reshape(-1).nonzero().squeeze(1)
    uniq = drawn.reshape(-1)[flat_start]
    ends = torch.cat([flat_start[1:], flat_start.new_tensor([n * num_samples])])
    owner = flat_start // num_samples
    lp = logp[owner, uniq]
    captured = torch.zeros(n, device=z.device, dtype=torch.float32).index_add_(0, owner, lp.exp())
    return ChunkResult(
        uniq, lp, None, starts.sum(dim=1), ends - flat_start, tln, captured, entropy, finite
    )


def sparsify_batch(
    teacher: Teacher,
    input_ids: np.ndarray | torch.Tensor,
    loss_mask: np.ndarray | torch.Tensor,
    row_ids: np.ndarray | torch.Tensor,
    config: SparsifyConfig,
) -> SparseBatch:
    """Run the teacher on [B, S] right-padded rows; sparse targets at ``loss_mask`` positions."""
    dev = teacher.device
    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long).to(dev)
    mask = torch.as_tensor(np.asarray(loss_mask), dtype=torch.bool).to(dev)
    rows = torch.as_tensor(np.asarray(row_ids), dtype=torch.long)
    if ids.ndim != 2 or mask.shape != ids.shape or rows.shape != (ids.shape[0],):
        raise ConfigError(
            f"expected input_ids/loss_mask [B, S] and row_ids [B], got "
            f"{tuple(ids.shape)}, {tuple(mask.shape)}, {tuple(rows.shape)}"
        )
    if teacher.max_seq_len is not None and ids.shape[1] > teacher.max_seq_len:
        raise ConfigError(
            f"seq_len {ids.shape[1]} exceeds the teacher's context {teacher.max_seq_len}"
        )
    b_idx, t_idx = mask.nonzero(as_tuple=True)
    pos_rows = rows.to(dev)[b_idx]
    with torch.no_grad():
        n = int(b_idx.shape[0])
        step = config.chunk_tokens or max(
            1, config.chunk_bytes // (teacher.real_vocab_size * _BYTES_PER_LOGIT)
        )
        chunk_logits = _logit_source(teacher, ids, b_idx, t_idx, min(step, n))
        work = torch.empty((min(step, n), teacher.real_vocab_size), device=dev)
        parts = [
            sparsify_chunk(
                chunk_logits(lo, min(lo + step, n)),
                method=config.method,
                k=config.k,
                num_samples=config.num_samples,
                seed=config.seed,
                temperatures=config.temperatures,
                row_ids=pos_rows[lo : lo + step],
                positions=t_idx[lo : lo + step],
                work=work,
            )
            for lo in range(0, n, step)
        ]
    finite = torch.cat([p.finite for p in parts]) if parts else torch.ones(0, dtype=torch.bool)
    if not bool(finite.all()):
        bad = sorted({int(r) for r in pos_rows[~finite.to(dev)].cpu().tolist()})
        raise NonFiniteLogitsError(
            f"the teacher produced NaN/inf logits in row(s) {bad[:10]}"
            f"{' ...' if len(bad) > 10 else ''}; nothing was written for this batch. Try "
            "dtype fp32, or check the teacher's weights"
        )
    per_row = mask.sum(dim=1).to(torch.int32).cpu().numpy()
    return SparseBatch(rows.numpy(), per_row, _to_targets(parts, config), _to_stats(parts))


def _logit_source(
    teacher: Teacher, ids: torch.Tensor, b_idx: torch.Tensor, t_idx: torch.Tensor, chunk: int
) -> Callable[[int, int], torch.Tensor]:
    """A function (lo, hi) -> float32 logits [hi - lo, real_vocab] of the selected positions
    (at most ``chunk`` at a time; the result is only valid until the next call)."""
    attention = torch.ones_like(ids)
    if teacher.head is not None:
        head = teacher.head
        hidden = head.hidden_states(ids, attention)[b_idx, t_idx]
        buf = torch.empty((chunk, teacher.real_vocab_size), device=ids.device)
        return lambda lo, hi: head.logits(hidden[lo:hi], out=buf[: hi - lo])
    full = forward_logits(teacher.model, ids, attention)[b_idx, t_idx]
    real = teacher.real_vocab_size
    return lambda lo, hi: full[lo:hi, :real].float()


def _cat(parts: list[ChunkResult], field: str, dtype: np.dtype) -> np.ndarray:
    values = [getattr(p, field) for p in parts]
    if not values:
        return np.zeros(0, dtype=dtype)
    return torch.cat(values).cpu().numpy().astype(dtype, copy=False)


def _to_targets(parts: list[ChunkResult], config: SparsifyConfig) -> TopKTargets | SampledTargets:
    n_t = len(config.temperatures)
    tln = (
        torch.cat([p.temperature_lognorm for p in parts]).cpu().numpy()
        if parts
        else np.zeros((0, n_t), dtype=np.float32)
    )
    if config.method == "topk":
        k = config.k
        ids = _cat(parts, "ids", np.dtype(np.int32)).reshape(-1, k)
        lps = _cat(parts, "logprobs", np.dtype(np.float32)).reshape(-1, k)
        tail = _cat(parts, "tail_logprob", np.dtype(np.float32))
        return TopKTargets(ids, lps, tail, tln.astype(np.float32, copy=False))
    return SampledTargets(
        num_unique=_cat(parts, "num_unique", np.dtype(np.int32)),
        ids=_cat(parts, "ids", np.dtype(np.int32)),
        counts=_cat(parts, "counts", np.dtype(np.int32)),
        logprobs=_cat(parts, "logprobs", np.dtype(np.float32)) if config.sample_logprobs else None,
        temperature_lognorm=tln.astype(np.float32, copy=False),
    )


def _to_stats(parts: list[ChunkResult]) -> CoverageStats:
    return CoverageStats(
        captured_mass=_cat(parts, "captured_mass", np.dtype(np.float32)),
        entropy=_cat(parts, "entropy", np.dtype(np.float32)),
    )
