"""Held-out metrics of a student against the cached teacher.

Every metric is a (sum, count) pair, so batches, ranks and accumulation steps add up exactly and
the mean is taken once at the end (after an all-reduce under DDP):

- ``kl``: forward KL(teacher || student) on the cached support plus the tail bucket (top-k caches;
  the exact KL between the two distributions coarsened to the stored ids + "everything else");
  sampled caches report ``sampled_ce`` instead (an unbiased estimate of the full cross-entropy
  H(p, q); KL needs the teacher entropy, which samples do not give);
- ``ce`` / ``ppl``: cross-entropy of the true next token (hard labels), and its exponential;
- ``top1_agreement``: the student's argmax equals the teacher's most likely id (top-k: the largest
  stored log-prob; sampled: the most drawn id);
- ``ece``: expected calibration error of the student's top-1 prediction against the true next
  token, 15 equal-width confidence bins.

Memory: the student gives hidden states and its output head (:class:`StudentOutput`), and the
logits are made ``chunk_size`` positions at a time (by default the fused loss's chunk, 64 MiB of
float32 per chunk: ``2**24 // V`` rows), so evaluation never holds [positions x vocab] logits, like
the fused loss. Before, a 262k-vocabulary student peaked at 3.78 GB with evaluation and 0.90 GB
without. Because every metric is a sum, the chunked result equals the unchunked one up to float
summation order. A student whose logits are not a plain linear map of its hidden states gives
full logits instead (still scored chunk by chunk).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from logitcache.loss import SampledTeacher, TopKTeacher, default_chunk_size, kd_loss

__all__ = ["ECE_BINS", "MetricSums", "StudentOutput", "evaluate"]

ECE_BINS = 15


class MetricSums:
    """Running sums for the metrics; ``reduce()`` all-reduces them across ranks."""

    def __init__(self, device: torch.device) -> None:
        # kl, kl_n, ce, ce_n, top1, top1_n, then per-bin (count, confidence sum, correct sum)
        self.scalars = torch.zeros(6, dtype=torch.float64, device=device)
        self.bins = torch.zeros(3, ECE_BINS, dtype=torch.float64, device=device)
        self.kind = "topk"

    @torch.no_grad()
    def add(self, logits: Tensor, teacher: TopKTeacher | SampledTeacher, labels: Tensor) -> None:
        z = logits.float()
        loss = "kl" if isinstance(teacher, TopKTeacher) else "sampled-ce"
        self.kind = "topk" if loss == "kl" else "sampled"
        kl_sum, kl_n = kd_loss(z, teacher, loss=loss)
        valid = labels >= 0
        ce = torch.nn.functional.cross_entropy(z[valid], labels[valid], reduction="sum")
        pred = z.argmax(dim=-1)
        if isinstance(teacher, TopKTeacher):
            best = teacher.logprobs.float().argmax(dim=-1, keepdim=True)
        else:
            best = teacher.counts.float().argmax(dim=-1, keepdim=True)
        teacher_top = teacher.ids.long().gather(1, best).squeeze(1)
        conf = torch.softmax(z[valid], dim=-1).amax(dim=-1).double()
        correct = (pred[valid] == labels[valid]).double()
        b = (conf * ECE_BINS).long().clamp(max=ECE_BINS - 1)
        self.bins[0].index_add_(0, b, torch.ones_like(conf))
        self.bins[1].index_add_(0, b, conf)
        self.bins[2].index_add_(0, b, correct)
        add = torch.stack(
            [
                kl_sum.double(),
                torch.as_tensor(kl_n, dtype=torch.float64, device=z.device),
                ce.double(),
                valid.sum().double(),
                (pred == teacher_top).sum().double(),
                torch.tensor(float(len(pred)), dtype=torch.float64, device=z.device),
            ]
        )
        self.scalars += add

    def reduce(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.scalars)
            dist.all_reduce(self.bins)

    def result(self) -> dict[str, float]:
        s = self.scalars.tolist()
        kl = s[0] / s[1] if s[1] else float("nan")
        ce = s[2] / s[3] if s[3] else float("nan")
        n = self.bins[0].clamp(min=1)
        gap = (self.bins[1] / n - self.bins[2] / n).abs() * self.bins[0]
        total = float(self.bins[0].sum())
        out = {
            "kl" if self.kind == "topk" else "sampled_ce": kl,
            "ce": ce,
            "ppl": float(torch.tensor(ce).exp()) if s[3] else float("nan"),
            "top1_agreement": s[4] / s[5] if s[5] else float("nan"),
            "ece": float(gap.sum()) / total if total else float("nan"),
            "positions": s[5],
        }
        return out


@dataclass(frozen=True)
class StudentOutput:
    """The student at a batch's target positions: ``hidden [N, H]`` with the head ``weight
    [V, H]`` and ``bias [V] | None`` (logits made per chunk), or full ``logits [N, V]``."""

    hidden: Tensor | None = None
    weight: Tensor | None = None
    bias: Tensor | None = None
    logits: Tensor | None = None

    def __len__(self) -> int:
        rows = self.logits if self.logits is not None else self.hidden
        if rows is None:
            raise ValueError("StudentOutput needs hidden states and a head, or logits")
        return int(rows.shape[0])

    @property
    def vocab(self) -> int:
        full = self.logits if self.logits is not None else self.weight
        if full is None:
            raise ValueError("StudentOutput needs hidden states and a head, or logits")
        return int(full.shape[0] if self.logits is None else full.shape[1])

    def chunk_logits(self, start: int, stop: int) -> Tensor:
        """Float32 logits of positions ``start:stop``."""
        if self.logits is not None:
            return self.logits[start:stop].float()
        if self.hidden is None or self.weight is None:
            raise ValueError("StudentOutput needs hidden states and a head, or logits")
        h = self.hidden[start:stop].to(self.weight.dtype)  # bf16 under autocast: score in fp32
        z = h @ self.weight.t() if self.bias is None else torch.addmm(self.bias, h, self.weight.t())
        return z.float()


def evaluate(
    batches: Iterable[dict[str, Any]],
    student: Callable[[dict[str, Any]], StudentOutput | Tensor],
    to_teacher: Callable[[dict[str, Any]], TopKTeacher | SampledTeacher],
    device: torch.device,
    max_batches: int | None = None,
    chunk_size: int | None = None,
) -> dict[str, float]:
    """Mean metrics over ``batches`` (each rank its share; reduced across ranks).

    ``student(batch)`` gives the student at the batch's target positions (a :class:`StudentOutput`,
    or a logits tensor); the metrics are summed ``chunk_size`` positions at a time (default: the
    fused loss's ``default_chunk_size(V)``).
    """
    sums = MetricSums(device)
    with torch.no_grad():
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            out = student(batch)  # even without targets: an FSDP forward is collective
            if isinstance(out, Tensor):
                out = StudentOutput(logits=out)
            teacher, labels = to_teacher(batch), batch["target_labels"]
            n = len(out)
            rows = chunk_size or default_chunk_size(out.vocab)
            for start in range(0, n, rows):
                stop = min(n, start + rows)
                part = torch.arange(start, stop, device=labels.device)
                sums.add(
                    out.chunk_logits(start, stop),
                    teacher if (start, stop) == (0, n) else teacher.select(part),
                    labels[start:stop],
                )
    sums.reduce()
    return sums.result()
