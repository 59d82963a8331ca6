"""Sparsify with a tensor-parallel teacher: each rank holds a vocabulary shard of the head, and
the full ``[positions, vocab]`` logits never exist on any rank.

The base model's final hidden states are replicated on every rank of the group (the TP plan
all-reduces the residual stream); rank ``r`` applies its head shard (real ids ``offset_r ..
offset_r + V_r``, padded rows already dropped) chunk by chunk, like the one-process path. Per
position it reduces its shard, in its own frame ``z' = z - m_r`` (``m_r`` its shard's maximum):

- ``S_r = sum exp(z')`` split as its top-k part and ``tail_r`` (the rest, summed directly);
- ``dot_r = sum exp(z') z'`` (entropy), ``ts_r[j] = sum exp(z'/T_j)`` (temperatures);
- the true next token's ``z'`` where the shard owns it;
- its k largest raw logits and their global ids (``-inf`` pads a shard narrower than k).

One ``all_gather`` of those ``[N, 6 + temperatures + 2k]`` floats per chunk (ids < 2^24 are exact
in float32) and every rank merges the same way, so every rank reaches the same targets (and the
same non-finite verdict): ``M = max_r m_r``, ``shift_r = exp(m_r - M)``; the global top-k is the
top-k of the ``k x T`` candidates (the global top-k's members of shard r are among shard r's
top-k); the tail is ``sum_r shift_r tail_r`` plus the candidates that did not make the cut, all
non-negative terms, never ``1 - captured``; ``sum p log p`` and the temperature normalisers are the
shifted sums (``dot_r + (m_r - M) S_r``: two non-positive terms). Only the writer keeps them.

**Sampling** draws the same ids whatever T is: the uniforms are the one-process path's pure
function of ``(seed, row, position, draw[, level])``. The tree rule (the default,
:mod:`logitcache.dump.tree_sampling`): each rank sums its own ids' part of the tree's node masses
(in its frame, scaled by ``shift_r``), one ``all_reduce`` per tree level of the children's masses
gives every rank the same decisions, and one more brings the leaf's logit from its owner; draws
equal T=1's on identical logits, and a TP forward's ~1e-5 logit shifts move a draw with
probability ~``levels x 1e-5 / 2``. Caches of the older inverse-CDF rule keep it: the uniform,
scaled by the total mass, is resolved in two steps, the shard (cumulative shard masses
``shift_r S_r``, gathered above), then the id inside it (the owning rank's local cumulative sum);
one ``all_reduce`` (float64, one non-zero term per draw: exact) brings each draw's id and logit to
every rank; a draw differs from T=1 where the logits' shift moves a CDF boundary (SmolLM2-135M at
T=3: 0.16% of the draws).

Memory per rank: the chunk's ``[N, V/T]`` logits plus one ``exp`` of the same size (``10`` bytes per
logit against ``chunk_bytes``), and ``[T, N, 6 + 2k]`` gathered floats; the tree rule adds
``V / (32 T)`` float64 per position and at most 64 MiB for its walk.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from logitcache.dump.draws import uniforms
from logitcache.dump.head import ShardedHead
from logitcache.dump.sparsify import (
    ChunkResult,
    SparseBatch,
    SparsifyConfig,
    _topk,
    finish_batch,
    prepare_positions,
    unique_draws,
)
from logitcache.dump.teacher import Teacher
from logitcache.dump.tree_sampling import group_masses, tree_depth, tree_walk
from logitcache.errors import ConfigError

__all__ = ["sparsify_batch_tp"]

_BYTES_PER_LOGIT_TP = 10  # the shard's float32 logits, its exp, the matmul output in bf16
_EXACT_IDS = 1 << 24  # ids travel as float32 in the gather


def sparsify_batch_tp(
    teacher: Teacher,
    input_ids: np.ndarray | torch.Tensor,
    loss_mask: np.ndarray | torch.Tensor,
    row_ids: np.ndarray | torch.Tensor,
    config: SparsifyConfig,
) -> SparseBatch:
    """:func:`~logitcache.dump.sparsify.sparsify_batch` for a tensor-parallel teacher; every rank
    of the group calls it with the same rows and gets the same result."""
    head = teacher.sharded_head
    if head is None:
        raise ConfigError("sparsify_batch_tp needs a tensor-parallel teacher (a ShardedHead)")
    if teacher.padded_vocab_size >= _EXACT_IDS:
        raise ConfigError(
            f"--tensor-parallel supports vocabularies below {_EXACT_IDS:,} ids, the teacher has "
            f"{teacher.padded_vocab_size:,}"
        )
    ids, mask, rows, b_idx, t_idx, pos_rows, labels = prepare_positions(
        teacher, input_ids, loss_mask, row_ids
    )
    with torch.no_grad():
        hidden = head.hidden_states(ids, torch.ones_like(ids))[b_idx, t_idx]
        n = int(hidden.shape[0])
        budget = config.chunk_bytes // (head.width * _BYTES_PER_LOGIT_TP)
        step = min(config.chunk_tokens or max(1, budget), max(n, 1))
        parts = [
            _chunk(
                head,
                hidden[lo : lo + step],
                config,
                pos_rows[lo : lo + step],
                t_idx[lo : lo + step],
                labels[lo : lo + step],
                teacher.real_vocab_size,
            )
            for lo in range(0, n, step)
        ]
    return finish_batch(parts, rows, mask, pos_rows, config)


def _chunk(
    head: ShardedHead,
    hidden: torch.Tensor,
    config: SparsifyConfig,
    row_ids: torch.Tensor,
    positions: torch.Tensor,
    labels: torch.Tensor,
    vocab: int,
) -> ChunkResult:
    z = head.logits(hidden)  # [N, V_r] float32, this shard's real ids
    n, v = z.shape
    temps = config.temperatures
    topk = config.method == "topk"
    k = config.k
    dev = z.device
    zeros = z.new_zeros(n)
    if v:
        if topk:
            vals, loc = _topk(z, min(k, v))
            m = vals[:, 0].clone()
        else:
            m = z.amax(dim=1)
        z.sub_(m[:, None])  # z' <= 0
        tsums = [torch.exp(z / t).sum(dim=1) for t in temps]
        e = torch.exp(z)
        total = e.sum(dim=1)
        dot = (e * z).sum(dim=1)
        own = (labels >= head.offset) & (labels < head.offset + v)
        lz = z.gather(1, torch.where(own, labels - head.offset, 0)[:, None]).squeeze(1)
        lz = torch.where(own, lz, 0.0)
        tail = e.scatter(1, loc, 0.0).sum(dim=1) if topk else zeros
    else:  # a shard of padded rows only
        m = z.new_full((n,), float("-inf"))
        tsums, total, dot, lz, tail = [zeros] * len(temps), zeros, zeros, zeros, zeros
        own = torch.zeros(n, dtype=torch.bool, device=dev)
        vals, loc = z.new_zeros((n, 0)), torch.zeros((n, 0), dtype=torch.long, device=dev)
        e = z
    cols = [m, total, dot, tail, lz, own.float(), *tsums]
    pack = torch.stack(cols, dim=1) if cols else z.new_zeros((n, 0))
    if topk:
        cand = torch.full((n, k), float("-inf"), device=dev)
        cand[:, : vals.shape[1]] = vals
        cid = torch.zeros((n, k), device=dev)
        cid[:, : loc.shape[1]] = (loc + head.offset).float()
        pack = torch.cat([pack, cand, cid], dim=1)
    gathered = [torch.empty_like(pack) for _ in range(head.tp_size)]
    dist.all_gather(gathered, pack.contiguous(), group=head.group)
    g = torch.stack(gathered)  # [T, N, D]
    m_r, s_r, dot_r, tail_r, lz_r, own_r = (g[:, :, i] for i in range(6))
    big_m = m_r.amax(dim=0)  # [N]
    present = s_r > 0
    delta = torch.where(present, m_r - big_m, 0.0)
    shift = torch.where(present, torch.exp(m_r - big_m), 0.0)
    dot_m = (shift * (dot_r + delta * s_r)).sum(dim=0)
    label_m = (own_r * (lz_r + delta)).sum(dim=0)
    owned = own_r.sum(dim=0) > 0
    ts_r = [g[:, :, 6 + j] for j in range(len(temps))]
    if topk:
        base = 6 + len(temps)
        cv = g[:, :, base : base + k].permute(1, 0, 2).reshape(n, -1)
        ci = g[:, :, base + k : base + 2 * k].permute(1, 0, 2).reshape(n, -1)
        top_v, top_loc = cv.topk(k, dim=1, sorted=True)
        gid = ci.gather(1, top_loc).long()
        vz = top_v - big_m[:, None]
        head_e = vz.exp()
        head_sum = head_e.sum(dim=1)
        rest = (cv - big_m[:, None]).exp().scatter_(1, top_loc, 0.0).sum(dim=1)
        tail_sum = (shift * tail_r).sum(dim=0) + rest
        norm = head_sum + tail_sum
        log_norm = norm.log()
        entropy = log_norm - dot_m / norm
        result_tail = tail_sum.log() - log_norm
        tln = _tln(ts_r, delta, present, temps, log_norm, n, z)
        nll = torch.where(owned, log_norm - label_m, float("nan"))
        finite = torch.isfinite(entropy) & torch.isfinite(big_m)
        return ChunkResult(
            gid,
            vz - log_norm[:, None],
            result_tail,
            None,
            None,
            tln,
            head_sum / norm,
            entropy,
            nll,
            finite,
        )
    mass = shift * s_r  # [T, N]
    norm = mass.sum(dim=0)
    log_norm = norm.log()
    entropy = log_norm - dot_m / norm
    tln = _tln(ts_r, delta, present, temps, log_norm, n, z)
    nll = torch.where(owned, log_norm - label_m, float("nan"))
    finite = torch.isfinite(entropy) & torch.isfinite(big_m)
    if config.sampling_rule == "tree":
        u = uniforms(config.seed, row_ids, positions, config.samples, levels=tree_depth(vocab))
        drawn, drawn_z = tree_walk(
            group_masses(e, head.offset, vocab),
            z,
            head.offset,
            vocab,
            u,
            scale=shift[head.tp_rank],
            logit_shift=delta[head.tp_rank],
            reduce=lambda t: dist.all_reduce(t, group=head.group),
        )
    else:
        drawn, drawn_z = _draw(head, z, v, mass, shift, delta, row_ids, positions, config)
    none = z.new_zeros(0)
    stats = ChunkResult(none.long(), none, None, None, None, tln, none, entropy, nll, finite)
    return unique_draws(drawn, drawn_z, log_norm, stats)


def _tln(
    ts_r: list[torch.Tensor],
    delta: torch.Tensor,
    present: torch.Tensor,
    temps: tuple[float, ...],
    log_norm: torch.Tensor,
    n: int,
    like: torch.Tensor,
) -> torch.Tensor:
    if not temps:
        return like.new_zeros((n, 0))
    cols = [
        torch.where(present, torch.exp(delta / t) * s, 0.0).sum(dim=0).log() - log_norm / t
        for s, t in zip(ts_r, temps, strict=True)
    ]
    return torch.stack(cols, dim=1)


def _draw(
    head: ShardedHead,
    z: torch.Tensor,
    v: int,
    mass: torch.Tensor,
    shift: torch.Tensor,
    delta: torch.Tensor,
    row_ids: torch.Tensor,
    positions: torch.Tensor,
    config: SparsifyConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse CDF in id order: the shard from the gathered masses, the id from the owner's
    cumulative sum. Returns draws' global ids [N, s] and their logits minus the global max."""
    n, s = z.shape[0], config.samples
    cum = mass.cumsum(dim=0).t().contiguous()  # [N, T], cumulative shard masses
    u = uniforms(config.seed, row_ids, positions, s) * cum[:, -1:]
    ranks = torch.arange(mass.shape[0], device=z.device)
    last = torch.where(mass.t() > 0, ranks, -1).amax(dim=1, keepdim=True)
    owner = torch.minimum(torch.searchsorted(cum, u, right=True), last)
    before = torch.cat([cum.new_zeros((n, 1)), cum[:, :-1]], dim=1).gather(1, owner)
    mine = owner == head.tp_rank
    pack = torch.zeros((n, s, 2), dtype=torch.float64, device=z.device)
    if v and bool(mine.any()):
        my_shift = shift[head.tp_rank][:, None]
        target = (u - before) / torch.where(my_shift > 0, my_shift, 1.0)
        cdf = torch.exp(z).cumsum(dim=1)  # z' <= 0, this shard's frame
        local = torch.searchsorted(cdf, target.contiguous(), right=True).clamp_(max=v - 1)
        got = z.gather(1, local) + delta[head.tp_rank][:, None]
        pack[..., 0] = torch.where(mine, local + head.offset + 1, 0).double()
        pack[..., 1] = torch.where(mine, got, 0.0).double()
    dist.all_reduce(pack, group=head.group)
    return pack[..., 0].long() - 1, pack[..., 1].float()
