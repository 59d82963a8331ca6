"""Load a teacher and turn its forward pass into sparse targets, on the device.

Teachers: a local Hugging Face directory (``AutoModelForCausalLM``; with ``teacher_file="X.gguf"``
the GGUF file in it, through transformers' GGUF loader), or ``"module.path:factory"``, a callable
returning ``(model, tokenizer_or_None)``. :class:`TeacherIdentity` (name, revision when known,
sha256 of the weight files, or of the state_dict tensors for a factory) goes into the manifest.

**Padded vocabulary.** Models often pad their output layer (152064 rows for a 151936-token
tokenizer). The real vocabulary is ``len(tokenizer)`` (or ``real_vocab_size``); the padded rows are
sliced off the output projection before the matmul, so padded ids are never candidates *and* are
not in the normaliser: log-probs are normalised over the real vocabulary, the distribution the
teacher actually defines over tokens that exist (padded logits are arbitrary, often not -inf).

**Chunked head.** At vocab 128k-262k the full [batch, seq, vocab] logits are the dump's memory
ceiling. So we run the base model to get final hidden states, keep only positions with
``loss_mask = 1`` (row-major), and apply the output projection (``get_output_embeddings()``, tied
or not, with its bias, then the config's ``logit_scale`` / ``logits_scaling`` /
``final_logit_softcapping``) to ``chunk_tokens`` positions at a time, sparsifying each chunk before
the next. Extra device memory per chunk is about ``chunk_tokens x vocab x 14`` bytes (the
model-dtype matmul output, float32 log-probs, one float32 temporary); ``chunk_tokens`` defaults to
what fits ``chunk_bytes`` (1 GiB). At load time a probe compares this path with the model's own
forward; a teacher whose head cannot be split off (or whose logits differ, i.e. an unknown
post-processing) falls back to full logits with a warning.

Non-finite logits raise :class:`NonFiniteLogitsError` naming the rows, before anything reaches the
host. Results are the numpy containers of :mod:`logitcache.format.targets`.
"""

from __future__ import annotations

import importlib
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch

from logitcache._sparsify import ChunkResult, sparsify_chunk
from logitcache._teacher_load import (
    SplitHead,
    forward_logits,
    hash_files,
    hash_state_dict,
    resolve_device,
    resolve_dtype,
    split_head,
)
from logitcache.errors import ConfigError, NonFiniteLogitsError, TeacherError
from logitcache.format.targets import SampledTargets, TopKTargets

__all__ = [
    "CoverageStats",
    "SparseBatch",
    "SparsifyConfig",
    "Teacher",
    "TeacherIdentity",
    "load_teacher",
    "sparsify_batch",
    "teacher_from_model",
]

_WEIGHT_EXTS = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_BYTES_PER_LOGIT = 14


@dataclass(frozen=True)
class TeacherIdentity:
    """Who the teacher is, for the manifest and for refusing a resume with another teacher."""

    name: str
    revision: str | None
    weights_sha256: str | None
    source: Literal["hf", "gguf", "factory", "model"]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(eq=False)
class Teacher:
    """A loaded teacher: model on ``device``, optional tokenizer, vocab sizes, and its head."""

    model: torch.nn.Module
    tokenizer: Any | None
    identity: TeacherIdentity
    padded_vocab_size: int
    real_vocab_size: int
    device: torch.device
    max_seq_len: int | None
    head: SplitHead | None  # None: full-logits fallback


