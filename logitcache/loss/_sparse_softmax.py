"""Student log-probs at a few ids plus the log-mass of all others, with a hand-written backward.

Every loss here sees the student only through ``log q`` at j gathered ids per position (the
teacher's ids, and the hard label) and, for the tail-bucket losses, ``log Q_tail``: the log of the
student mass outside the teacher's support. So the [n, V] work is always the same two passes and
the loss itself is arithmetic on [n, j] tensors, which autograd handles cheaply.

Forward: ``lse = logsumexp(s)``; ``log q_i = s_i - lse``; ``log Q_tail = logsumexp(s masked to
-inf on the support) - lse``. The tail is computed over the complement directly, not as
``log(1 - sum q_I)``, which loses all precision when the student puts nearly all mass on I.

Backward, given ``g_i = dL/dlog q_i`` and ``g_t = dL/dlog Q_tail`` (``G = sum_i g_i + g_t``)::

    dL/ds_v = sum_i g_i [v = id_i] - G q_v + g_t [v not in I] q_v / Q_tail

with ``q_v / Q_tail = exp(s_v - lse_tail)``, computed in at most two [n, V] buffers (one of them
can be ``s`` itself, which the fused path no longer needs). Nothing of size [n, V] is saved
between forward and backward except ``s``, which the caller holds anyway.

Padding entries may repeat an id; ``in_support`` says which entries belong to the support I, and
the masking uses ``scatter_reduce`` (``amin``, or ``prod`` with factor 1 for non-support entries)
so a padded duplicate can never unmask a real entry.

**One exponential per pass.** ``exp`` over [n, V] dominates the cost (on CPU ~4x a copy), so the
forward computes ``e = exp(s - max)`` once and takes both sums from it (the tail sum after zeroing
the support in ``e``: a sum over the complement, no subtraction), and the backward computes
``q = exp(s - lse)`` once and gets the tail term as ``q_v / Q_tail``. Both shortcuts lose precision
only when the tail is tiny next to the top entry (terms underflow); when any row has
``Q_tail < MIN_FAST_TAIL`` (1e-20) the batch takes the exact path instead (separate max over the
complement, ``exp(s - lse_tail)``), which costs two more exponentials. Below that threshold the
terms lost to underflow are < 1e-18 of the tail, so the fast path is exact to float32 rounding.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "MIN_FAST_TAIL",
    "SparseLogSoftmax",
    "sparse_log_softmax_grad",
    "sparse_log_softmax_stats",
]

MIN_FAST_TAIL = 1e-20
_MAX_FAST_GAP = 46.0  # -log(MIN_FAST_TAIL): lse - lse_tail above this takes the exact path


def _support_masked(x: Tensor, ids: Tensor, in_support: Tensor) -> Tensor:
    """``x`` with the support's entries set to -inf (in place)."""
    fill = torch.full(ids.shape, float("inf"), dtype=x.dtype, device=x.device)
    fill.masked_fill_(in_support, float("-inf"))
    return x.scatter_reduce_(1, ids, fill, reduce="amin")


def _logsumexp_(x: Tensor) -> Tensor:
    """``logsumexp(x, -1)`` that overwrites ``x`` instead of allocating an [n, V] temporary."""
    m = x.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return x.sub_(m).exp_().sum(-1).log_().add_(m.squeeze(-1))


def sparse_log_softmax_stats(
    s: Tensor, ids: Tensor, in_support: Tensor, with_tail: bool
) -> tuple[Tensor, Tensor | None]:
    """``(lse [n], lse_tail [n] or None)`` of scaled logits ``s [n, V]``; ``s`` is not modified."""
    if not with_tail:
        return torch.logsumexp(s, dim=-1), None
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.sub(s, m).exp_()
    mass = e.sum(-1)
    zero = (~in_support).to(e.dtype)  # factor 0 on the support, 1 elsewhere (duplicate-safe)
    tail_mass = e.scatter_reduce_(1, ids, zero, reduce="prod").sum(-1)
    del e
    lse = mass.log_().add_(m.squeeze(-1))
    # e's largest entry is 1, so tail_mass is the tail's mass relative to the top entry's
    if bool((tail_mass < MIN_FAST_TAIL).any()):
        return lse, _logsumexp_(_support_masked(s.clone(), ids, in_support))
    return lse, tail_mass.log_().add_(m.squeeze(-1))


