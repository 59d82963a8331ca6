"""The KD objectives as arithmetic on small tensors, shared by the plain and fused paths.

Both paths reduce the student's [n, V] logits to ``log q`` at the gathered ids and ``log Q_tail``
(see ``_sparse_softmax``); everything here works on those [n, j] tensors, so each loss is written
once and autograd differentiates it cheaply. Per position, with P the teacher and Q the student,
both at temperature T and coarsened to the support ``I + tail``:

* ``kl``: ``sum_c P_c (log P_c - log Q_c)`` over I and the tail bucket (exact KL of the coarsened
  distributions; the default);
* ``kl-renorm``: KL of P and Q each renormalised over I (tail ignored);
* ``reverse-kl``: ``sum_c Q_c (log Q_c - log P_c)``; teacher log-probs are floored at
  ``LOG_FLOOR`` so that student mass where the teacher recorded none costs a large finite amount;
* ``jsd``: ``beta KL(P||M) + (1-beta) KL(Q||M)``, ``M = beta P + (1-beta) Q``, beta in (0, 1);
* ``sampled-ce``: ``-sum_m w_m log q(id_m)``, the RS-KD estimate of the cross-entropy H(P, Q).

The row loss is ``(1 - alpha) T^2 KD + alpha CE(label)`` where CE uses the logits at T=1.

Numerics: ``-inf`` (padding, empty tail) is replaced by the finite ``_NEG`` before any arithmetic,
so ``0 * (-inf)`` never happens and no NaN reaches a gradient; the explicit masks then zero the
terms that do not exist.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from logitcache.errors import ConfigError
from logitcache.loss.teachers import SampledTeacher, TopKTeacher

__all__ = [
    "LOG_FLOOR",
    "LOSS_NAMES",
    "KDConfig",
    "PreparedTargets",
    "prepare_targets",
    "row_losses",
]

LOSS_NAMES = ("kl", "kl-renorm", "reverse-kl", "jsd", "sampled-ce")
LOG_FLOOR = -100.0
_NEG = -1e30
_TAIL_LOSSES = ("kl", "reverse-kl", "jsd")


@dataclass(frozen=True)
class KDConfig:
    """What to compute: loss name, temperature, hard-label weight alpha, JSD beta, ignore_index."""

    loss: str = "kl"
    temperature: float = 1.0
    alpha: float = 0.0
    beta: float = 0.5
    ignore_index: int = -100

    def __post_init__(self) -> None:
        if self.loss not in LOSS_NAMES:
            raise ConfigError(
                f"unknown loss {self.loss!r}; expected one of {', '.join(LOSS_NAMES)}"
            )
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(f"temperature must be a positive number; got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(
                f"alpha (weight of the hard-label cross-entropy) must be in [0, 1]; "
                f"got {self.alpha}"
            )
        if self.loss == "jsd" and not 0.0 < self.beta < 1.0:
            raise ConfigError(
                f"beta must be in (0, 1) for loss='jsd'; got {self.beta}; fix: use loss='kl' "
                "for the beta -> 0 end (forward KL) or loss='reverse-kl' for beta -> 1"
            )

    @property
    def with_tail(self) -> bool:
        """Whether the student's tail mass is needed (the tail-bucket losses)."""
        return self.loss in _TAIL_LOSSES and self.alpha < 1.0


@dataclass(frozen=True)
class PreparedTargets:
    """Per-position tensors for the selected rows, ready to slice into chunks.

    ``ids [n, j]`` (int64) are the student ids to gather at temperature T: the teacher's ids and,
    when the hard label is scored at the same temperature (T = 1), the label as the last column.
    ``in_support`` marks teacher entries that are part of the support I. ``values`` are the
    teacher's log-probs at T (top-k) or the estimator weights (sampled); ``tail`` the teacher's tail
    log-prob at T. ``labels`` is set when the label is scored separately at T=1.
    """

    ids: Tensor
    in_support: Tensor
    values: Tensor
    tail: Tensor
    labels: Tensor | None
    label_in_ids: bool

    def rows(self, start: int, stop: int) -> PreparedTargets:
        """The targets of rows ``start:stop``."""
        return PreparedTargets(
            self.ids[start:stop],
            self.in_support[start:stop],
            self.values[start:stop],
            self.tail[start:stop],
            None if self.labels is None else self.labels[start:stop],
            self.label_in_ids,
        )


def _check_vocab(name: str, ids: Tensor, vocab: int) -> None:
    if ids.numel() == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        raise ConfigError(
            f"{name} must lie in [0, {vocab}) (the student's vocabulary); got ids in [{lo}, {hi}]; "
            "fix: the cache was dumped with a larger vocabulary or another tokenizer than this "
            "student uses"
        )


