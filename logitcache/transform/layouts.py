"""The plain-column layouts other tools publish, as data: which column holds what, and what the
values mean.

A published logit dataset is a table with one record per row of tokens and list columns: the
row's ``input_ids`` and, per position, the teacher's top-k ids and values. No two datasets agree
on the column names, the nesting or what the values are, and none records it, so a
:class:`Layout` says it explicitly and ``logitcache import`` is driven by one. The presets below
are the layouts we know of; anything else is given with explicit flags.

What the values are decides what can be recovered:

- ``logprob`` / ``prob`` **normalised over the full vocabulary** (what a teacher's
  ``log_softmax`` gives, what vLLM's ``logprobs`` are): the mass outside the stored ids is exactly
  ``1 - sum p``, so the cache keeps a true tail bucket and every loss works;
- ``logit`` (raw scores), or values renormalised over the stored ids: the tail mass is
  **unknown**. The import renormalises over the stored ids and records ``targets.tail =
  "unknown"`` in the manifest; the tail-bucket losses (``kl``, ``reverse-kl``, ``jsd``) refuse
  such a cache and ``kl-renorm`` (what the tools that published it use) works.

Positions: the values at position ``t`` are the teacher's prediction of token ``t + 1`` given
tokens ``0..t`` (the convention of a causal LM's forward pass and of our caches). A row may carry
targets for fewer positions than it has tokens (often ``len - 1``): the rest get no target.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

from logitcache.errors import ConfigError

__all__ = ["LAYOUTS", "Layout", "ValueKind"]

ValueKind = Literal["logprob", "prob", "logit"]
_KINDS = ("logprob", "prob", "logit")


@dataclass(frozen=True)
class Layout:
    """Where an import finds each field of a row, and what its values are.

    ``ids``/``values``: columns of per-position lists (``[S][k]``). ``pairs``: instead of those
    two, one column of per-position ``[2][k]`` (ids then values), the ``targets`` layout.
    ``records``: instead of those, one column of per-position lists of ``{token, logprob}``
    objects (vLLM/distilabel ``logprobs``; ``token`` is an id or ``"token_id:N"``).
    ``normalized``: the values are normalised over the whole vocabulary (tail = 1 - sum).
    ``loss_mask``: optional per-token 0/1 column. ``tail``: optional per-position column with the
    log mass outside the stored ids (our own export writes it).
    """

    input_ids: str = "input_ids"
    ids: str | None = None
    values: str | None = None
    pairs: str | None = None
    records: str | None = None
    value_kind: ValueKind = "logprob"
    normalized: bool = True
    loss_mask: str | None = None
    tail: str | None = None
    description: str = ""

    def __post_init__(self) -> None:
        given = [x for x in (self.ids and self.values, self.pairs, self.records) if x]
        if len(given) != 1 or bool(self.ids) != bool(self.values):
            raise ConfigError(
                "a layout names its targets once: --ids-column with --values-column, or "
                "--pairs-column, or --records-column; got "
                f"ids={self.ids!r} values={self.values!r} pairs={self.pairs!r} "
                f"records={self.records!r}"
            )
        if self.value_kind not in _KINDS:
            raise ConfigError(f"values must be one of {_KINDS}, got {self.value_kind!r}")
        if self.value_kind == "logit" and self.normalized:
            raise ConfigError("logit values are never normalised: set normalized=False")

    @property
    def tail_known(self) -> bool:
        return self.normalized

    def columns(self) -> list[str]:
        """Every column this layout reads (missing ones are refused by name)."""
        names = [self.input_ids, self.ids, self.values, self.pairs, self.records]
        names += [self.loss_mask, self.tail]
        return [n for n in names if n]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Layout:
        return cls(**dict(d))


LAYOUTS: dict[str, Layout] = {
    "plain": Layout(
        ids="target_token_ids",
        values="target_logprobs",
        loss_mask="target_mask",
        tail="tail_logprob",
        description="what `logitcache export --layout plain` writes: log-probs over the full "
        "vocabulary and the tail log-prob per position",
    ),
    "axolotl": Layout(
        ids="target_token_ids",
        values="target_logprobs",
        loss_mask="target_mask",
        description="Axolotl's KD columns (target_token_ids / target_logprobs / target_mask), "
        "log-probs from vLLM, normalised over the vocabulary",
    ),
    "vllm": Layout(
        records="logprobs",
        description="distilabel/vLLM `logprobs`: per position a list of {token, logprob}; "
        "rename the column with --records-column (Axolotl's `logprobs_field`)",
    ),
    "arcee": Layout(
        ids="token_ids",
        values="top_values",
        value_kind="logit",
        normalized=False,
        description="arcee-ai/LLama-405B-Logits (DistillKit): token_ids / top_values; the values "
        "are raw top-k logits, so the tail is unknown",
    ),
    "llamakd": Layout(
        pairs="targets",
        value_kind="logit",
        normalized=False,
        description="codys12/LlamaKD: `targets` [S, 2, 32] (ids, values) per row; the values are "
        "read as logits (tail unknown); pass --values-are logprob --normalized for log-probs",
    ),
    "rlve": Layout(
        ids="topk_ids",
        values="topk_logprobs",
        description="CL-From-Nothing/rlve_teacher_topk16_20K-style: top-16 ids and full-vocabulary "
        "log-probs per position (rename columns with --ids-column/--values-column)",
    ),
}
