"""The student side of training: load a Hugging Face causal LM, check it fits the cache, and
produce what the losses consume (logits, or hidden states + head for the fused path) at exactly
the cached target positions.

Compatibility is checked before any step, because a student whose vocabulary does not line up
with the teacher's ids trains silently on garbage: the student's output dimension must cover the
cache's real vocabulary, its context must hold the cache's rows, and when both sides carry a
tokenizer fingerprint they must agree (``allow_vocab_mismatch`` accepts a different tokenizer
whose ids are a prefix-compatible subset, e.g. the same base vocabulary with other added tokens).
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

__all__ = ["Student", "check_compatible", "load_student", "student_output"]


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


def check_compatible(
    student: Student,
    manifest: Manifest,
    *,
    allow_vocab_mismatch: bool = False,
    cache_name: str = "the cache",
) -> None:
    """Refuse a student that cannot be trained on ``manifest``'s targets, naming both sides."""
    v_student = student.vocab_size
    if v_student < manifest.vocab_size:
        raise ConfigError(
            f"{cache_name} was dumped with vocab {manifest.vocab_size} (padded "
            f"{manifest.padded_vocab_size}) but the student {student.source} has {v_student} "
            "outputs: teacher ids beyond the student's head cannot be learned; use a student "
            "with the teacher's tokenizer and an output size >= the cache's vocab"
        )
    cfg = getattr(student.model, "config", None)
    ctx = getattr(cfg, "max_position_embeddings", None)
    if isinstance(ctx, int) and ctx < manifest.seq_len:
        raise ConfigError(
            f"{cache_name} has rows of seq_len {manifest.seq_len} but the student "
            f"{student.source} has a context of {ctx} (max_position_embeddings); use a student "
            "with a longer context or dump with a shorter --seq-len"
        )
    want = manifest.tokenizer.fingerprint
    if student.tokenizer is not None and want:
        got = tokenizer_fingerprint(student.tokenizer)
        if got != want and not allow_vocab_mismatch:
            raise ConfigError(
                f"tokenizer mismatch: {cache_name} was dumped with tokenizer "
                f"{manifest.tokenizer.name or '?'} (fingerprint {want[:12]}) but the student "
                f"{student.source} has fingerprint {got[:12]}; re-express the cache in the "
                "student's vocabulary with `logitcache align`, train a student with the "
                "teacher's tokenizer, or pass --allow-vocab-mismatch if its ids are a "
                "prefix-compatible subset of the teacher's"
            )


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
