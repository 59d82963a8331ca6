"""Sparse KD loss over full student logits: a pure function returning ``(sum, count)``.

Returning the sum over selected positions and their count, not a mean, is what lets chunked,
gradient-accumulated and data-parallel callers normalise once, by the true number of positions
(Liger's and torchtune's lesson); :class:`~logitcache.loss.SparseKDLoss` divides for you.

Position selection: ``mask`` (bool [N], True = train on it) and ``labels != ignore_index`` when
labels are given; both the KD term and the hard-label term use exactly these positions. Rows
that are not selected are dropped before any [n, V] work, so whatever targets they carry (often
all padding) cannot produce NaN; an all-masked batch gives a zero sum whose gradient is zero.

Dtypes: whatever the logits' dtype (bf16 students), the loss is computed in float32; float64
stays float64 so that ``torch.autograd.gradcheck`` can be run on it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from logitcache.errors import ConfigError
from logitcache.loss._sparse_softmax import SparseLogSoftmax
from logitcache.loss.objectives import KDConfig, PreparedTargets, prepare_targets, row_losses
from logitcache.loss.teachers import SampledTeacher, TopKTeacher

__all__ = ["compute_dtype", "kd_loss", "select_positions", "select_rows", "student_row_losses"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (for gradcheck); every other float dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def select_positions(
    n: int,
    device: torch.device,
    mask: Tensor | None,
    labels: Tensor | None,
    ignore_index: int,
) -> tuple[Tensor | None, Tensor]:
    """``(index of selected rows or None when all are, count)`` of the positions to train on."""
    for name, t in (("mask", mask), ("labels", labels)):
        if t is not None and (t.dim() != 1 or t.shape[0] != n):
            raise ConfigError(
                f"{name} must have shape [N] = [{n}] like the student's rows; got "
                f"{list(t.shape)}; fix: flatten batch and sequence the same way for all inputs"
            )
    keep: Tensor | None = None
    if mask is not None:
        keep = mask.to(device=device, dtype=torch.bool)
    if labels is not None:
        has_label = labels.to(device) != ignore_index
        keep = has_label if keep is None else keep & has_label
    if keep is None:
        return None, torch.tensor(n, dtype=torch.long, device=device)
    index = keep.nonzero().squeeze(1)
    count = torch.tensor(index.numel(), dtype=torch.long, device=device)
    return (None if index.numel() == n else index), count


def select_rows(
    teacher: TopKTeacher | SampledTeacher, labels: Tensor | None, index: Tensor | None, n: int
) -> tuple[TopKTeacher | SampledTeacher, Tensor | None]:
    """The targets and labels of the selected rows (all of them when ``index`` is None)."""
    if len(teacher) != n:
        raise ConfigError(
            f"teacher targets cover {len(teacher)} positions but the student gives {n}; "
            "fix: pass the targets of exactly the positions of this batch, flattened"
        )
    if index is None:
        return teacher, labels
    return teacher.select(index), None if labels is None else labels.index_select(0, index)


def student_row_losses(cfg: KDConfig, tg: PreparedTargets, z: Tensor) -> Tensor:
    """Per-row loss from student logits ``z [n, V]`` (compute dtype), differentiable in ``z``."""
    s = z / cfg.temperature if cfg.temperature != 1.0 else z
    if cfg.objective.student_ids is not None:
        tg = cfg.objective.student_ids(tg, s)
    logq, log_tail = SparseLogSoftmax.apply(s, tg.ids, tg.in_support, cfg.with_tail)
    logq_label = None
    if tg.labels is not None:
        none = torch.zeros(tg.labels.shape[0], 1, dtype=torch.bool, device=z.device)
        logq_label, _ = SparseLogSoftmax.apply(z, tg.labels[:, None], none, False)
    return row_losses(cfg, tg, logq, log_tail, logq_label)


def kd_loss(
    logits: Tensor,
    teacher: TopKTeacher | SampledTeacher,
    labels: Tensor | None = None,
    mask: Tensor | None = None,
    *,
    loss: str = "kl",
    temperature: float = 1.0,
    alpha: float = 0.0,
    beta: float = 0.5,
    ignore_index: int = -100,
) -> tuple[Tensor, Tensor]:
    """Sparse KD loss of student ``logits [N, V]`` against cached teacher targets.

    Returns ``(sum, count)``: the float32 sum over selected positions of
    ``(1 - alpha) * T^2 * KD + alpha * CE(labels)`` and the number of selected positions (int64).
    ``loss`` is one of ``kl`` (tail bucket, default), ``kl-renorm``, ``reverse-kl``, ``jsd``
    (with ``beta``) and ``sampled-ce`` (needs a :class:`SampledTeacher`). See docs/losses.md.
    """
    cfg = KDConfig(loss, temperature, alpha, beta, ignore_index)
    if logits.dim() != 2:
        raise ConfigError(
            f"logits must have shape [N, V]; got {list(logits.shape)}; "
            "fix: flatten batch and sequence, e.g. logits.flatten(0, -2)"
        )
    n = logits.shape[0]
    index, count = select_positions(n, logits.device, mask, labels, ignore_index)
    teacher, labels = select_rows(teacher, labels, index, n)
    tg = prepare_targets(cfg, teacher, labels)
    z = logits if index is None else logits.index_select(0, index)
    rows = student_row_losses(cfg, tg, z.to(compute_dtype(z.dtype)))
    return rows.sum(), count
