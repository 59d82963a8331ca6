"""Plain dense references for the sparse KD losses, and seeded target builders.

Written the obvious way over [N, V] tensors (full softmax, dense support masks, xlogy), with no
code shared with logitcache.loss, so the tests compare two independent derivations. The
benchmark imports ``dense_plain_loss`` from here as its "plain" baseline is the library's own
logits path; these references are for correctness only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from logitcache.loss import SampledTeacher, TopKTeacher

LOG_FLOOR = -100.0


def teacher_dist(n: int, vocab: int, seed: int, sharp: float = 2.0) -> Tensor:
    """A peaked full teacher distribution [n, V] (float64)."""
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(sharp * torch.randn(n, vocab, generator=g, dtype=torch.float64), -1)


def topk_teacher(
    p: Tensor, k: int, pad: int = 0, temperature: float | None = None, with_tail: bool = True
) -> TopKTeacher:
    """Top-k targets of ``p``; the last ``pad`` entries of each row are padding (id 0, -inf)."""
    lp, ids = torch.log(p).topk(k, dim=-1)
    lp = lp.float()
    if pad:
        lp[:, k - pad :] = float("-inf")
        ids[:, k - pad :] = 0
    kept = torch.where(torch.isfinite(lp), lp.double().exp(), torch.zeros_like(lp.double()))
    tail = torch.log1p(-kept.sum(-1).clamp(max=1.0)).float() if with_tail else None
    if tail is not None and k == p.shape[1] and not pad:
        tail = torch.full_like(tail, float("-inf"))  # the whole vocabulary is stored
    lognorm = None
    if temperature is not None:
        lognorm = torch.logsumexp(torch.log(p) / temperature, -1).float()
    return TopKTeacher(ids.to(torch.int32), lp, tail, lognorm)


def support_mask(ids: Tensor, valid: Tensor, vocab: int) -> Tensor:
    m = torch.zeros(ids.shape[0], vocab, dtype=torch.bool)
    for r in range(ids.shape[0]):
        for c in range(ids.shape[1]):
            if valid[r, c]:
                m[r, ids[r, c]] = True
    return m


def teacher_coarse(t: TopKTeacher, temperature: float) -> tuple[Tensor, Tensor]:
    """Teacher probabilities (float64) of the stored ids [N, k] (0 for padding) and of the tail."""
    lp = t.logprobs.double()
    p = torch.where(torch.isfinite(lp), lp.exp(), torch.zeros_like(lp))
    tail = (1 - p.sum(-1)).clamp(min=0) if t.tail_logprob is None else t.tail_logprob.double().exp()
    if temperature == 1.0:
        return p, tail
    if t.temperature_lognorm is not None:
        pt = p ** (1 / temperature) / t.temperature_lognorm.double().exp()[:, None]
        return pt, (1 - pt.sum(-1)).clamp(min=0)
    pt, tt = p ** (1 / temperature), tail ** (1 / temperature)
    z = pt.sum(-1) + tt
    return pt / z[:, None], tt / z


def xlogy_ratio(a: Tensor, b: Tensor) -> Tensor:
    """a * log(a / b) with 0 log 0 = 0."""
    return torch.xlogy(a, a) - torch.xlogy(a, b)


def dense_loss(
    logits: Tensor,
    t: TopKTeacher | SampledTeacher,
    loss: str,
    temperature: float = 1.0,
    alpha: float = 0.0,
    beta: float = 0.5,
    labels: Tensor | None = None,
) -> Tensor:
    """Per-row reference loss [N] in float64, differentiable in ``logits``."""
    z = logits.double()
    vocab = z.shape[1]
    q = torch.softmax(z / temperature, -1)
    if isinstance(t, SampledTeacher):
        w = t.weights(temperature).double()
        kd = -(w * torch.log(q.gather(1, t.ids.long()))).sum(-1)
    else:
        ids = t.ids.long()
        valid = torch.isfinite(t.logprobs)
        inside = support_mask(ids, valid, vocab)
        p_i, p_t = teacher_coarse(t, temperature)
        q_i = torch.where(valid, q.gather(1, ids), torch.zeros_like(p_i))
        q_t = (q * ~inside).sum(-1)
        # No complement (k = V): the tail class does not exist; (1, 1) contributes exactly 0.
        has_tail = (~inside).any(-1)
        p_t = torch.where(has_tail, p_t, torch.ones_like(p_t))
        q_t = torch.where(has_tail, q_t, torch.ones_like(q_t))
        if loss == "uld":  # sorted probabilities, dense sort; remainders compared as sums
            m = valid.sum(-1, keepdim=True)
            first = torch.arange(vocab)[None, :] < m
            q_s = torch.sort(q, dim=-1, descending=True, stable=True).values  # ties: lower id first
            p_s = torch.sort(p_i, -1, descending=True).values  # padding (0) sorts last
            p_s = torch.cat([p_s, torch.zeros(p_s.shape[0], max(0, vocab - p_s.shape[1]))], 1)
            head = torch.where(first, (p_s[:, :vocab] - q_s).abs(), torch.zeros_like(q_s))
            q_rest = torch.where(first, torch.zeros_like(q_s), q_s).sum(-1)
            kd = head.sum(-1) + (torch.where(has_tail, p_t, torch.zeros_like(p_t)) - q_rest).abs()
        elif loss == "kl-renorm":
            pn = p_i / p_i.sum(-1, keepdim=True)
            qn = q_i / q_i.sum(-1, keepdim=True)
            kd = xlogy_ratio(pn, torch.where(valid, qn, torch.ones_like(qn))).sum(-1)
        else:
            pp = torch.cat([p_i, p_t[:, None]], 1)
            qq = torch.cat([q_i, q_t[:, None]], 1)
            if loss == "kl":
                kd = xlogy_ratio(pp, torch.where(pp > 0, qq, torch.ones_like(qq))).sum(-1)
            elif loss == "reverse-kl":
                floor = torch.full_like(pp, LOG_FLOOR).exp()
                kd = xlogy_ratio(qq, torch.maximum(pp, floor)).sum(-1)
            else:
                m = beta * pp + (1 - beta) * qq
                m = torch.where(m > 0, m, torch.ones_like(m))
                kd = (beta * xlogy_ratio(pp, m) + (1 - beta) * xlogy_ratio(qq, m)).sum(-1)
    out = (1 - alpha) * temperature**2 * kd
    if alpha > 0:
        assert labels is not None
        out = out + alpha * F.cross_entropy(z, labels.long(), reduction="none")
    return out


def sampled_teacher(
    p: Tensor, draws: int, seed: int, with_logprobs: bool = False
) -> SampledTeacher:
    """``draws`` samples per row from ``p``, as unique ids with counts, padded with id 0 count 0."""
    g = torch.Generator().manual_seed(seed)
    samples = torch.multinomial(p.float(), draws, replacement=True, generator=g)
    n = p.shape[0]
    ids = torch.zeros(n, draws, dtype=torch.int64)
    counts = torch.zeros(n, draws, dtype=torch.int32)
    for r in range(n):
        u, c = samples[r].unique(return_counts=True)
        ids[r, : len(u)] = u
        counts[r, : len(u)] = c.int()
    lp = torch.log(p).gather(1, ids).float() if with_logprobs else None
    return SampledTeacher(ids, counts, draws, lp)
