"""Teacher targets as torch tensors, and the teacher's distribution at a training temperature.

The cache hands the loss one of two sparse views of the teacher at each position:

* :class:`TopKTeacher`: the k most likely ids with their log-probs at T=1, normalised over the
  *full* vocabulary (so ``sum(exp(logprobs)) <= 1``), plus optionally the log of the mass outside
  those ids (the *tail*) and the log-normaliser ``log sum_v p_v^(1/T)`` for one temperature T.
  Padding entries have id 0 and log-prob ``-inf``; an entry is *valid* iff its log-prob is finite.
* :class:`SampledTeacher`: ids drawn from the teacher at T=1 with their counts (RS-KD). Padding
  entries have count 0.

These are torch twins of the numpy containers in ``logitcache.format.targets`` (which this
package must not import: ``loss`` is pure torch). They validate shapes and dtypes at construction
and raise :class:`~logitcache.errors.ConfigError`; id values are checked where they are decoded
(the loader), not per step (a host synchronisation on a GPU).

Temperature. Teacher log-probs at T are ``log p_T(i) = log p(i)/T - log Z_T`` with
``Z_T = sum_v p_v^(1/T)`` over the full vocabulary. With ``temperature_lognorm`` (= log Z_T)
recorded by the dump this is exact, and the tail at T is ``1 - sum_I p_T``. Without it we use the
*tail-bucket approximation*: renormalise ``p_i^(1/T)`` over the stored ids plus the tail mass
raised to 1/T as if it were one class. It is exact at T=1; for T>1 it gives the tail too little
mass (``sum_j p_j^(1/T) >= (sum_j p_j)^(1/T)``), for T<1 too much. See docs/losses.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from logitcache.errors import ConfigError

__all__ = ["SampledTeacher", "TopKTeacher", "tail_logprob_from_logprobs"]

# log(1 - exp(x)) switches formulas at x = -log 2 (Maechler 2012, "Accurately computing
# log(1 - exp(-|a|))").
_LOG_HALF = -0.6931471805599453


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate at both ends; ``x >= 0`` gives ``-inf``."""
    x = x.clamp(max=0.0)
    near_zero = x > _LOG_HALF
    # Evaluate each branch on inputs where it is accurate, so neither produces inf/NaN that
    # torch.where would then have to hide.
    a = torch.log(-torch.expm1(torch.where(near_zero, x, torch.full_like(x, -1.0))))
    b = torch.log1p(-torch.exp(torch.where(near_zero, torch.full_like(x, -1.0), x)))
    return torch.where(near_zero, a, b)


def tail_logprob_from_logprobs(logprobs: Tensor) -> Tensor:
    """Log of the mass outside the stored ids, ``log(1 - sum_i exp(logprobs_i))``, per row.

    ``-inf`` entries (padding) count as zero mass; a row whose stored mass rounds to >= 1 gets
    ``-inf`` (no tail). Computed in float32 (float64 stays float64).
    """
    lp = logprobs if logprobs.dtype == torch.float64 else logprobs.float()
    return _log1mexp(torch.logsumexp(lp, dim=-1))


def _check_2d(name: str, t: Tensor, rows: int | None, cols: int | None) -> None:
    if (
        t.dim() != 2
        or (rows is not None and t.shape[0] != rows)
        or (cols is not None and t.shape[1] != cols)
    ):
        raise ConfigError(
            f"teacher {name} must have shape [N, k] matching the ids "
            f"(expected [{rows}, {cols}]); got {list(t.shape)}; "
            "fix: pass the per-position targets of one batch, flattened to N positions"
        )


def _check_rows(name: str, t: Tensor | None, rows: int) -> None:
    if t is not None and (t.dim() != 1 or t.shape[0] != rows):
        raise ConfigError(
            f"teacher {name} must have shape [N] = [{rows}]; got {list(t.shape)}; "
            "fix: pass one value per position"
        )


def _check_ids(ids: Tensor) -> None:
    if ids.dim() != 2 or ids.dtype not in (torch.int32, torch.int64):
        raise ConfigError(
            f"teacher ids must be an int32/int64 tensor of shape [N, k]; got {ids.dtype} "
            f"{list(ids.shape)}; fix: flatten batch and sequence into N and keep ids integer"
        )
    if ids.shape[1] == 0:
        raise ConfigError("teacher ids have k = 0 entries per position; expected k >= 1")