def prepare_targets(
    cfg: KDConfig, teacher: TopKTeacher | SampledTeacher, labels: Tensor | None, vocab: int
) -> PreparedTargets:
    """Teacher targets at the config's temperature for the selected rows (no grad)."""
    sampled = isinstance(teacher, SampledTeacher)
    if sampled != (cfg.loss == "sampled-ce"):
        want = "SampledTeacher" if cfg.loss == "sampled-ce" else "TopKTeacher"
        raise ConfigError(
            f"loss={cfg.loss!r} needs a {want}; got a {type(teacher).__name__}; fix: use "
            "loss='sampled-ce' with sampled targets and a top-k loss with top-k targets"
        )
    ids = teacher.ids.long()
    _check_vocab("teacher ids", ids, vocab)
    if isinstance(teacher, SampledTeacher):
        values = teacher.weights(cfg.temperature)
        in_support = values > 0
        tail = torch.full(ids.shape[:1], _NEG, dtype=values.dtype, device=ids.device)
    else:
        in_support, values, tail = teacher.at_temperature(cfg.temperature)
    label_in_ids = False
    if cfg.alpha > 0:
        if labels is None:
            raise ConfigError(
                f"alpha={cfg.alpha} mixes in the hard-label cross-entropy but no labels were "
                "given; fix: pass labels or set alpha=0"
            )
        labels = labels.long()
        _check_vocab("labels", labels, vocab)
        if cfg.temperature == 1.0:
            ids = torch.cat([ids, labels[:, None]], dim=1)
            in_support = torch.cat([in_support, in_support.new_zeros(ids.shape[0], 1)], dim=1)
            label_in_ids, labels = True, None
    else:
        labels = None
    return PreparedTargets(ids, in_support, values, tail, labels, label_in_ids)


def _finite(x: Tensor) -> Tensor:
    return torch.where(torch.isfinite(x), x, torch.full_like(x, _NEG))


def _masked_lse(x: Tensor, keep: Tensor) -> Tensor:
    return torch.logsumexp(torch.where(keep, x, torch.full_like(x, _NEG)), dim=-1)


def _kd_rows(cfg: KDConfig, lq: Tensor, lt: Tensor, tg: PreparedTargets, k: int) -> Tensor:
    """The distillation term per row at temperature T (before T^2 and alpha)."""
    valid = tg.in_support[:, :k]
    lp = _finite(tg.values.to(lq.dtype))
    lq = torch.where(valid, lq, torch.zeros_like(lq))
    if cfg.loss == "sampled-ce":
        return -(lp.clamp(min=0.0) * lq).sum(-1)  # values are the weights here
    if cfg.loss == "kl-renorm":
        lp_n = lp - _masked_lse(lp, valid)[:, None]
        lq_n = lq - _masked_lse(lq, valid)[:, None]
        terms = torch.exp(lp_n) * (lp_n - lq_n)
        return torch.where(valid, terms, torch.zeros_like(terms)).sum(-1)
    # Tail-bucket losses: the tail class exists when the student has a complement to I.
    has_tail = torch.isfinite(lt)
    lt = torch.where(has_tail, lt, torch.full_like(lt, _NEG))
    pt = _finite(tg.tail.to(lq.dtype))
    lp_all = torch.cat([lp, pt[:, None]], dim=1)
    lq_all = torch.cat([lq, lt[:, None]], dim=1)
    exists = torch.cat([valid, has_tail[:, None]], dim=1)
    if cfg.loss == "kl":
        terms = torch.exp(lp_all) * (lp_all - lq_all)
    elif cfg.loss == "reverse-kl":
        terms = torch.exp(lq_all) * (lq_all - lp_all.clamp(min=LOG_FLOOR))
    else:  # jsd
        b = cfg.beta
        lm = torch.logaddexp(lp_all + math.log(b), lq_all + math.log1p(-b))
        terms = b * torch.exp(lp_all) * (lp_all - lm) + (1 - b) * torch.exp(lq_all) * (lq_all - lm)
    return torch.where(exists, terms, torch.zeros_like(terms)).sum(-1)


def row_losses(
    cfg: KDConfig,
    tg: PreparedTargets,
    logq: Tensor,
    log_tail: Tensor,
    logq_label: Tensor | None,
) -> Tensor:
    """``(1 - alpha) T^2 KD + alpha CE`` per row, from the gathered student log-probs."""
    k = tg.values.shape[1]
    out = torch.zeros_like(log_tail)
    if cfg.alpha < 1.0:
        out = (1.0 - cfg.alpha) * cfg.temperature**2 * _kd_rows(cfg, logq[:, :k], log_tail, tg, k)
    if cfg.alpha > 0.0:
        label_logq = logq[:, k] if tg.label_in_ids else logq_label
        if label_logq is None:
            raise RuntimeError("internal: hard-label log-probs missing")
        out = out + cfg.alpha * -label_logq.reshape(-1)
    return out
