"""Chunked fused-linear KD loss: hidden states + lm_head in, loss out, no [N, V] logits held.

At vocab 128k a float32 [N, V] logits tensor is 0.5 MB per token, and the plain path keeps a few
of them (logits, their float32 copy, softmax buffers, the gradient). Here the positions are cut
into chunks of ``chunk_size`` rows; for each chunk the logits are computed, the loss *and* its
gradient are computed at once (the loss is a sum, so the chunks are independent), and the
gradient is pushed straight through the linear layer into ``grad_hidden`` (rows of the chunk)
and the float32 accumulators ``grad_weight`` / ``grad_bias``. Backward then only scales those by
the incoming gradient. Peak extra memory is ~3 chunk buffers of [chunk, V] float32 plus the
weight-sized accumulator, instead of several [N, V] tensors; the matmuls are the same three the
plain path does, so the time is the same up to chunking overheads.

Default chunk size: ``2**24 // V`` rows (64 MiB per float32 [chunk, V] buffer), at least 1.

The per-chunk loss is the same code as the plain path (``student_row_losses`` pieces), so the two
agree to float32 rounding; the gradient of the small per-row loss comes from autograd on [n, j]
tensors and the [n, V] part from the hand-written backward in ``_sparse_softmax``.

Limits: one backward per forward (the weight-sized accumulator is scaled in place rather than
copied, which would double the peak; a second backward raises), and no double backward. So
``torch.autograd.gradcheck`` cannot run on it directly; the tests check it against the plain
path in float64 instead, whose gradient is gradchecked.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from logitcache.errors import ConfigError
from logitcache.loss._sparse_softmax import sparse_log_softmax_grad, sparse_log_softmax_stats
from logitcache.loss.functional import compute_dtype, select_positions, select_rows
from logitcache.loss.objectives import KDConfig, PreparedTargets, prepare_targets, row_losses
from logitcache.loss.teachers import SampledTeacher, TopKTeacher

__all__ = ["default_chunk_size", "fused_linear_kd_loss"]

_CHUNK_ELEMENTS = 2**24


def default_chunk_size(vocab: int) -> int:
    """Rows per chunk so that one float32 [chunk, V] buffer is about 64 MiB."""
    return max(1, _CHUNK_ELEMENTS // max(1, vocab))


def _chunk_grad(
    cfg: KDConfig, tg: PreparedTargets, z: Tensor, need_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """Loss sum of one chunk and, if asked, ``dL/dz`` (computed in place of ``z``)."""
    keep_z = tg.labels is not None  # the label is scored on the T=1 logits, separately
    t = cfg.temperature
    s = (z / t if keep_z else z.div_(t)) if t != 1.0 else z
    if cfg.objective.student_ids is not None:
        tg = cfg.objective.student_ids(tg, s)
    lse, lse_tail = sparse_log_softmax_stats(s, tg.ids, tg.in_support, cfg.with_tail)
    logq = s.gather(1, tg.ids) - lse[:, None]
    log_tail = torch.zeros_like(lse) if lse_tail is None else lse_tail - lse
    lse1: Tensor | None = None
    logq_label = None
    if tg.labels is not None:
        lse1 = torch.logsumexp(z, dim=-1)
        logq_label = z.gather(1, tg.labels[:, None]) - lse1[:, None]
    leaves = [x.detach().requires_grad_(need_grad) for x in (logq, log_tail)]
    label_leaf = None if logq_label is None else logq_label.detach().requires_grad_(need_grad)
    with torch.enable_grad():
        total = row_losses(cfg, tg, leaves[0], leaves[1], label_leaf).sum()
        if not need_grad:
            return total.detach(), None
        inputs = [*leaves] if label_leaf is None else [*leaves, label_leaf]
        grads = torch.autograd.grad(total, inputs, allow_unused=True, materialize_grads=True)
    ds = sparse_log_softmax_grad(
        s, tg.ids, tg.in_support, lse, lse_tail, grads[0], grads[1], inplace=True
    )
    if t != 1.0:
        ds.div_(t)
    if tg.labels is not None and lse1 is not None:
        none = torch.zeros(tg.labels.shape[0], 1, dtype=torch.bool, device=z.device)
        ds.add_(
            sparse_log_softmax_grad(
                z, tg.labels[:, None], none, lse1, None, grads[2], None, inplace=True
            )
        )
    return total.detach(), ds


class _FusedLinearKD(torch.autograd.Function):
    """``(hidden [n, H], weight [V, H], bias [V] | None) -> loss sum``; grads made in forward.

    Internal: the public argument order is :func:`fused_linear_kd_loss`'s.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        cfg: KDConfig,
        tg: PreparedTargets,
        chunk_size: int,
    ) -> Tensor:
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and bias is not None
        need = need_h or need_w or need_b
        acc = compute_dtype(weight.dtype)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        n = hidden.shape[0]
        for start in range(0, n, chunk_size):
            stop = min(n, start + chunk_size)
            h = hidden[start:stop]
            z = h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())
            part, dz = _chunk_grad(cfg, tg.rows(start, stop), z.to(acc), need)
            total += part
            if dz is None:
                continue
            dz_mm = dz.to(weight.dtype)
            if grad_h is not None:
                torch.mm(dz_mm, weight, out=grad_h[start:stop])
            if grad_w is not None:
                if grad_w.dtype == dz_mm.dtype:
                    grad_w.addmm_(dz_mm.t(), h)
                else:
                    grad_w.add_(dz_mm.t() @ h)
            if grad_b is not None:
                grad_b.add_(dz.sum(0))
        ctx.set_materialize_grads(False)
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor | None) -> tuple[Tensor | None, ...]:
        if ctx.grads is None:
            raise RuntimeError(
                "fused_linear_kd_loss supports one backward per forward (its gradient "
                "accumulators are scaled in place); fix: run the forward again instead of "
                "retain_graph=True, or use kd_loss on logits"
            )
        grad_h, grad_w, grad_b = ctx.grads
        ctx.grads = None
        if grad_out is None:
            return None, None, None, None, None, None
        w_dtype, b_dtype = ctx.dtypes
        g = grad_out.to(torch.float32)
        if grad_h is not None:
            grad_h = grad_h * g.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = grad_w.mul_(g.to(grad_w.dtype)).to(w_dtype)
        if grad_b is not None:
            grad_b = grad_b.mul_(g.to(grad_b.dtype)).to(b_dtype)
        return grad_h, grad_w, grad_b, None, None, None


