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
the masking uses ``scatter_reduce(amin)`` so a padded duplicate can never unmask a real entry.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["SparseLogSoftmax", "sparse_log_softmax_grad", "sparse_log_softmax_stats"]


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
    lse = torch.logsumexp(s, dim=-1)
    if not with_tail:
        return lse, None
    lse_tail = _logsumexp_(_support_masked(s.clone(), ids, in_support))
    return lse, lse_tail


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
    tail: Tensor | None = None
    if lse_tail is not None and g_tail is not None:
        total = total + g_tail
        # An empty complement has lse_tail = -inf; every entry is then masked, exp gives 0.
        safe = torch.where(torch.isfinite(lse_tail), lse_tail, torch.zeros_like(lse_tail))
        tail = _support_masked(s - safe[:, None], ids, in_support)
        tail.exp_().mul_(g_tail[:, None])
    ds = s.sub_(lse[:, None]) if inplace else s - lse[:, None]
    ds.exp_().mul_(-total[:, None])
    if tail is not None:
        ds.add_(tail)
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