@dataclass(frozen=True)
class SparsifyConfig:
    """What to keep per position: top-k (``k``) or ``num_samples`` draws (``seed``)."""

    method: Literal["topk", "sample"] = "topk"
    k: int = 64
    num_samples: int = 64
    seed: int = 0
    temperatures: tuple[float, ...] = ()
    sample_logprobs: bool = True
    chunk_tokens: int | None = None
    chunk_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        if self.method not in ("topk", "sample"):
            raise ConfigError(f"method must be 'topk' or 'sample', got {self.method!r}")
        if self.k < 1 or self.num_samples < 1:
            raise ConfigError(f"k and num_samples must be >= 1, got {self.k}, {self.num_samples}")
        if any(not (t > 0 and np.isfinite(t)) for t in self.temperatures):
            raise ConfigError(f"temperatures must be finite and > 0, got {self.temperatures}")
        if self.chunk_tokens is not None and self.chunk_tokens < 1:
            raise ConfigError(f"chunk_tokens must be >= 1, got {self.chunk_tokens}")


@dataclass(frozen=True, eq=False)
class CoverageStats:
    """Per position: captured_mass [P] float32 (mass of the stored ids), entropy [P] (nats)."""

    captured_mass: np.ndarray
    entropy: np.ndarray


@dataclass(frozen=True, eq=False)
class SparseBatch:
    """Targets of one batch: positions of row i are the i-th run of ``positions_per_row[i]``."""

    row_ids: np.ndarray
    positions_per_row: np.ndarray
    targets: TopKTargets | SampledTargets
    stats: CoverageStats