def fused_linear_kd_loss(
    hidden: Tensor,
    weight: Tensor,
    teacher: TopKTeacher | SampledTeacher,
    labels: Tensor | None = None,
    mask: Tensor | None = None,
    *,
    bias: Tensor | None = None,
    loss: str = "kl",
    temperature: float = 1.0,
    alpha: float = 0.0,
    beta: float = 0.5,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Same as :func:`kd_loss` on ``logits = hidden @ weight.T + bias``, chunked over positions.

    ``hidden [N, H]`` and ``weight [V, H]`` stand where ``kd_loss`` takes ``logits``; the other
    arguments come in ``kd_loss``'s order, ``bias [V]`` (or None) by keyword. Returns
    ``(sum, count)``.
    """
    cfg = KDConfig(loss, temperature, alpha, beta, ignore_index)
    if not isinstance(teacher, TopKTeacher | SampledTeacher):
        raise ConfigError(
            f"the third argument must be the teacher targets (TopKTeacher or SampledTeacher); "
            f"got {type(teacher).__name__}; fix: call fused_linear_kd_loss(hidden, weight, "
            "teacher, labels, mask, bias=bias), the order of kd_loss(logits, teacher, ...)"
        )
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ConfigError(
            f"expected hidden [N, H] and weight [V, H] with the same H; got hidden "
            f"{list(hidden.shape)} and weight {list(weight.shape)}; fix: flatten hidden to "
            "[N, H] and pass the lm_head weight as stored by nn.Linear"
        )
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ConfigError(f"bias must have shape [{weight.shape[0]}]; got {list(bias.shape)}")
    if chunk_size is not None and chunk_size < 1:
        raise ConfigError(f"chunk_size must be a positive number of rows; got {chunk_size}")
    n, vocab = hidden.shape[0], weight.shape[0]
    index, count = select_positions(n, hidden.device, mask, labels, ignore_index)
    teacher, labels = select_rows(teacher, labels, index, n)
    tg = prepare_targets(cfg, teacher, labels)
    h = hidden if index is None else hidden.index_select(0, index)
    rows = chunk_size or default_chunk_size(vocab)
    total = _FusedLinearKD.apply(h, weight, bias, cfg, tg, rows)
    return total, count
