"""Distilling from the cache vs online KD with the teacher in the loop: speed, memory, quality.

    python scripts/bench_train.py                  # CPU defaults, ~3-5 min on 2 cores
    python scripts/bench_train.py --steps 80       # a quicker, noisier look

One process, one student initialisation, the same rows in the same order, the same optimizer
(AdamW, cosine schedule, clipping as in ``logitcache train``) and the same number of steps:

- ``cached``: the trainer's path, written out: ``make_loader`` over the cache (inside the timed
  step: reading, decoding, dequantising) -> student forward -> ``kd_loss`` (forward KL on the
  stored top-k plus the tail bucket) -> backward -> clip -> AdamW. Before the race, a short
  ``logitcache.train.run_train`` run checks that this loop *is* the trainer: its first losses
  must equal the trainer's within a relative ``SELF_CHECK_RTOL`` (1e-5; the max difference is
  printed). Not bit for bit: the race runs with ``--threads`` while the trainer ran with torch's
  default, and a different thread count sums in another order (5.624981880 vs 5.624981403 at step
  3 was seen with 1 thread, 8.5e-8 relative); a different loop would differ by far more;
- ``online``: the classic KD loop: the teacher's forward on the same rows every step, then the
  dense KL(teacher || student) over the full vocabulary at the same positions (plain torch
  below). Its batches are materialised in memory beforehand: the online side gets a free loader;
- ``student step``: forward + backward + AdamW on hard labels (next-token cross-entropy), the
  floor a free loader and a free loss would reach;
- ``teacher forward``: the teacher's bare forward on one batch.

``ideal_speedup = (student step + teacher forward) / student step``; ``speedup = online / cached``;
``speedup_vs_ideal = speedup / ideal_speedup`` (1.0: the cache costs nothing beyond the student).

Timing on a shared machine: the four loops run interleaved in blocks of ``--block`` steps, so a
burst of load from elsewhere hits all of them alike; the first step of each block is not timed
(it pays for the switch), and each quantity is the *median* step time of its timed steps (the
mean is printed too). Teacher and student are Llama-style models built in memory, the teacher
about 10x the student's parameters with a sharper output (scaled head) so that its top-64
captures most of the mass, as for a trained LM.

The cache is dumped first with ``logitcache.dump`` (top-64 + tail, the default sqrt-quantised
codec) over a token stream of Python's documentation (word-level ids, most frequent words); the
dump is timed on its own and is not part of ``cached``. A fixed 10% of the rows is held out
(``split=("eval", 0.1)``): both students are scored on them by the true full-vocabulary
KL(teacher || student), computed with the teacher, not with the cache.

Peak memory (CPU): resident tensors (model weights, AdamW state; for ``online`` also the
teacher's weights), counted exactly, plus the peak of live tensor bytes allocated during one
step, from the profiler's allocation events (``profile_memory=True``; torch's CPU allocator is
invisible to tracemalloc, and RSS deltas are blurred by the allocator's caching). On CUDA:
``torch.cuda.max_memory_allocated`` over one step.

The last line is one JSON object: ``speedup``, ``ideal_speedup``, ``speedup_vs_ideal``,
``kl_cached``, ``kl_online``, ``kl_ratio`` and the raw numbers.
"""

from __future__ import annotations

import argparse
import collections
import json
import pydoc_data.topics
import re
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from logitcache.data import make_loader
from logitcache.data.targets import teacher_targets
from logitcache.dump import DumpConfig, run_dump
from logitcache.loss import kd_loss
from logitcache.train import TrainConfig, run_train

HELD_OUT = 0.1
SELF_CHECK_RTOL = 1e-5


def self_check(bench: list[float], trainer: list[float], rtol: float = SELF_CHECK_RTOL) -> float:
    """The largest relative difference between the bench loop's first losses and the trainer's;
    raises SystemExit, naming both curves, when it exceeds ``rtol`` or a loss is missing."""
    if len(bench) < len(trainer) or not trainer:
        raise SystemExit(f"self-check needs {len(trainer)} losses of the bench loop, got {bench}")
    diff = max(abs(b - t) / max(abs(t), 1e-12) for b, t in zip(bench, trainer, strict=False))
    if not diff <= rtol:  # also refuses NaN
        raise SystemExit(
            f"the bench's cached loop is not the trainer's: {bench[: len(trainer)]} vs {trainer} "
            f"(max relative difference {diff:.3g} > {rtol:g})"
        )
    return diff