def sparse_log_softmax_grad(
    s: Tensor,
    ids: Tensor,
    in_support: Tensor,
    lse: Tensor,
    lse_tail: Tensor | None,
    g: Tensor,
    g_tail: Tensor | None,
    inplace: bool = False,
) -> Tensor:
    """``dL/ds [n, V]`` from the gradients at the gathered ids and the tail (see module doc)."""
    total = g.sum(-1)
    if lse_tail is not None and g_tail is not None:
        gap = lse - lse_tail  # -log Q_tail; +inf for an empty complement
        if bool((torch.isfinite(gap) & (gap > _MAX_FAST_GAP)).any()):
            return _exact_grad(s, ids, in_support, lse, lse_tail, g, g_tail, total, inplace)
        # g_t / Q_tail, and 0 where the complement is empty (no tail class)
        b = torch.where(torch.isfinite(gap), g_tail * gap.clamp(max=_MAX_FAST_GAP).exp(), 0.0)
        q = s.sub_(lse[:, None]) if inplace else s - lse[:, None]
        q.exp_()
        tail = q * b[:, None]
        tail.scatter_reduce_(1, ids, (~in_support).to(q.dtype), reduce="prod")
        ds = q.mul_(-(total + g_tail)[:, None]).add_(tail)
        del tail
        return ds.scatter_add_(1, ids, g)
    ds = s.sub_(lse[:, None]) if inplace else s - lse[:, None]
    ds.exp_().mul_(-total[:, None])
    return ds.scatter_add_(1, ids, g)


def _exact_grad(
    s: Tensor,
    ids: Tensor,
    in_support: Tensor,
    lse: Tensor,
    lse_tail: Tensor,
    g: Tensor,
    g_tail: Tensor,
    total: Tensor,
    inplace: bool,
) -> Tensor:
    """The backward for a tiny tail: ``exp(s - lse_tail)`` directly, which cannot underflow."""
    total = total + g_tail
    # An empty complement has lse_tail = -inf; every entry is then masked, exp gives 0.
    safe = torch.where(torch.isfinite(lse_tail), lse_tail, torch.zeros_like(lse_tail))
    tail = _support_masked(s - safe[:, None], ids, in_support)
    tail.exp_().mul_(g_tail[:, None])
    ds = s.sub_(lse[:, None]) if inplace else s - lse[:, None]
    ds.exp_().mul_(-total[:, None]).add_(tail)
    del tail
    return ds.scatter_add_(1, ids, g)


class SparseLogSoftmax(torch.autograd.Function):
    """``s [n, V] -> (log q at ids [n, j], log Q_tail [n])`` for the plain (logits) path."""

    @staticmethod
    def forward(
        ctx: Any, s: Tensor, ids: Tensor, in_support: Tensor, with_tail: bool
    ) -> tuple[Tensor, Tensor]:
        lse, lse_tail = sparse_log_softmax_stats(s, ids, in_support, with_tail)
        logq = s.gather(1, ids) - lse[:, None]
        log_tail = torch.zeros_like(lse) if lse_tail is None else lse_tail - lse
        ctx.save_for_backward(s, ids, in_support, lse)
        ctx.lse_tail = lse_tail  # small [n]; may be None, which save_for_backward's types refuse
        return logq, log_tail

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Tensor | None, g_tail: Tensor | None) -> tuple[Tensor | None, ...]:
        s, ids, in_support, lse = ctx.saved_tensors
        lse_tail = ctx.lse_tail
        if g is None:
            g = torch.zeros(ids.shape, dtype=s.dtype, device=s.device)
        ds = sparse_log_softmax_grad(s, ids, in_support, lse, lse_tail, g, g_tail)
        return ds, None, None, None
