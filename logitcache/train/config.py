"""The training configuration: every setting of a run, once.

:class:`TrainConfig` is what ``run_train`` takes, what a ``--config`` file holds (same names,
dashes or underscores) and what the ``logitcache train`` flags project (``cli/_common.py``):
each field's default, its help line (``metadata["help"]``) and its choices
(``metadata["choices"]``: the loss registry, the sampler's orders) are written here only.
``problems()`` lists every invalid setting at once, each with its fix.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from logitcache.data.sampler import ORDERS
from logitcache.errors import ConfigError
from logitcache.loss import LOSS_NAMES, OBJECTIVES, KDConfig

__all__ = ["TrainConfig"]

_LOSS_HELP = "KD loss: " + "; ".join(f"{o.name}: {o.help}" for o in OBJECTIVES.values()) + "."


def _help(text: str, **more: Any) -> dict[str, Any]:
    return {"help": text, **more}


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; the CLI flags and the config file map onto these."""

    cache: str = field(metadata=_help("Cache directory or URL to train from."))
    out: str = field(metadata=_help("Output directory: checkpoints, metrics.jsonl, final/ model."))
    student: str | None = field(
        default=None, metadata=_help("Hugging Face model directory to fine-tune.")
    )
    student_config: str | None = field(
        default=None, metadata=_help("Hugging Face config.json for a freshly initialised student.")
    )
    loss: str = field(default="kl", metadata=_help(_LOSS_HELP, choices=LOSS_NAMES))
    student_tokenizer: str | None = field(
        default=None,
        metadata=_help(
            "Student tokenizer directory (default: the --student directory's). With --loss uld "
            "a cache of another tokenizer trains directly: rows are re-tokenised on the fly."
        ),
    )
    teacher_tokenizer: str | None = field(
        default=None,
        metadata=_help(
            "The cache's tokenizer directory, for --loss uld on a cache that does not store "
            "its own (format < 1.3)."
        ),
    )
    student_seq_len: int | None = field(
        default=None,
        metadata=_help(
            "With --loss uld on another tokenizer: the student's row length "
            "(default: the cache's seq_len; longer text is cut)."
        ),
    )
    temperature: float = field(
        default=1.0, metadata=_help("Distillation temperature; exact when the cache recorded it.")
    )
    alpha: float = field(
        default=0.0, metadata=_help("Weight of the hard-label cross-entropy, 0..1.")
    )
    beta: float = field(default=0.5, metadata=_help("JSD mixing weight."))
    fused: bool = field(
        default=False,
        metadata=_help("Chunked fused-linear loss: never materialises [N, V] student logits."),
    )
    top_k: int | None = field(
        default=None,
        metadata=_help("Use only the top-k of the stored targets (the rest joins the tail)."),
    )
    batch_size: int = field(default=8, metadata=_help("Rows per rank per micro-batch."))
    grad_accum: int = field(default=1, metadata=_help("Micro-batches per optimizer step."))
    max_steps: int = field(default=100, metadata=_help("Optimizer steps."))
    stop_after: int | None = field(
        default=None,
        metadata=_help(
            "Stop at this step with a checkpoint (time-limited jobs); --resume continues."
        ),
    )
    lr: float = field(default=5e-4, metadata=_help("Peak learning rate of AdamW."))
    weight_decay: float = field(default=0.01, metadata=_help("AdamW weight decay."))
    warmup_steps: int = field(
        default=0, metadata=_help("Linear warmup steps before the cosine decay.")
    )
    min_lr_ratio: float = field(
        default=0.1, metadata=_help("Final learning rate as a fraction of the peak.")
    )
    clip: float = field(default=1.0, metadata=_help("Gradient norm clipping, 0 to disable."))
    seed: int = field(default=0, metadata=_help("Seed of the student init and the data order."))
    eval_every: int = field(
        default=0, metadata=_help("Evaluate every N steps (0: at the end only).")
    )
    eval_fraction: float = field(
        default=0.0, metadata=_help("Hold out this fraction of the cache's rows for evaluation.")
    )
    eval_cache: str | None = field(default=None, metadata=_help("A second cache to evaluate on."))
    eval_batches: int | None = field(
        default=None, metadata=_help("Evaluate on at most this many batches.")
    )
    save_every: int = field(
        default=0, metadata=_help("Checkpoint every N steps (0: at the end only).")
    )
    keep: int = field(default=2, metadata=_help("Checkpoints to keep."))
    num_workers: int = field(default=0, metadata=_help("DataLoader worker processes."))
    order: str = field(default="streaming", metadata=_help("Row order.", choices=ORDERS))
    resume: bool = field(
        default=False, metadata=_help("Continue from the newest checkpoint in --out.")
    )
    device: str = field(default="auto", metadata=_help("auto, cpu, cuda, cuda:1, ..."))
    bf16: bool | None = field(default=None, metadata=_help("bf16 autocast (default: on for CUDA)."))
    compile: bool = field(default=False, metadata=_help("torch.compile the student."))
    fsdp: bool = field(
        default=False,
        metadata=_help(
            "Shard the student, its gradients and optimizer state over the ranks (FSDP2; "
            "under torchrun, even for one process); checkpoints become sharded (DCP)."
        ),
    )
    fsdp_cpu_offload: bool = field(
        default=False,
        metadata=_help("With --fsdp: keep the shards and the optimizer state in CPU memory."),
    )
    activation_checkpointing: bool = field(
        default=False,
        metadata=_help("Recompute each decoder layer's activations in backward (less memory)."),
    )
    allow_vocab_mismatch: bool = field(
        default=False,
        metadata=_help(
            "Accept a student tokenizer that differs from the teacher's "
            "(ids must be a prefix-compatible subset)."
        ),
    )
    log_every: int = field(default=10, metadata=_help("Log training loss every N steps."))
    progress: bool = field(default=True, metadata=_help("Progress line and final table on stderr."))
    storage_options: Mapping[str, Any] = field(
        default_factory=dict, metadata=_help("fsspec options for the caches' filesystem.")
    )
    readahead: int = field(default=4, metadata=_help("Shards fetched ahead while streaming."))
    local_cache: str | None = field(
        default=None,
        metadata=_help(
            "Directory keeping verified copies of a remote cache's shards (LRU-bounded)."
        ),
    )
    local_cache_size: str | None = field(
        default=None, metadata=_help("Bound of --local-cache, e.g. 20G (default 50G).")
    )
    expect_digest: str | None = field(
        default=None,
        metadata=_help("Refuse the cache unless its content digest (logitcache info) is this."),
    )

    def problems(self) -> list[str]:
        """Every invalid setting, each with its fix (empty when the config is valid)."""
        p: list[str] = []
        if (self.student is None) == (self.student_config is None):
            p.append("give exactly one of student (a HF model dir) or student_config (a JSON)")
        for name in ("batch_size", "grad_accum", "max_steps", "keep", "log_every"):
            if getattr(self, name) < 1:
                p.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "save_every", "num_workers", "seed"):
            if getattr(self, name) < 0:
                p.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            p.append(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.eval_fraction < 1.0:
            p.append(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.eval_fraction and self.eval_cache:
            p.append("give eval_fraction or eval_cache, not both")
        if self.stop_after is not None and self.stop_after < 1:
            p.append(f"stop_after must be >= 1, got {self.stop_after}")
        if self.student_seq_len is not None and self.student_seq_len < 2:
            p.append(f"student_seq_len must be >= 2, got {self.student_seq_len}")
        if self.top_k is not None and self.top_k < 1:
            p.append(f"top_k must be >= 1, got {self.top_k}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            p.append(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.fsdp_cpu_offload and not self.fsdp:
            p.append("fsdp_cpu_offload needs fsdp: add --fsdp, or drop --fsdp-cpu-offload")
        if self.fsdp and self.compile:
            p.append(
                "compile with fsdp is not supported yet (untested here: FSDP2 + torch.compile "
                "needs per-layer compilation); drop --compile"
            )
        try:
            KDConfig(self.loss, self.temperature, self.alpha, self.beta)
        except ConfigError as e:
            p.append(str(e))
        return p

    def fingerprint(self, manifest_digest: str, world_size: int) -> dict[str, Any]:
        """What a resumed run must share with the run that wrote the checkpoint."""
        keep = (
            "student",
            "student_config",
            "loss",
            "temperature",
            "alpha",
            "beta",
            "fused",
            "top_k",
            "lr",
            "weight_decay",
            "warmup_steps",
            "min_lr_ratio",
            "clip",
            "seed",
            "eval_fraction",
            "max_steps",
            "order",
        )
        d = {k: getattr(self, k) for k in keep}
        for k in ("student_tokenizer", "student_seq_len"):  # set only by cross-tokenizer runs
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        d["cache_manifest_sha256"] = manifest_digest
        d["global_batch"] = self.batch_size * self.grad_accum * world_size
        return d

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown training settings {unknown}; known: {sorted(known)}")
        return cls(**dict(d))