def llama(hidden: int, layers: int, vocab: int, seq_len: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=seq_len,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


def token_stream(vocab: int, tokens: int) -> np.ndarray:
    """Python's documentation as word-level ids: the ``vocab - 1`` commonest words, 0 = other."""
    words = re.findall(r"\w+|[^\w\s]", "\n".join(pydoc_data.topics.topics.values()))
    common = [w for w, _ in collections.Counter(words).most_common(vocab - 1)]
    index = {w: i + 1 for i, w in enumerate(common)}
    ids = np.asarray([index.get(w, 0) for w in words], np.int32)
    return np.tile(ids, -(-tokens // len(ids)))[:tokens]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tensor_bytes(*groups: Any) -> int:
    """Bytes of the tensors in models (parameters) and optimizers (state)."""
    total = 0
    for g in groups:
        if isinstance(g, nn.Module):
            total += sum(p.numel() * p.element_size() for p in g.parameters())
        else:
            for state in g.state.values():
                total += sum(
                    v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v)
                )
    return total


def step_peak_bytes(fn: Callable[[], None], device: torch.device) -> int:
    """Peak bytes of live tensors allocated during ``fn()`` above what was live before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocs: list[tuple[int, int]] = []

    def walk(e: Any) -> None:
        if e.tag == _EventType.Allocation:
            allocs.append((e.start_time_ns, e.extra_fields.total_allocated))
        for child in e.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    return max((total for _, total in allocs), default=0)


class Run:
    """A student, its optimizer and schedule: what ``logitcache train`` builds (fp32, no DDP)."""

    def __init__(self, student_dir: Path, cfg: TrainConfig, device: torch.device) -> None:
        from logitcache.train.run import _schedule

        self.model = LlamaForCausalLM.from_pretrained(student_dir, dtype=torch.float32).to(device)
        self.model.train()
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _schedule(cfg))
        self.clip = cfg.clip
        self.device = device
        self.losses: list[float] = []
        self.times: list[float] = []

    def update(self, total: Tensor, count: Tensor) -> None:
        """Backward of ``total / count`` (a loss *sum* normalised once), clip, AdamW, schedule."""
        scale = 1 / count.clamp(min=1.0)
        (total * scale).backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.losses.append(float(total.detach() / count.clamp(min=1.0)))

    def logits_at(self, batch: dict[str, Any]) -> Tensor:
        z = self.model(input_ids=batch["input_ids"]).logits
        return z.flatten(0, 1).index_select(0, batch["target_index"])


def cached_step(run: Run, batches: Any) -> None:
    batch = next(batches)
    count = torch.tensor(float(batch["target_index"].numel()), device=run.device)
    total, _ = kd_loss(run.logits_at(batch), teacher_targets(batch), None, loss="kl")
    run.update(total.float(), count)


def online_step(run: Run, teacher: nn.Module, batch: dict[str, Any]) -> None:
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"], use_cache=False).logits
        log_p = F.log_softmax(t.flatten(0, 1).index_select(0, batch["target_index"]).float(), -1)
    log_q = F.log_softmax(run.logits_at(batch).float(), -1)
    total = (log_p.exp() * (log_p - log_q)).sum()  # dense KL(teacher || student), summed
    run.update(total, torch.tensor(float(len(log_p)), device=run.device))


def hard_step(run: Run, batch: dict[str, Any]) -> None:
    total = F.cross_entropy(run.logits_at(batch), batch["target_labels"], reduction="sum")
    run.update(total, torch.tensor(float(batch["target_labels"].numel()), device=run.device))


def teacher_forward(teacher: nn.Module, batch: dict[str, Any]) -> None:
    with torch.no_grad():
        teacher(input_ids=batch["input_ids"], use_cache=False).logits.sum().item()


@torch.no_grad()
def full_kl(model: nn.Module, teacher: nn.Module, rows: list[dict[str, Any]]) -> float:
    """Mean over held-out target positions of the full-vocabulary KL(teacher || model)."""
    model.eval()
    total, n = 0.0, 0
    for b in rows:
        idx = b["target_index"]
        log_p = F.log_softmax(
            teacher(input_ids=b["input_ids"]).logits.flatten(0, 1)[idx].float(), -1
        )
        log_q = F.log_softmax(model(input_ids=b["input_ids"]).logits.flatten(0, 1)[idx].float(), -1)
        total += float((log_p.exp() * (log_p - log_q)).sum())
        n += len(idx)
    model.train()
    return total / max(n, 1)


def keep(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: batch[k].clone() for k in ("input_ids", "target_index", "target_labels")}


def timed(fn: Callable[[], None], sink: list[float], device: torch.device, record: bool) -> None:
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if record:
        sink.append(time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=160)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--student", default="128x2", help="hidden x layers")
    p.add_argument("--teacher", default="384x6", help="hidden x layers")
    p.add_argument(
        "--teacher-sharpness", type=float, default=10.0, help="scale of its lm_head (top-64 mass)"
    )
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--block", type=int, default=8, help="steps per side per interleaved block")
    p.add_argument("--bare-steps", type=int, default=4, help="bare loop steps per block")
    p.add_argument("--dump-batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads in the race (0: torch's default)"
    )
    args = p.parse_args()
    hf_logging.disable_progress_bar()
    device = torch.device(args.device)
    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    sh, sl = (int(x) for x in args.student.split("x"))
    th, tl = (int(x) for x in args.teacher.split("x"))
    student = llama(sh, sl, args.vocab, args.seq_len, seed=1)
    teacher = llama(th, tl, args.vocab, args.seq_len, seed=2)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(args.teacher_sharpness)
    student.save_pretrained(work / "student")
    teacher.save_pretrained(work / "teacher")
    ratio = n_params(teacher) / n_params(student)
    rows = int(np.ceil(args.steps * args.batch_size / (1 - HELD_OUT) * 1.02)) + args.batch_size
    np.save(work / "tokens.npy", token_stream(args.vocab, rows * args.seq_len))
    print(
        f"settings: student {args.student} ({n_params(student) / 1e6:.2f}M params), teacher "
        f"{args.teacher} ({n_params(teacher) / 1e6:.2f}M, {ratio:.1f}x), vocab {args.vocab}, "
        f"seq_len {args.seq_len}, batch {args.batch_size}, {args.steps} steps, lr {args.lr}, "
        f"top-{args.k} + tail, {rows} rows ({HELD_OUT:.0%} held out), device {device}, "
        f"{args.threads or torch.get_num_threads()} thread(s) in the race",
        flush=True,
    )

    cache = str(work / "cache")
    warnings.filterwarnings("ignore", message="no tokenizer loaded")
    res = run_dump(
        DumpConfig(
            teacher=str(work / "teacher"),
            data=str(work / "tokens.npy"),
            out=cache,
            seq_len=args.seq_len,
            k=args.k,
            batch_size=args.dump_batch_size,
            device=str(device),
            dtype="fp32",
            progress=False,
        )
    )
    mass = res.manifest.coverage.captured_mass if res.manifest is not None else None
    print(
        f"dump (not part of either side): {res.seconds:.1f} s, {res.tokens_per_s:,.0f} tokens/s, "
        f"mean top-{args.k} captured mass {mass if mass is not None else float('nan'):.3f}",
        flush=True,
    )

    cfg = TrainConfig(
        cache=cache,
        out=str(work / "trainer"),
        student=str(work / "student"),
        batch_size=args.batch_size,
        max_steps=args.steps,
        lr=args.lr,
        eval_fraction=HELD_OUT,
        device=str(device),
        bf16=False,
        progress=False,
        stop_after=3,
        eval_batches=1,
    )
    loader_kw: dict[str, Any] = dict(
        seed=cfg.seed, order=cfg.order, device=device, rank=0, world_size=1
    )
    check = run_train(cfg)["losses"]

    def cache_batches() -> Any:
        loader = make_loader(cache, args.batch_size, split=("train", HELD_OUT), **loader_kw)
        while True:
            yield from loader

    materialised = cache_batches()
    online_batches = [keep(next(materialised)) for _ in range(args.steps)]
    ev = make_loader(
        cache, args.batch_size, split=("eval", HELD_OUT), **{**loader_kw, "order": "sequential"}
    )
    held_out = [keep(b) for b in ev]
    teacher = (
        LlamaForCausalLM.from_pretrained(work / "teacher", dtype=torch.float32).to(device).eval()
    )

    cached, online, bare = (
        Run(work / "student", cfg, device),
        Run(work / "student", cfg, device),
        Run(work / "student", cfg, device),
    )
    kl_init = full_kl(cached.model, teacher, held_out)
    if args.threads:  # the dump above used torch's default
        torch.set_num_threads(args.threads)
    live = cache_batches()
    teacher_times: list[float] = []
    blocks = -(-args.steps // args.block)
    t_start = time.perf_counter()
    for blk in range(blocks):
        lo, hi = blk * args.block, min(args.steps, (blk + 1) * args.block)
        for i in range(lo, hi):
            timed(lambda: cached_step(cached, live), cached.times, device, i > lo)
        if blk == 0:
            diff = self_check(cached.losses, check)
            print(f"  self-check: the bench loop is the trainer's (max rel. diff {diff:.2g})")
        for i in range(lo, hi):
            timed(
                lambda i=i: online_step(online, teacher, online_batches[i]),
                online.times,
                device,
                i > lo,
            )
        for i in range(lo, min(hi, lo + args.bare_steps)):
            timed(lambda i=i: hard_step(bare, online_batches[i]), bare.times, device, i > lo)
        for i in range(lo, min(hi, lo + args.bare_steps)):
            timed(
                lambda i=i: teacher_forward(teacher, online_batches[i]),
                teacher_times,
                device,
                i > lo,
            )
        print(
            f"  block {blk + 1}/{blocks}: cached loss {cached.losses[-1]:.4f}, online loss "
            f"{online.losses[-1]:.4f}, {time.perf_counter() - t_start:.0f} s",
            flush=True,
        )

    kl_cached = full_kl(cached.model, teacher, held_out)
    kl_online = full_kl(online.model, teacher, held_out)

    mem_batch = online_batches[0]
    peak_cached = tensor_bytes(cached.model, cached.opt) + step_peak_bytes(
        lambda: cached_step(cached, live), device
    )
    peak_online = tensor_bytes(online.model, online.opt, teacher) + step_peak_bytes(
        lambda: online_step(online, teacher, mem_batch), device
    )

    med = {
        k: statistics.median(v)
        for k, v in (
            ("cached", cached.times),
            ("online", online.times),
            ("student", bare.times),
            ("teacher", teacher_times),
        )
    }
    mean = {
        k: statistics.fmean(v)
        for k, v in (
            ("cached", cached.times),
            ("online", online.times),
            ("student", bare.times),
            ("teacher", teacher_times),
        )
    }
    ideal = (med["student"] + med["teacher"]) / med["student"]
    speedup = med["online"] / med["cached"]
    print("\nstep times (s)      median    mean   timed steps")
    for k, n in (
        ("cached", len(cached.times)),
        ("online", len(online.times)),
        ("student", len(bare.times)),
        ("teacher", len(teacher_times)),
    ):
        label = {
            "cached": "cached KD step",
            "online": "online KD step",
            "student": "bare student step",
            "teacher": "teacher forward",
        }[k]
        print(f"  {label:<18} {med[k]:.4f}  {mean[k]:.4f}   {n}")
    print(
        f"speed-up of cached over online: {speedup:.2f}x "
        f"(means: {mean['online'] / mean['cached']:.2f}x); "
        f"ideal {ideal:.2f}x -> {speedup / ideal:.2f} of ideal"
    )
    print(f"cached step over bare student step: {med['cached'] / med['student']:.3f}")
    print(
        f"peak memory: cached {peak_cached / 2**20:.1f} MiB, online {peak_online / 2**20:.1f} MiB"
    )
    print(
        f"held-out full-vocab KL(teacher || student): initial {kl_init:.4f}, "
        f"cached {kl_cached:.4f}, online {kl_online:.4f} "
        f"(cached / online = {kl_cached / kl_online:.4f})"
    )
    out = {
        "speedup": round(speedup, 4),
        "ideal_speedup": round(ideal, 4),
        "speedup_vs_ideal": round(speedup / ideal, 4),
        "speedup_mean": round(mean["online"] / mean["cached"], 4),
        "ideal_speedup_mean": round((mean["student"] + mean["teacher"]) / mean["student"], 4),
        "kl_cached": round(kl_cached, 5),
        "kl_online": round(kl_online, 5),
        "kl_ratio": round(kl_cached / kl_online, 4),
        "kl_initial": round(kl_init, 5),
        "peak_mem_cached_mib": round(peak_cached / 2**20, 1),
        "peak_mem_online_mib": round(peak_online / 2**20, 1),
        "step_s": {k: round(v, 5) for k, v in med.items()},
        "dump_s": round(res.seconds, 2),
        "captured_mass": mass,
        "param_ratio": round(ratio, 2),
        "steps": args.steps,
        "device": str(device),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
