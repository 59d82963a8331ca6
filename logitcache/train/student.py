"""The student side of training: load a Hugging Face causal LM, check it fits the cache, and
produce what the losses consume (logits, or hidden states + head for the fused path) at exactly
the cached target positions.

Compatibility is checked before any step, because a student whose vocabulary does not line up
with the teacher's ids trains silently on garbage. Its context must hold the cache's rows, and
its ids must mean the teacher's tokens: when the student's and the teacher's tokenizers are both
at hand, the token strings of every id they share are compared (the first difference is named);
with only the cache's tokenizer fingerprint, the fingerprints must agree
(``allow_vocab_mismatch`` accepts a different tokenizer whose ids are a prefix-compatible subset,
e.g. the same base vocabulary with other added tokens). Tokens that differ are refused with the
suggestion to run ``logitcache align``.

Sizes may differ (:class:`VocabFit`, whose ``note`` the trainer logs):

- **padded** (the student's head is larger than the cache's real vocabulary: 49,152 -> 49,280,
  or a 151,936-token tokenizer in a 152,064-row head): trained directly. The extra columns are
  part of the student's softmax normaliser, so their mass is student mass outside the teacher's
  ids: in the tail bucket of the tail-bucket losses, never dropped (``tests/train/
  test_padded_vocab.py`` checks the loss against a dense reference);
- **truncated** (smaller, the same tokens for the ids it has): trained directly. The teacher's
  mass on ids the student lacks joins the tail bucket (:meth:`~logitcache.loss.TopKTeacher.
  within_vocab`), on the device after the targets are dequantised: a few [N, k] element-wise
  operations per step, no host synchronisation. That is the cheapest correct place: the collate
  ships the ids undecoded (the device decodes them), so folding there would bring back the
  host-side decode it avoids, and the loss itself would pay it for every student, truncated or
  not. An input token the student lacks (hence a hard label it cannot learn) is refused when the
  shard holding it is loaded, naming the row and position (``data.collate``).
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from logitcache.errors import ConfigError
from logitcache.format.fingerprint import tokenizer_fingerprint
from logitcache.format.manifest import Manifest

if TYPE_CHECKING:
    from logitcache.train.evaluate import StudentOutput

__all__ = [
    "CROSS_VOCAB_LOSSES",
    "Student",
    "VocabFit",
    "check_compatible",
    "first_token_difference",
    "load_student",
    "student_output",
]


@dataclass
class Student:
    model: nn.Module
    tokenizer: Any | None
    source: str

    @property
    def vocab_size(self) -> int:
        head = self.model.get_output_embeddings()  # type: ignore[operator]
        return int(head.weight.shape[0])


def load_student(path: str | None, config: str | None, seed: int) -> Student:
    """A student from a local HF directory (fine-tune) or a ``config.json`` (fresh init)."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:  # pragma: no cover - the hf extra is part of every install path
        raise ConfigError("training needs transformers: pip install 'logitcache[hf]'") from e
    if (path is None) == (config is None):
        raise ConfigError("give exactly one of --student DIR (fine-tune) or --student-config JSON")
    if path is not None:
        p = Path(path)
        if not (p / "config.json").is_file():
            raise ConfigError(
                f"--student {path}: not a Hugging Face model directory (no config.json); pass a "
                "directory saved with save_pretrained, or --student-config for a fresh model"
            )
        try:
            model = AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32)
        except pickle.UnpicklingError as e:
            from logitcache.train.checkpoint import pickle_refused

            pickles = sorted(f.name for f in p.iterdir() if f.suffix in (".bin", ".pt", ".pth"))
            raise pickle_refused(
                f"--student {path} ({', '.join(pickles) or 'a weights file'})", e
            ) from None
        tokenizer = None
        if any((p / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
            tokenizer = AutoTokenizer.from_pretrained(p)
        return Student(model, tokenizer, str(p))
    cpath = Path(str(config))
    try:
        cfg_dict = json.loads(cpath.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--student-config {config}: cannot read JSON ({e})") from e
    if "model_type" not in cfg_dict:
        raise ConfigError(
            f"--student-config {config}: no 'model_type' (e.g. \"llama\"); it must be a "
            "Hugging Face model config"
        )
    cfg = AutoConfig.for_model(**cfg_dict)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return Student(model, None, str(cpath))


#: Losses that compare distributions without matching ids (ULD-style: sorted probabilities), so
#: a student of another vocabulary needs no `align`; :func:`check_compatible` skips the id checks
#: for them. The hook for ``--loss uld`` (issue 18): add the loss's name here.
CROSS_VOCAB_LOSSES: frozenset[str] = frozenset({"uld"})


@dataclass(frozen=True)
class VocabFit:
    """How a student's output ids line up with a cache's teacher ids (:func:`check_compatible`).

    ``student``: the student's output size; ``teacher``: the cache's real vocabulary; ``how``:
    ``same``, ``padded`` (more outputs), ``truncated`` (fewer) or ``cross-vocab`` (a loss of
    :data:`CROSS_VOCAB_LOSSES`: ids are not compared).
    """

    student: int
    teacher: int
    how: str

    def __post_init__(self) -> None:
        if self.how not in ("same", "padded", "truncated", "cross-vocab"):
            raise ConfigError(
                f"VocabFit.how must be same/padded/truncated/cross-vocab, got {self.how!r}"
            )

    @property
    def limit(self) -> int | None:
        """The student's size when teacher ids at or beyond it must join the tail, else None."""
        return self.student if self.how == "truncated" else None

    @property
    def note(self) -> str | None:
        """The line the trainer logs (None when the sizes are equal)."""
        s, t = self.student, self.teacher
        if self.how == "padded":
            return (
                f"student vocab {s:,} = teacher {t:,} + {s - t:,} padding: trained directly "
                "(the padding columns are in the student's softmax: their mass counts as "
                "student mass outside the teacher's ids)"
            )
        if self.how == "truncated":
            return (
                f"student vocab {s:,} = teacher {t:,} - {t - s:,} ids ({s:,}..{t - 1:,}): "
                "trained directly; the teacher's mass on those ids goes to the tail bucket, "
                "and an input token among them is refused, naming its row and position"
            )
        if self.how == "cross-vocab":
            return f"student vocab {s:,}, teacher {t:,}: ids not compared (a cross-vocabulary loss)"
        return None


def check_compatible(
    student: Student,
    manifest: Manifest,
    *,
    allow_vocab_mismatch: bool = False,
    cache_name: str = "the cache",
    teacher_tokenizer: Any | None = None,
    allow_truncated: bool = False,
    loss: str | None = None,
) -> VocabFit:
    """Refuse a student that cannot be trained on ``manifest``'s targets, naming both sides;
    return how its vocabulary fits the teacher's (see the module docstring).

    ``teacher_tokenizer``: the teacher's tokenizer, when at hand: the token strings of the ids
    both share are compared. ``allow_truncated``: the caller folds teacher ids the student lacks
    into the tail (``VocabFit.limit``; the trainer does); otherwise a smaller student is refused.
    ``loss``: a loss of :data:`CROSS_VOCAB_LOSSES` skips the id checks.
    """
    v_student, v_teacher = student.vocab_size, manifest.vocab_size
    cfg = getattr(student.model, "config", None)
    ctx = getattr(cfg, "max_position_embeddings", None)
    if isinstance(ctx, int) and ctx < manifest.seq_len:
        raise ConfigError(
            f"{cache_name} has rows of seq_len {manifest.seq_len} but the student "
            f"{student.source} has a context of {ctx} (max_position_embeddings); use a student "
            "with a longer context or dump with a shorter --seq-len"
        )
    if loss in CROSS_VOCAB_LOSSES:
        return VocabFit(v_student, v_teacher, "cross-vocab")
    if not allow_vocab_mismatch:
        _check_tokens(student, manifest, teacher_tokenizer, cache_name)
    if v_student < v_teacher and not allow_truncated:
        raise ConfigError(
            f"{cache_name} was dumped with vocab {v_teacher} (padded "
            f"{manifest.padded_vocab_size}) but the student {student.source} has {v_student} "
            "outputs: teacher ids beyond the student's head cannot be learned; use a student "
            "with an output size >= the cache's vocab, or `logitcache train`, which folds the "
            "missing ids' mass into the tail bucket"
        )
    how = "same" if v_student == v_teacher else "padded" if v_student > v_teacher else "truncated"
    return VocabFit(v_student, v_teacher, how)


def stored_teacher_tokenizer(student: Student, reader: Any) -> Any | None:
    """The teacher tokenizer a cache stores (format 1.3), loaded only when it is needed: the
    student has a tokenizer whose fingerprint is not the cache's (padded or truncated
    tokenizers, or other tokens), so the token strings must be compared; else None."""
    m = reader.manifest
    want = m.tokenizer.fingerprint
    if student.tokenizer is None or not m.tokenizer.files:
        return None
    if want and tokenizer_fingerprint(student.tokenizer) == want:
        return None
    from logitcache.store.tokenizer import cache_tokenizer

    return cache_tokenizer(reader)


_ALIGN_HINT = (
    "re-express the cache in the student's vocabulary with `logitcache align CACHE "
    "--teacher-tokenizer TEACHER --student-tokenizer STUDENT --out ALIGNED` and train on ALIGNED"
)


def _check_tokens(
    student: Student, manifest: Manifest, teacher_tokenizer: Any | None, cache_name: str
) -> None:
    """Same tokens for the ids both sides have: token strings when both tokenizers are at hand,
    else the cache's tokenizer fingerprint."""
    if student.tokenizer is None:
        return  # a fresh student (--student-config): its ids are whatever the cache says
    if teacher_tokenizer is not None:
        differ = first_token_difference(teacher_tokenizer, student.tokenizer)
        if differ is not None:
            raise ConfigError(
                f"the student {student.source} has other tokens than {cache_name}'s teacher "
                f"({differ}); {_ALIGN_HINT}"
            )
        return
    want = manifest.tokenizer.fingerprint
    if want and tokenizer_fingerprint(student.tokenizer) != want:
        raise ConfigError(
            f"tokenizer mismatch: {cache_name} was dumped with tokenizer "
            f"{manifest.tokenizer.name or '?'} (fingerprint {want[:12]}) but the student "
            f"{student.source} has fingerprint "
            f"{tokenizer_fingerprint(student.tokenizer)[:12]}; {_ALIGN_HINT}; or train a "
            "student with the teacher's tokenizer, or pass --allow-vocab-mismatch if its ids "
            "are the teacher's (padded, truncated or with other added tokens)"
        )


def first_token_difference(teacher: Any, student: Any) -> str | None:
    """The first id below both sizes whose token string differs, described; None if none."""
    t_tokens, s_tokens = _id_to_token(teacher), _id_to_token(student)
    for i in range(min(len(t_tokens), len(s_tokens))):
        if t_tokens[i] != s_tokens[i]:
            return f"id {i} is {t_tokens[i]!r} for the teacher, {s_tokens[i]!r} for the student"
    return None


def _id_to_token(tok: Any) -> list[str | None]:
    vocab = tok.get_vocab()  # token -> id, added tokens included
    out: list[str | None] = [None] * (max(vocab.values(), default=-1) + 1)
    for token, i in vocab.items():
        out[i] = token
    return out


def check_loss_fits(manifest: Manifest, loss: str, alpha: float, cache_name: str) -> None:
    """Refuse a tail-bucket loss on a cache whose tail mass is unknown (imported from logits or
    renormalised values: ``targets.tail == "unknown"``), naming the loss that works."""
    from logitcache.loss.objectives import OBJECTIVES

    objective = OBJECTIVES.get(loss)
    needs_tail = objective is not None and objective.tail and alpha < 1
    if manifest.targets.tail == "unknown" and needs_tail:
        raise ConfigError(
            f"--loss {loss} needs the teacher's tail mass, but {cache_name} does not know it "
            "(its targets were imported from logits or renormalised values: targets.tail is "
            "'unknown'); use --loss kl-renorm, which compares the distributions renormalised "
            "over the stored ids"
        )


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """The part of a causal LM that yields final hidden states, and its output projection.

    Refuses models whose logits are not a plain linear map of the hidden states (soft-capping,
    logit scaling), because the fused loss would then train the wrong function.
    """
    cfg = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        v = getattr(cfg, attr, None)
        if v not in (None, 1, 1.0, 0):
            raise ConfigError(
                f"--fused needs logits = hidden @ W.T (+ b), but the student sets {attr}={v}; "
                "train without --fused"
            )
    head = model.get_output_embeddings()  # type: ignore[operator]
    base = getattr(model, "model", None) or getattr(model, "base_model", None)
    if not isinstance(head, nn.Linear) or base is None or base is model:
        raise ConfigError("--fused: cannot split this student into a decoder and an lm_head")
    return base, head


def target_logits(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    """Student logits [N, V] at the batch's target positions (``target_index``)."""
    out = model(input_ids=batch["input_ids"])
    logits = out.logits
    return logits.flatten(0, 1).index_select(0, batch["target_index"])


def student_output(model: nn.Module, batch: dict[str, Any]) -> StudentOutput:
    """Hidden states at the batch's target positions and the head (for chunked evaluation), or
    full logits when the student's logits are not a plain linear map of its hidden states."""
    from logitcache.train.evaluate import StudentOutput

    try:
        base, head = decoder_and_head(model)
    except ConfigError:
        return StudentOutput(logits=target_logits(model, batch))
    hidden = base(input_ids=batch["input_ids"]).last_hidden_state
    hidden = hidden.flatten(0, 1).index_select(0, batch["target_index"])
    return StudentOutput(hidden=hidden, weight=head.weight, bias=head.bias)


#: ~1e-3 nats/position: what sqrt-quantised values cost any loss (docs/codecs.md, measured on real
#: distributions for kl, reverse-kl, jsd and kl-renorm alike); 1% of a loss below 0.1 nats.
SQRT_VALUE_ERROR_NATS = 1e-3


def quantisation_note(manifest: Manifest, final_loss: float | None) -> str | None:
    """A warning when the cache's sqrt-quantised values are a visible part of the loss: their
    ~1e-3 nats/position error exceeds 1% of a loss below ~0.1 nats/position."""
    values = getattr(manifest.codec, "values", None)
    if values != "sqrt" or final_loss is None or not final_loss < 100 * SQRT_VALUE_ERROR_NATS:
        return None
    return (
        f"the final loss {final_loss:.4f} nats/position is within 100x of the error of the "
        f"cache's sqrt-quantised values (~{SQRT_VALUE_ERROR_NATS:g} nats/position), so they "
        "limit what the student can still learn; dump with --values float16 for a student this "
        "close to its teacher (docs/codecs.md)"
    )