@dataclass(frozen=True)
class TopKTeacher:
    """Top-k teacher targets for N positions (see the module docstring for the meaning)."""

    ids: Tensor
    logprobs: Tensor
    tail_logprob: Tensor | None = None
    temperature_lognorm: Tensor | None = None

    def __post_init__(self) -> None:
        _check_ids(self.ids)
        _check_2d("logprobs", self.logprobs, self.ids.shape[0], self.ids.shape[1])
        _check_rows("tail_logprob", self.tail_logprob, self.ids.shape[0])
        _check_rows("temperature_lognorm", self.temperature_lognorm, self.ids.shape[0])

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def select(self, index: Tensor) -> TopKTeacher:
        """The targets of the positions ``index`` (a 1-D long tensor), in that order."""
        return TopKTeacher(
            self.ids.index_select(0, index),
            self.logprobs.index_select(0, index),
            None if self.tail_logprob is None else self.tail_logprob.index_select(0, index),
            None
            if self.temperature_lognorm is None
            else self.temperature_lognorm.index_select(0, index),
        )

    def within_vocab(self, vocab: int) -> TopKTeacher:
        """The targets for a student with ``vocab`` outputs (a truncated vocabulary): entries of
        ids ``>= vocab`` become padding (id 0, ``-inf``) and their mass joins the tail bucket.

        No grad, no host synchronisation: a few [N, k] element-wise operations. At T != 1 the
        folded ids' tempered mass is in the tail too (exact with ``temperature_lognorm``, which
        computes the tail as the rest; the tail-bucket approximation otherwise).
        """
        with torch.no_grad():
            gone = self.ids >= vocab
            lp = self.logprobs
            moved = torch.logsumexp(lp.masked_fill(~gone, float("-inf")), dim=-1)
            tail = self.tail_logprob
            if tail is None:  # the mass outside all k stored entries; the folded one joins it
                tail = tail_logprob_from_logprobs(lp)
            tail = torch.logaddexp(tail.to(moved.dtype), moved).to(tail.dtype)
            return TopKTeacher(
                self.ids.masked_fill(gone, 0),
                lp.masked_fill(gone, float("-inf")),
                tail,
                self.temperature_lognorm,
            )

    def at_temperature(self, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
        """``(valid [N,k], log p_T(ids) [N,k], log p_T(tail) [N])`` in float32, no grad.

        Invalid (padding) entries get ``-inf``; a tail of zero mass is ``-inf``.
        """
        with torch.no_grad():
            dtype = torch.float64 if self.logprobs.dtype == torch.float64 else torch.float32
            lp = self.logprobs.to(dtype)
            valid = torch.isfinite(lp)
            lp = torch.where(valid, lp, torch.full_like(lp, float("-inf")))
            if self.tail_logprob is None:
                tail = _log1mexp(torch.logsumexp(lp, dim=-1))
            else:
                tail = self.tail_logprob.to(dtype)
                tail = torch.where(torch.isnan(tail), torch.full_like(tail, float("-inf")), tail)
            if temperature == 1.0:
                return valid, lp, tail
            if self.temperature_lognorm is not None:
                lp_t = lp / temperature - self.temperature_lognorm.to(dtype)[:, None]
                tail_t = _log1mexp(torch.logsumexp(lp_t, dim=-1))
                return valid, lp_t, tail_t
            # Tail-bucket approximation: the tail is one class whose mass is raised to 1/T.
            both = torch.cat([lp, tail[:, None]], dim=1) / temperature
            both = both - torch.logsumexp(both, dim=-1, keepdim=True).clamp(min=-1e30)
            return valid, both[:, :-1], both[:, -1]


@dataclass(frozen=True)
class SampledTeacher:
    """Sampled (RS-KD) teacher targets: ids drawn from the teacher at T=1, with counts.

    ``num_draws`` is the number of draws n per position (an int or an [N] tensor); if None it is
    ``counts.sum(-1)``. ``logprobs`` (the teacher's T=1 log-probs of the sampled ids) is needed only
    to train at a temperature other than 1; ``temperature_lognorm`` makes that reweighting exact.
    """

    ids: Tensor
    counts: Tensor
    num_draws: int | Tensor | None = None
    logprobs: Tensor | None = None
    temperature_lognorm: Tensor | None = None

    def __post_init__(self) -> None:
        _check_ids(self.ids)
        _check_2d("counts", self.counts, self.ids.shape[0], self.ids.shape[1])
        if self.logprobs is not None:
            _check_2d("logprobs", self.logprobs, self.ids.shape[0], self.ids.shape[1])
        if isinstance(self.num_draws, Tensor):
            _check_rows("num_draws", self.num_draws, self.ids.shape[0])
        elif self.num_draws is not None and self.num_draws <= 0:
            raise ConfigError(f"num_draws must be positive; got {self.num_draws}")
        _check_rows("temperature_lognorm", self.temperature_lognorm, self.ids.shape[0])

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def select(self, index: Tensor) -> SampledTeacher:
        """The targets of the positions ``index`` (a 1-D long tensor), in that order."""

        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.index_select(0, index)

        n = self.num_draws
        return SampledTeacher(
            self.ids.index_select(0, index),
            self.counts.index_select(0, index),
            n.index_select(0, index) if isinstance(n, Tensor) else n,
            pick(self.logprobs),
            pick(self.temperature_lognorm),
        )

    def within_vocab(self, vocab: int) -> SampledTeacher:
        """The targets for a student with ``vocab`` outputs (a truncated vocabulary): draws of
        ids ``>= vocab`` get count 0 (the sampled loss has no tail bucket: with ``num_draws``
        fixed, the estimate is of ``-sum_{v < vocab} p_v log q_v``, the teacher's mass on the
        missing ids untrained)."""
        with torch.no_grad():
            gone = self.ids >= vocab
            n = self.num_draws if self.num_draws is not None else self.counts.sum(-1)
            return SampledTeacher(
                self.ids.masked_fill(gone, 0),
                self.counts.masked_fill(gone, 0),
                n,
                None if self.logprobs is None else self.logprobs.masked_fill(gone, float("-inf")),
                self.temperature_lognorm,
            )

    def weights(self, temperature: float) -> Tensor:
        """Per-entry weights ``w [N, m]`` (float32, no grad) of the cross-entropy estimator.

        At T=1, ``w = counts / n``: the empirical teacher distribution, unbiased for p. At T != 1
        the draws (from p) are importance-weighted towards p_T: ``w *= p_T / p``, exactly with
        ``temperature_lognorm``, else self-normalised per position (consistent, slightly biased).
        """
        with torch.no_grad():
            counts = self.counts.float()
            n: Tensor | float
            if self.num_draws is None:
                n = counts.sum(-1, keepdim=True).clamp(min=1.0)
            elif isinstance(self.num_draws, Tensor):
                n = self.num_draws.float()[:, None].clamp(min=1.0)
            else:
                n = float(self.num_draws)
            w = counts / n
            if temperature == 1.0:
                return w
            if self.logprobs is None:
                raise ConfigError(
                    f"sampled targets at temperature {temperature} need the teacher log-probs of "
                    "the sampled ids to reweight the draws; got logprobs=None; fix: dump them "
                    "or train at temperature 1"
                )
            lp = self.logprobs.float()
            ok = (counts > 0) & torch.isfinite(lp)
            lp = torch.where(ok, lp, torch.zeros_like(lp))
            log_ratio = lp * (1.0 / temperature - 1.0)
            if self.temperature_lognorm is not None:
                ratio = torch.exp(log_ratio - self.temperature_lognorm.float()[:, None])
                return torch.where(ok, w * ratio, torch.zeros_like(w))
            log_ratio = log_ratio - log_ratio.masked_fill(~ok, float("-inf")).amax(-1, True).clamp(
                min=-1e30
            )
            w = torch.where(ok, w * torch.exp(log_ratio), torch.zeros_like(w))
            return w / w.sum(-1, keepdim=True).clamp(min=1e-30)
