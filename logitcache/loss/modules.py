"""nn.Module wrappers: hold the loss settings, call the pure function, normalise once.

Each ``forward`` takes the arguments of its function in the same order: ``SparseKDLoss()(logits,
teacher, labels, mask)`` like ``kd_loss``, ``FusedLinearKDLoss()(hidden, weight, teacher, labels,
mask, bias=...)`` like ``fused_linear_kd_loss`` (hidden and weight stand where logits stand).

The pure functions return ``(sum, count)``; a module divides by ``max(count, 1)`` so that an
all-masked batch gives 0 (with zero gradient) instead of 0/0. Callers that accumulate over
micro-batches or ranks should use the functions and divide by their own global count.
"""

from __future__ import annotations

from torch import Tensor, nn

from logitcache.loss.functional import kd_loss
from logitcache.loss.fused import fused_linear_kd_loss
from logitcache.loss.objectives import KDConfig
from logitcache.loss.teachers import SampledTeacher, TopKTeacher

__all__ = ["FusedLinearKDLoss", "SparseKDLoss"]


def _mean(total: Tensor, count: Tensor) -> Tensor:
    return total / count.clamp(min=1).to(total.dtype)


class SparseKDLoss(nn.Module):
    """Mean sparse KD loss over the selected positions, from student logits [N, V]."""

    def __init__(
        self,
        loss: str = "kl",
        temperature: float = 1.0,
        alpha: float = 0.0,
        beta: float = 0.5,
        ignore_index: int = -100,
    ) -> None:
        super().__init__()
        self.config = KDConfig(loss, temperature, alpha, beta, ignore_index)

    def extra_repr(self) -> str:
        return repr(self.config)

    def forward(
        self,
        logits: Tensor,
        teacher: TopKTeacher | SampledTeacher,
        labels: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        c = self.config
        total, count = kd_loss(
            logits,
            teacher,
            labels,
            mask,
            loss=c.loss,
            temperature=c.temperature,
            alpha=c.alpha,
            beta=c.beta,
            ignore_index=c.ignore_index,
        )
        return _mean(total, count)


class FusedLinearKDLoss(nn.Module):
    """Mean sparse KD loss from hidden states and the lm_head, chunked (no [N, V] logits)."""

    def __init__(
        self,
        loss: str = "kl",
        temperature: float = 1.0,
        alpha: float = 0.0,
        beta: float = 0.5,
        ignore_index: int = -100,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.config = KDConfig(loss, temperature, alpha, beta, ignore_index)
        self.chunk_size = chunk_size

    def extra_repr(self) -> str:
        return f"{self.config!r}, chunk_size={self.chunk_size}"

    def forward(
        self,
        hidden: Tensor,
        weight: Tensor,
        teacher: TopKTeacher | SampledTeacher,
        labels: Tensor | None = None,
        mask: Tensor | None = None,
        *,
        bias: Tensor | None = None,
    ) -> Tensor:
        c = self.config
        total, count = fused_linear_kd_loss(
            hidden,
            weight,
            teacher,
            labels,
            mask,
            bias=bias,
            loss=c.loss,
            temperature=c.temperature,
            alpha=c.alpha,
            beta=c.beta,
            ignore_index=c.ignore_index,
            chunk_size=self.chunk_size,
        )
        return _mean(total, count)
