"""Distil from a cache inside Hugging Face's ``Trainer`` or TRL's ``SFTTrainer``.

``KDTrainer(model=..., args=TrainingArguments(...), train_dataset=CacheRowDataset(url),
data_collator=CacheCollator(url), kd=KDArguments(loss="kl"))`` trains like any Trainer run: its
sampler, gradient accumulation, ``resume_from_checkpoint``, logging and Accelerate's
DDP/FSDP/DeepSpeed are untouched; only the loss and the step's normaliser are ours.
:class:`KDTrainerMixin` carries all of it, so ``class KDSFT(KDTrainerMixin, SFTTrainer)`` is the
TRL version (TRL takes only ``datasets`` datasets: pass ``CacheRowDataset(url).to_hf()`` and
``SFTConfig(dataset_kwargs={"skip_prepare_dataset": True})``; see docs/integrations.md).

**Normalisation is ``logitcache train``'s**: the loss of an optimizer step is the sum over every
target position of its micro-batches on every rank, divided once by their number.
``get_batch_samples`` counts the target positions of the step's micro-batches (one all-gather of a
scalar across processes, like the Trainer's own ``average_tokens_across_devices``), each
micro-batch returns ``sum * world_size / count`` (DDP, FSDP and DeepSpeed average gradients over
ranks; the factor undoes it), and ``loss_is_scaled_for_ga = True`` tells the Trainer not to divide
by the accumulation steps again. A micro-batch thus weighs by its positions, not 1/accum each,
exactly as in ``logitcache train``. Evaluation (no count given) uses the batch's own mean.

**The fused path** (``KDArguments(fused=True)``): a forward pre-hook on the model's output head
keeps the final hidden states and hands the head an empty slice, so the ``[B, S, V]`` logits are
never built; :func:`~logitcache.loss.fused_linear_kd_loss` then runs chunked over the target
positions with the head's weight. The call still goes through the wrapped model's ``forward``, so
DDP's gradient hooks see it. Refused under FSDP and DeepSpeed, where the head's weight is a shard
outside the forward (gather it inside a module forward: not done here).

**Vocabularies** as in ``logitcache train`` (``check_compatible``, the one implementation): a
student with more outputs (a padded head) trains directly; one with fewer (a truncated
vocabulary) too, the teacher's mass on the ids it lacks folded into the tail bucket on the
device, and a row holding an input token it lacks refused by the collator, naming row and
position; either logs one warning line.

**Refusals, before the first step** (each says what and how to fix): a collator that is not a
:class:`CacheCollator`; a student whose context is shorter than its rows, or whose tokens differ
from the teacher's; an incomplete cache (opening it raises
:class:`~logitcache.errors.CacheIncompleteError`); a loss for the other kind of targets; and a
tail-bucket loss (the registry's ``Objective.tail``) on a cache whose ``targets.tail`` is
``"unknown"`` (imported from raw logits: only ``kl-renorm`` is meaningful there).

``remove_unused_columns=True`` (the Trainer's default) cannot drop the targets: the torch dataset
yields bare row ids, which the column filter passes through, and the mixin adds ``row_id`` to the
signature columns for ``datasets`` datasets. Measured (``scripts/bench_integrations.py``, tiny
Llama, 30 steps, same rows/order/optimizer): final held-out KL / ``logitcache train``'s = 1.000.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer

from logitcache.data import make_loader, teacher_targets
from logitcache.errors import ConfigError
from logitcache.integrations.rows import (
    ROW_COLUMN,
    CacheCollator,
    CacheOrderSampler,
    CacheRowDataset,
)
from logitcache.loss import KDConfig, fused_linear_kd_loss, kd_loss
from logitcache.train.evaluate import evaluate
from logitcache.train.student import (
    Student,
    check_compatible,
    decoder_and_head,
    stored_teacher_tokenizer,
    target_logits,
)

__all__ = ["KDArguments", "KDTrainer", "KDTrainerMixin"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KDArguments:
    """The distillation settings; the names and defaults are ``logitcache train``'s.

    ``loss``: a name of ``logitcache.loss.OBJECTIVES``; ``temperature`` (T^2 scaling); ``alpha``:
    weight of the hard-label cross-entropy; ``beta``: JSD mixing; ``fused``: chunked fused-linear
    loss (no full logits); ``chunk_size``: its rows per chunk; ``order``: None keeps the Trainer's
    sampler, ``"random"``/``"streaming"``/``"sequential"`` use ``logitcache train``'s row order
    (:class:`CacheOrderSampler`, needs a :class:`CacheRowDataset`); ``allow_vocab_mismatch``: as
    ``--allow-vocab-mismatch``.
    """

    loss: str = "kl"
    temperature: float = 1.0
    alpha: float = 0.0
    beta: float = 0.5
    fused: bool = False
    chunk_size: int | None = None
    order: str | None = None
    allow_vocab_mismatch: bool = False

    def __post_init__(self) -> None:
        self.config  # noqa: B018 - validates loss, temperature, alpha, beta
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ConfigError(f"chunk_size must be >= 1 rows, got {self.chunk_size}")
        if self.order not in (None, "random", "streaming", "sequential"):
            raise ConfigError(
                f"order must be None (the Trainer's sampler) or one of 'random', 'streaming', "
                f"'sequential' (logitcache train's), got {self.order!r}"
            )

    @property
    def config(self) -> KDConfig:
        return KDConfig(self.loss, self.temperature, self.alpha, self.beta)


def _tokenizer(processing_class: Any) -> Any | None:
    tok = getattr(processing_class, "tokenizer", processing_class)
    return tok if hasattr(tok, "get_vocab") else None


class KDTrainerMixin:
    """Put before ``Trainer`` (or ``SFTTrainer``) in the bases; takes ``kd=KDArguments(...)``."""

    loss_is_scaled_for_ga = True  # the step's count already covers every micro-batch
    kd: KDArguments
    kd_collator: CacheCollator
    kd_vocab_limit: int | None = None

    # attributes of the Trainer this mixin is combined with
    model: nn.Module
    args: Any
    accelerator: Any
    data_collator: Any
    train_dataset: Any
    processing_class: Any
    is_fsdp_enabled: bool
    is_deepspeed_enabled: bool
    _signature_columns: list[str] | None

    def __init__(self, *args: Any, kd: KDArguments | None = None, **kwargs: Any) -> None:
        self.kd = kd if kd is not None else KDArguments()
        super().__init__(*args, **kwargs)
        self._check_kd_setup()

    def _check_kd_setup(self) -> None:
        collator = self.data_collator
        if not isinstance(collator, CacheCollator):
            raise ConfigError(
                f"{type(self).__name__} needs data_collator=CacheCollator(cache) (it reads the "
                f"targets of each batch's rows); got {type(collator).__name__}"
            )
        self.kd_collator = collator
        m = collator.manifest
        cfg = self.kd.config
        where = f"cache {collator.url}"
        if cfg.objective.targets != m.targets.method:
            raise ConfigError(
                f"loss={cfg.loss!r} needs {cfg.objective.targets} targets but {where} holds "
                f"{m.targets.method} targets; fix: use loss='sampled-ce' on sampled caches and a "
                "top-k loss (kl, kl-renorm, reverse-kl, jsd) on top-k caches"
            )
        if m.targets.tail == "unknown" and cfg.with_tail:
            raise ConfigError(
                f"loss={cfg.loss!r} compares the tail bucket (mass outside the stored ids), but "
                f"{where} does not know its tail (targets.tail is 'unknown': imported from values "
                "that did not keep it); fix: loss='kl-renorm', which ignores the tail"
            )
        student = Student(self.model, _tokenizer(self.processing_class), type(self.model).__name__)
        fit = check_compatible(
            student,
            m,
            allow_vocab_mismatch=self.kd.allow_vocab_mismatch,
            cache_name=where,
            teacher_tokenizer=stored_teacher_tokenizer(student, collator.dataset.reader),
            allow_truncated=True,
        )
        self.kd_vocab_limit = fit.limit  # a truncated student: teacher ids >= it join the tail
        if fit.limit is not None:
            collator.restrict_vocab(fit.limit)
        if fit.note:
            logger.warning("logitcache: %s", fit.note)
        if self.kd.fused:
            if self.is_fsdp_enabled or self.is_deepspeed_enabled:
                raise ConfigError(
                    "KDArguments(fused=True) is not supported under FSDP or DeepSpeed here (the "
                    "head's weight is sharded outside the forward); fix: fused=False"
                )
            decoder_and_head(self.model)  # refuses heads that are not a plain linear map
        if self.kd.order is not None and not isinstance(self.train_dataset, CacheRowDataset):
            raise ConfigError(
                f"KDArguments(order={self.kd.order!r}) needs train_dataset=CacheRowDataset(...), "
                f"got {type(self.train_dataset).__name__}; fix: order=None (the Trainer's sampler)"
            )

    # -- data ----------------------------------------------------------------------------------

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()  # type: ignore[misc]
        cols = self._signature_columns
        if cols is not None and ROW_COLUMN not in cols:
            self._signature_columns = [*cols, ROW_COLUMN]

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if self.kd.order is None or not isinstance(dataset, CacheRowDataset):
            return super()._get_train_sampler(train_dataset)  # type: ignore[misc]
        return CacheOrderSampler(
            dataset,
            self.args.per_device_train_batch_size,
            order=self.kd.order,
            seed=self.args.seed,
        )

    def get_batch_samples(
        self, epoch_iterator: Iterator[Any], num_batches: int, device: torch.device
    ) -> tuple[list[Any], Tensor]:
        """The step's micro-batches and their number of target positions over all processes."""
        batches: list[Any] = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        # numel is metadata: no device sync
        count = torch.tensor(float(sum(b["target_index"].numel() for b in batches)), device=device)
        if self.accelerator.num_processes > 1:
            count = self.accelerator.gather(count.reshape(1)).sum()
        return batches, count

    # -- loss ----------------------------------------------------------------------------------

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Any:
        """KD loss of one micro-batch: ``sum * world / step count`` in training, else the mean."""
        kd = self.kd
        teacher = self._teacher(inputs)
        labels = inputs["target_labels"] if kd.alpha > 0 else None
        kw: dict[str, Any] = dict(
            loss=kd.loss, temperature=kd.temperature, alpha=kd.alpha, beta=kd.beta
        )
        if kd.fused:
            hidden, outputs = _hidden_states(model, self.model, inputs["input_ids"])
            _, head = decoder_and_head(self.model)
            h = hidden.flatten(0, 1).index_select(0, inputs["target_index"])
            total, count = fused_linear_kd_loss(
                h, head.weight, teacher, labels, bias=head.bias, chunk_size=kd.chunk_size, **kw
            )
        else:
            outputs = model(input_ids=inputs["input_ids"], use_cache=False)
            z = outputs.logits.flatten(0, 1).index_select(0, inputs["target_index"])
            total, count = kd_loss(z, teacher, labels, **kw)
        if num_items_in_batch is None:
            loss = total / count.clamp(min=1).to(total.dtype)
        else:
            n = torch.as_tensor(num_items_in_batch, dtype=total.dtype, device=total.device)
            loss = total * self.accelerator.num_processes / n.clamp(min=1)
        return (loss, outputs) if return_outputs else loss

    def _teacher(self, batch: dict[str, Any]) -> Any:
        teacher = teacher_targets(batch)
        limit = self.kd_vocab_limit
        return teacher if limit is None else teacher.within_vocab(limit)

    # -- held-out metrics ------------------------------------------------------------------------

    def evaluate_cache(
        self,
        eval_fraction: float | None = None,
        *,
        eval_cache: str | None = None,
        batch_size: int | None = None,
        max_batches: int | None = None,
    ) -> dict[str, float]:
        """``logitcache train``'s held-out metrics (kl, ce, ppl, top1_agreement, ece) for the
        current model: on the rows ``eval_fraction`` holds out of the training cache, or on all
        rows of ``eval_cache``. Same loader, same function, so the numbers compare one to one."""
        if (eval_fraction is None) == (eval_cache is None):
            raise ConfigError("give exactly one of eval_fraction or eval_cache")
        url = eval_cache or self.kd_collator.url
        split = None if eval_fraction is None else ("eval", float(eval_fraction))
        model = self.accelerator.unwrap_model(self.model)
        device = next(model.parameters()).device
        loader = make_loader(
            url,
            batch_size or self.args.per_device_eval_batch_size,
            order="sequential",
            split=split,
            device=device,
            rank=self.accelerator.process_index,
            world_size=self.accelerator.num_processes,
            student_vocab=self.kd_vocab_limit,
        )
        was_training = model.training
        model.eval()
        try:
            logits = lambda b: target_logits(model, b).float()  # noqa: E731
            return evaluate(loader, logits, self._teacher, device, max_batches)
        finally:
            model.train(was_training)
            loader.close()


def _hidden_states(model: nn.Module, core: nn.Module, input_ids: Tensor) -> tuple[Tensor, Any]:
    """Final hidden states [B, S, H] from ``model``'s own forward; the head sees an empty slice."""
    head = core.get_output_embeddings()  # type: ignore[operator]
    kept: list[Tensor] = []

    def keep(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        kept.append(args[0])
        return (args[0][..., :0, :], *args[1:])

    handle = head.register_forward_pre_hook(keep)
    try:
        outputs = model(input_ids=input_ids, use_cache=False)
    finally:
        handle.remove()
    if len(kept) != 1:
        raise ConfigError(
            f"fused=True: the model called its output head {len(kept)} times in one forward "
            "(expected once); fix: fused=False"
        )
    return kept[0], outputs


class KDTrainer(KDTrainerMixin, Trainer):  # type: ignore[misc]  # attribute stubs above
    """``transformers.Trainer`` distilling from a cache: see the module docstring."""
