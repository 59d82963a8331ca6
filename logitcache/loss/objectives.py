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
* ``sampled-ce``: ``-sum_m w_m log q(id_m)``, the RS-KD estimate of the cross-entropy H(P, Q);
* ``uld``: ``sum_r |p_(r) - q_(r)|`` over both sides' sorted probabilities plus the remainders
  (Boizard et al. 2024; no ids matched, so another vocabulary works): ``loss/uld.py``.

The row loss is ``(1 - alpha) T^2 KD + alpha CE(label)`` where CE uses the logits at T=1.

**Adding a loss is one entry in this file**: an :class:`Objective` in ``OBJECTIVES`` gives its
name, one line of help, the per-entry terms (a function of teacher values ``lp``, student
log-probs ``lq`` and the ``exists`` mask, all [n, j]), whether the tail bucket is one of the
entries, which targets it needs, and optional extra validation. ``LOSS_NAMES``, ``KDConfig``'s
checks, the trainer's config and the CLI's ``--loss`` choice and help all read the registry.

Numerics: ``-inf`` (padding, empty tail) is replaced by the finite ``_NEG`` before any arithmetic,
so ``0 * (-inf)`` never happens and no NaN reaches a gradient; the explicit masks then zero the
terms that do not exist.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from logitcache.errors import ConfigError
from logitcache.loss.teachers import SampledTeacher, TopKTeacher
from logitcache.loss.uld import student_support, uld_terms

__all__ = [
    "LOG_FLOOR",
    "LOSS_NAMES",
    "OBJECTIVES",
    "KDConfig",
    "Objective",
    "PreparedTargets",
    "prepare_targets",
    "row_losses",
]

LOG_FLOOR = -100.0
_NEG = -1e30