def load_teacher(
    spec: str,
    *,
    teacher_file: str | None = None,
    tokenizer: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    real_vocab_size: int | None = None,
    hash_weights: bool = True,
) -> Teacher:
    """Load a teacher from a HF directory (optionally its GGUF ``teacher_file``) or a factory.

    ``dtype``: auto (bf16 on cuda, fp32 on cpu) | bf16 | fp16 | fp32. ``device``: auto (cuda,
    ``cuda:$LOCAL_RANK`` under torchrun, else cpu) or a torch device string. ``tokenizer``
    overrides where the tokenizer is loaded from.
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if os.path.isdir(spec):
        return _load_hf(spec, teacher_file, tokenizer, dt, dev, real_vocab_size, hash_weights)
    if _FACTORY.match(spec):
        model, tok = _call_factory(spec)
        if tokenizer is not None:
            tok = _load_tokenizer(tokenizer, None)
        if dtype != "auto":
            model = model.to(dtype=dt)
        digest = hash_state_dict(model) if hash_weights else None
        ident = TeacherIdentity(spec, None, digest, "factory")
        return teacher_from_model(model, tok, ident, device=dev, real_vocab_size=real_vocab_size)
    raise TeacherError(
        f"teacher {spec!r} is neither a directory nor a 'module.path:factory' spec; give a local "
        "Hugging Face model directory or a factory returning (model, tokenizer)"
    )


def _load_hf(
    path: str,
    teacher_file: str | None,
    tokenizer: str | None,
    dt: torch.dtype,
    dev: torch.device,
    real_vocab_size: int | None,
    hash_weights: bool,
) -> Teacher:
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dt}
    files = sorted(f for f in os.listdir(path) if f.endswith(_WEIGHT_EXTS))
    if teacher_file is not None:
        if not os.path.isfile(os.path.join(path, teacher_file)):
            raise TeacherError(f"teacher file {teacher_file!r} not found in {path}; found {files}")
        kwargs["gguf_file"] = teacher_file
        files = [teacher_file]
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, ImportError) as e:
        raise TeacherError(f"cannot load the teacher from {path}: {e}") from e
    tok = _load_tokenizer(tokenizer or path, None if tokenizer else teacher_file)
    real = os.path.realpath(path)
    snap = re.search(r"models--([^/]+)--([^/]+)/snapshots/([0-9a-f]{40})", real)
    name = f"{snap.group(1)}/{snap.group(2)}" if snap else os.path.basename(real)
    revision = snap.group(3) if snap else getattr(model.config, "_commit_hash", None)
    digest = hash_files([os.path.join(path, f) for f in files]) if hash_weights else None
    ident = TeacherIdentity(name, revision, digest, "gguf" if teacher_file else "hf")
    return teacher_from_model(model, tok, ident, device=dev, real_vocab_size=real_vocab_size)


def _load_tokenizer(path: str, gguf_file: str | None) -> Any | None:
    from transformers import AutoTokenizer

    try:
        if gguf_file:
            return AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        warnings.warn(
            f"no tokenizer loaded from {path} ({e}); only token-id inputs will work", stacklevel=3
        )
        return None


def _call_factory(spec: str) -> tuple[torch.nn.Module, Any | None]:
    module_name, attr = spec.split(":", 1)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise TeacherError(
            f"cannot import {module_name!r} for teacher factory {spec!r}: {e}"
        ) from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise TeacherError(f"{module_name!r} has no attribute {attr!r} (teacher {spec!r})")
        obj = getattr(obj, part)
    result = obj()
    if not (isinstance(result, tuple) and len(result) == 2):
        raise TeacherError(f"teacher factory {spec!r} must return (model, tokenizer_or_None)")
    if not isinstance(result[0], torch.nn.Module):
        raise TeacherError(
            f"teacher factory {spec!r} returned {type(result[0]).__name__}, not a torch.nn.Module"
        )
    return result[0], result[1]


def teacher_from_model(
    model: torch.nn.Module,
    tokenizer: Any | None,
    identity: TeacherIdentity | None = None,
    *,
    device: torch.device | str | None = None,
    real_vocab_size: int | None = None,
) -> Teacher:
    """Wrap an in-memory model (moved to ``device``), probe its head, settle the vocab sizes."""
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.to(dev).eval()
    if identity is None:
        identity = TeacherIdentity(type(model).__name__, None, hash_state_dict(model), "model")
    config = getattr(model, "config", None)
    max_len = getattr(config, "max_position_embeddings", None)
    probe = torch.arange(min(8, max_len or 8), device=dev, dtype=torch.long)[None, :]
    with torch.no_grad():
        reference = forward_logits(model, probe, None)
    padded = int(reference.shape[-1])
    real = real_vocab_size or (len(tokenizer) if tokenizer is not None else padded)
    if real > padded:
        if real_vocab_size is not None:
            raise ConfigError(f"real_vocab_size {real} exceeds the model's output size {padded}")
        warnings.warn(
            f"the tokenizer has {real} tokens but the model outputs {padded} logits; "
            f"ids >= {padded} can never be predicted, using {padded}",
            stacklevel=2,
        )
        real = padded
    head = split_head(model, real, probe, reference)
    return Teacher(model, tokenizer, identity, padded, real, dev, max_len, head)


def sparsify_batch(
    teacher: Teacher,
    input_ids: np.ndarray | torch.Tensor,
    loss_mask: np.ndarray | torch.Tensor,
    row_ids: np.ndarray | torch.Tensor,
    config: SparsifyConfig,
) -> SparseBatch:
    """Run the teacher on [B, S] right-padded rows; sparse targets at ``loss_mask`` positions."""
    dev = teacher.device
    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long).to(dev)
    mask = torch.as_tensor(np.asarray(loss_mask), dtype=torch.bool).to(dev)
    rows = torch.as_tensor(np.asarray(row_ids), dtype=torch.long)
    if ids.ndim != 2 or mask.shape != ids.shape or rows.shape != (ids.shape[0],):
        raise ConfigError(
            f"expected input_ids/loss_mask [B, S] and row_ids [B], got "
            f"{tuple(ids.shape)}, {tuple(mask.shape)}, {tuple(rows.shape)}"
        )
    if teacher.max_seq_len is not None and ids.shape[1] > teacher.max_seq_len:
        raise ConfigError(
            f"seq_len {ids.shape[1]} exceeds the teacher's context {teacher.max_seq_len}"
        )
    b_idx, t_idx = mask.nonzero(as_tuple=True)
    pos_rows = rows.to(dev)[b_idx]
    with torch.no_grad():
        n = int(b_idx.shape[0])
        step = config.chunk_tokens or max(
            1, config.chunk_bytes // (teacher.real_vocab_size * _BYTES_PER_LOGIT)
        )
        chunk_logits = _logit_source(teacher, ids, b_idx, t_idx, min(step, n))
        work = torch.empty((min(step, n), teacher.real_vocab_size), device=dev)
        parts = [
            sparsify_chunk(
                chunk_logits(lo, min(lo + step, n)),
                method=config.method,
                k=config.k,
                num_samples=config.num_samples,
                seed=config.seed,
                temperatures=config.temperatures,
                row_ids=pos_rows[lo : lo + step],
                positions=t_idx[lo : lo + step],
                work=work,
            )
            for lo in range(0, n, step)
        ]
    finite = torch.cat([p.finite for p in parts]) if parts else torch.ones(0, dtype=torch.bool)
    if not bool(finite.all()):
        bad = sorted({int(r) for r in pos_rows[~finite.to(dev)].cpu().tolist()})
        raise NonFiniteLogitsError(
            f"the teacher produced NaN/inf logits in row(s) {bad[:10]}"
            f"{' ...' if len(bad) > 10 else ''}; nothing was written for this batch. Try "
            "dtype fp32, or check the teacher's weights"
        )
    per_row = mask.sum(dim=1).to(torch.int32).cpu().numpy()
    return SparseBatch(rows.numpy(), per_row, _to_targets(parts, config), _to_stats(parts))


def _logit_source(
    teacher: Teacher, ids: torch.Tensor, b_idx: torch.Tensor, t_idx: torch.Tensor, chunk: int
) -> Callable[[int, int], torch.Tensor]:
    """A function (lo, hi) -> float32 logits [hi - lo, real_vocab] of the selected positions
    (at most ``chunk`` at a time; the result is only valid until the next call)."""
    attention = torch.ones_like(ids)
    if teacher.head is not None:
        head = teacher.head
        hidden = head.hidden_states(ids, attention)[b_idx, t_idx]
        buf = torch.empty((chunk, teacher.real_vocab_size), device=ids.device)
        return lambda lo, hi: head.logits(hidden[lo:hi], out=buf[: hi - lo])
    full = forward_logits(teacher.model, ids, attention)[b_idx, t_idx]
    real = teacher.real_vocab_size
    return lambda lo, hi: full[lo:hi, :real].float()


def _cat(parts: list[ChunkResult], field: str, dtype: np.dtype) -> np.ndarray:
    values = [getattr(p, field) for p in parts]
    if not values:
        return np.zeros(0, dtype=dtype)
    return torch.cat(values).cpu().numpy().astype(dtype, copy=False)


def _to_targets(parts: list[ChunkResult], config: SparsifyConfig) -> TopKTargets | SampledTargets:
    n_t = len(config.temperatures)
    tln = (
        torch.cat([p.temperature_lognorm for p in parts]).cpu().numpy()
        if parts
        else np.zeros((0, n_t), dtype=np.float32)
    )
    if config.method == "topk":
        k = config.k
        ids = _cat(parts, "ids", np.dtype(np.int32)).reshape(-1, k)
        lps = _cat(parts, "logprobs", np.dtype(np.float32)).reshape(-1, k)
        tail = _cat(parts, "tail_logprob", np.dtype(np.float32))
        return TopKTargets(ids, lps, tail, tln.astype(np.float32, copy=False))
    return SampledTargets(
        num_unique=_cat(parts, "num_unique", np.dtype(np.int32)),
        ids=_cat(parts, "ids", np.dtype(np.int32)),
        counts=_cat(parts, "counts", np.dtype(np.int32)),
        logprobs=_cat(parts, "logprobs", np.dtype(np.float32)) if config.sample_logprobs else None,
        temperature_lognorm=tln.astype(np.float32, copy=False),
    )


def _to_stats(parts: list[ChunkResult]) -> CoverageStats:
    return CoverageStats(
        captured_mass=_cat(parts, "captured_mass", np.dtype(np.float32)),
        entropy=_cat(parts, "entropy", np.dtype(np.float32)),
    )
