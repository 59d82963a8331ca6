"""Sparsify a chunk of teacher logits on the device (the math behind :mod:`logitcache.teacher`).

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

from dataclasses import dataclass

import torch

_M32 = 0xFFFFFFFF


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