# Per-entry terms [n, j] of one objective: (config, teacher values, student log-probs, exists).
Terms = Callable[["KDConfig", Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Objective:
    """One KD loss: its name, help line, per-entry terms and what it needs.

    ``terms(cfg, lp, lq, exists)`` returns [n, j] terms whose sum over ``exists`` is the KD term of
    each row. ``lp`` holds teacher log-probs at T (top-k) or estimator weights (sampled), ``lq``
    the student's log-probs at the same entries; with ``tail=True`` the last column is the tail
    bucket of both. ``targets`` is the teacher container the loss reads; ``check`` returns a
    problem (with its fix) for settings this loss refuses, or None. ``student_ids``, when set,
    chooses where the student is read, from the targets and its scaled logits [n, V] (no grad),
    instead of at the teacher's ids (``uld``: its own top-k, sorted).
    """

    name: str
    help: str
    terms: Terms
    tail: bool = False
    targets: Literal["topk", "sampled"] = "topk"
    check: Callable[[KDConfig], str | None] | None = None
    student_ids: Callable[[PreparedTargets, Tensor], PreparedTargets] | None = None


def _kl(cfg: KDConfig, lp: Tensor, lq: Tensor, exists: Tensor) -> Tensor:
    return torch.exp(lp) * (lp - lq)


def _kl_renorm(cfg: KDConfig, lp: Tensor, lq: Tensor, exists: Tensor) -> Tensor:
    lp_n = lp - _masked_lse(lp, exists)[:, None]
    lq_n = lq - _masked_lse(lq, exists)[:, None]
    return torch.exp(lp_n) * (lp_n - lq_n)


def _reverse_kl(cfg: KDConfig, lp: Tensor, lq: Tensor, exists: Tensor) -> Tensor:
    return torch.exp(lq) * (lq - lp.clamp(min=LOG_FLOOR))


def _jsd(cfg: KDConfig, lp: Tensor, lq: Tensor, exists: Tensor) -> Tensor:
    b = cfg.beta
    lm = torch.logaddexp(lp + math.log(b), lq + math.log1p(-b))
    return b * torch.exp(lp) * (lp - lm) + (1 - b) * torch.exp(lq) * (lq - lm)


def _jsd_check(cfg: KDConfig) -> str | None:
    if 0.0 < cfg.beta < 1.0:
        return None
    return (
        f"beta must be in (0, 1) for loss='jsd'; got {cfg.beta}; fix: use loss='kl' "
        "for the beta -> 0 end (forward KL) or loss='reverse-kl' for beta -> 1"
    )


def _sampled_ce(cfg: KDConfig, lp: Tensor, lq: Tensor, exists: Tensor) -> Tensor:
    return -(lp.clamp(min=0.0) * lq)  # lp holds the estimator weights here


OBJECTIVES: dict[str, Objective] = {
    o.name: o
    for o in (
        Objective("kl", "forward KL over the stored ids plus a tail bucket", _kl, tail=True),
        Objective("kl-renorm", "KL renormalised over the stored ids (tail ignored)", _kl_renorm),
        Objective("reverse-kl", "reverse KL over ids + tail (mode-seeking)", _reverse_kl, True),
        Objective(
            "jsd", "generalised JSD over ids + tail, mixed by beta", _jsd, True, check=_jsd_check
        ),
        Objective(
            "sampled-ce",
            "RS-KD cross-entropy estimate (sampled caches)",
            _sampled_ce,
            targets="sampled",
        ),
        Objective(
            "uld",
            "sorted-probability distance (ULD), ids unmatched: works across tokenizers",
            uld_terms,
            tail=True,
            student_ids=student_support,
        ),
    )
}
LOSS_NAMES = tuple(OBJECTIVES)


@dataclass(frozen=True)
class KDConfig:
    """What to compute: loss name, temperature, hard-label weight alpha, JSD beta, ignore_index."""

    loss: str = "kl"
    temperature: float = 1.0
    alpha: float = 0.0
    beta: float = 0.5
    ignore_index: int = -100

    def __post_init__(self) -> None:
        if self.loss not in OBJECTIVES:
            raise ConfigError(
                f"unknown loss {self.loss!r}; expected one of {', '.join(OBJECTIVES)}"
            )
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(f"temperature must be a positive number; got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(
                f"alpha (weight of the hard-label cross-entropy) must be in [0, 1]; "
                f"got {self.alpha}"
            )
        check = self.objective.check
        problem = None if check is None else check(self)
        if problem:
            raise ConfigError(problem)

    @property
    def objective(self) -> Objective:
        """The registry entry of :attr:`loss`."""
        return OBJECTIVES[self.loss]

    @property
    def with_tail(self) -> bool:
        """Whether the student's tail mass is needed (the tail-bucket losses)."""
        return self.objective.tail and self.alpha < 1.0


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


def prepare_targets(
    cfg: KDConfig, teacher: TopKTeacher | SampledTeacher, labels: Tensor | None
) -> PreparedTargets:
    """Teacher targets at the config's temperature for the selected rows (no grad).

    Ids are not range-checked here: that would cost a host synchronisation per step on a GPU.
    They are checked where they are decoded (``data.collate``, ``data.targets``: ids < the
    cache's vocabulary) and the trainer refuses a student whose head is smaller than the cache's
    vocabulary before the first step (``train.student.check_compatible``).
    """
    want = {"topk": TopKTeacher, "sampled": SampledTeacher}[cfg.objective.targets]
    if not isinstance(teacher, want):
        raise ConfigError(
            f"loss={cfg.loss!r} needs a {want.__name__}; got a {type(teacher).__name__}; fix: "
            "use loss='sampled-ce' with sampled targets and a top-k loss with top-k targets"
        )
    ids = teacher.ids.long()
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
    exists = tg.in_support[:, :k]
    lp = _finite(tg.values.to(lq.dtype))
    lq = torch.where(exists, lq, torch.zeros_like(lq))
    if cfg.objective.tail:  # the tail class exists when the student has a complement to I
        has_tail = torch.isfinite(lt)
        lt = torch.where(has_tail, lt, torch.full_like(lt, _NEG))
        lp = torch.cat([lp, _finite(tg.tail.to(lq.dtype))[:, None]], dim=1)
        lq = torch.cat([lq, lt[:, None]], dim=1)
        exists = torch.cat([exists, has_tail[:, None]], dim=1)
    terms = cfg.objective.terms(cfg, lp, lq, exists)
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
