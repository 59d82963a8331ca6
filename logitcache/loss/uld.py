"""``uld``: the Universal Logit Distillation loss (Boizard et al. 2024) over sparse teacher targets.

ULD compares the two distributions *without* matching their ids: at each position both are
sorted by probability, descending, padded with zeros to one length, and the loss is the sum of
absolute differences of the sorted vectors, the paper's closed form of the Wasserstein-1 distance
under a uniform transport cost::

    ULD(p, q) = sum_r | p_(r) - q_(r) |        p_(1) >= p_(2) >= ...,  q_(1) >= q_(2) >= ...

Because ids never meet, teacher and student may have different vocabularies (another tokenizer):
only the paired *positions* must be the same text (``data/retokenize.py`` pairs them).

**Sparse teacher.** A top-k cache knows the teacher's m <= k largest probabilities (the valid
entries) and their total remainder ``P_tail``, not how the remainder is split. We compare:

* the first m sorted entries exactly: ``|p_(r) - q_(r)|`` for r < m, with ``q_(r)`` the student's
  own r-th largest probability (``torch.topk`` of its logits: no sort of the vocabulary);
* the remainders as one bucket each: ``|P_tail - Q_rest|``, ``Q_rest`` the student mass outside
  its top m (computed over the complement, like every tail here).

Why this tail treatment and not spreading ``P_tail`` (uniformly, or like the student): by the
triangle inequality ``sum_{r >= m} |p_(r) - q_(r)| >= |sum_{r >= m} p_(r) - sum_{r >= m} q_(r)|``,
so the value is a **lower bound of the full sorted distance for every possible split** of the
teacher's tail, and it is **exact** when the teacher's tail has the shape of the student's (p_(r)
proportional to q_(r) beyond m; in particular when both tails are empty, k = V). Spreading
would invent a shape the cache does not record and, with ``V - m`` unknown entries (another
vocabulary), has no canonical size. Like the ``kl`` tail bucket, this penalises the student for
the *amount* of mass it puts outside its top m, and leaves the tail's shape free.

**Where it lives.** Per entry the terms are ``|exp(lp) - exp(lq)|`` on the objectives' [n, j]
tensors (``objectives._kd_rows`` adds the tail column of both sides), once two things are
arranged, here, before the student's log-probs are gathered (:func:`student_support`): the
teacher's valid entries are sorted descending (padding last), and the ids to gather become the
student's own top-k ids, of which the first m (the teacher's valid count, per row) form the
student's support, so its "tail" is exactly ``Q_rest``. Gradients flow through the gathered
log-probs and the complement tail (``_sparse_softmax``'s backward), never through the sort
(the choice of ids, like ``torch.sort``'s indices, is piecewise constant). Both the plain and the
fused path call the same function, so they agree to float32 rounding (tested).

The row loss is the house's ``(1 - alpha) T^2 ULD + alpha CE(label)``; the paper trains with
``CE + lambda ULD`` at T = 1, which is the same objective up to a scale (``alpha = 1 /
(1 + lambda)``). ULD needs top-k targets (a sampled cache's counts are not sorted probabilities).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from logitcache.loss.objectives import KDConfig, PreparedTargets

__all__ = ["student_support", "uld_terms"]


def uld_terms(cfg: KDConfig, lp: Tensor, lq: Tensor, exists: Tensor) -> Tensor:
    """``|p_(r) - q_(r)|`` per sorted entry, and ``|P_tail - Q_rest|`` in the tail column."""
    return (torch.exp(lp) - torch.exp(lq)).abs()


def student_support(tg: PreparedTargets, s: Tensor) -> PreparedTargets:
    """The targets with the teacher's valid entries sorted descending (padding last) and the ids
    to gather replaced by the student's own top-k of ``s [n, V]`` (scaled logits), sorted.

    ``in_support`` (the teacher's valid entries, now first) marks the student's top-m as its
    support, so the student's tail is its mass outside its top m. A hard-label column appended
    by ``prepare_targets`` (T = 1) is kept as is. No host synchronisation: the counts stay masks.
    """
    k = tg.values.shape[1]
    with torch.no_grad():
        key = torch.where(tg.in_support[:, :k], tg.values, torch.full_like(tg.values, -torch.inf))
        values, order = key.sort(dim=1, descending=True, stable=True)
        valid = tg.in_support[:, :k].gather(1, order)
        kk = min(k, s.shape[1])
        top = _top_ids(s.detach(), kk)
        if kk < k:  # a student vocabulary smaller than k: the extra columns stay unsupported
            top = torch.cat([top, top[:, -1:].expand(-1, k - kk)], dim=1)
            valid = valid & (torch.arange(k, device=s.device) < kk)
        ids = torch.cat([top, tg.ids[:, k:]], dim=1)
        in_support = torch.cat([valid, tg.in_support[:, k:]], dim=1)
    return dataclasses.replace(tg, ids=ids, in_support=in_support, values=values)


def _top_ids(s: Tensor, k: int) -> Tensor:
    """Ids [n, k] of the k largest entries of ``s [n, V]``, by value descending, ties by id
    ascending: the order of a stable descending sort, without sorting the vocabulary.

    ``torch.topk`` leaves the order of equal values unspecified (it differs between calls, k and
    devices; bf16 logits tie often), and at a tie the loss's gradient goes to whichever id holds
    the rank. Ties inside the top k are put in id order on the [n, k] result; a tie across the
    k-th value (another id outside with the same value: checked with one host read) takes the
    lowest ids of the tied group, through a few more [n, V] passes on those batches only.
    """
    v = s.shape[1]
    vals, ids = s.topk(min(k + 1, v), dim=1, sorted=True)
    if k < v and bool((vals[:, k - 1] == vals[:, k]).any()):
        edge = vals[:, k - 1 : k]
        above = s > edge
        tied = s == edge
        need = k - above.sum(1, keepdim=True)
        chosen = above | (tied & (tied.cumsum(1) <= need))
        ids = chosen.to(torch.uint8).topk(k, dim=1).indices
    ids = ids[:, :k].sort(dim=1).values
    order = s.gather(1, ids).sort(dim=1, descending=True, stable=True).indices
    return ids.gather(1, order)
