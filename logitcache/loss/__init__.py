"""Sparse knowledge-distillation losses over cached teacher targets (pure torch).

Three layers, Liger-style: pure functions returning ``(sum, count)`` (:func:`kd_loss` over
logits, :func:`fused_linear_kd_loss` over hidden states + lm_head, chunked), nn.Module wrappers
that normalise once (:class:`SparseKDLoss`, :class:`FusedLinearKDLoss`), and the teacher target
bundles (:class:`TopKTeacher`, :class:`SampledTeacher`). The maths is in docs/losses.md.

This package imports nothing from the rest of logitcache except ``logitcache.errors``: a trainer
can use it on any source of sparse targets.
"""

from __future__ import annotations

from logitcache.loss import functional, fused, modules, objectives, teachers
from logitcache.loss.functional import kd_loss
from logitcache.loss.fused import default_chunk_size, fused_linear_kd_loss
from logitcache.loss.modules import FusedLinearKDLoss, SparseKDLoss
from logitcache.loss.objectives import LOG_FLOOR, LOSS_NAMES, OBJECTIVES, KDConfig, Objective
from logitcache.loss.teachers import SampledTeacher, TopKTeacher, tail_logprob_from_logprobs

__all__ = [
    "LOG_FLOOR",
    "LOSS_NAMES",
    "OBJECTIVES",
    "FusedLinearKDLoss",
    "KDConfig",
    "Objective",
    "SampledTeacher",
    "SparseKDLoss",
    "TopKTeacher",
    "default_chunk_size",
    "functional",
    "fused",
    "fused_linear_kd_loss",
    "kd_loss",
    "modules",
    "objectives",
    "tail_logprob_from_logprobs",
    "teachers",
]
