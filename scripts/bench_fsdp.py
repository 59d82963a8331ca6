"""FSDP2 against one process: the same student, the same rows, the same steps, in one run.

One synthetic top-k cache (random teacher distributions: the loss does not care where they come
from) of ``--rows`` rows, one row per shard, and a global batch of ``--rows`` rows: every step
reads the whole epoch at any world size, so the two runs see exactly the same rows at every step
(the loader deals whole shards to ranks: on a bigger cache 1 and 2 ranks would batch other rows).
A fresh Llama student from a config (seed 0), fp32, AdamW, cosine schedule, clip 1.0; then:

1. ``logitcache train`` in one process (``--device cpu``, batch ``rows``);
2. ``torchrun --nproc-per-node 2 -m logitcache train --fsdp`` on gloo (batch ``rows / 2`` per rank).

Figures (each run's ``summary.json``):

- ``fsdp_state_bytes_per_rank_ratio``: parameters + gradients + AdamW state held by rank 0 (the
  local shards of the ``DTensor``s, measured after the first optimizer step; rank 0 holds the
  largest dim-0 chunks, so it is the worst rank) / the same in one process; target <= 0.55;
- ``fsdp_loss_max_rel_diff``: the largest relative difference of the two step-loss curves;
  target <= 1e-5.

``--device cuda`` adds the GPU configuration (one GPU: FSDP on 1 rank, NCCL, bf16 parameters and
fp32 reduction) on a bigger student: plain bf16 autocast vs ``--fsdp`` vs ``--fsdp
--fsdp-cpu-offload --activation-checkpointing``, reporting each run's peak CUDA memory
(``torch.cuda.max_memory_allocated`` over the steps), the peak ratios to plain, and the loss
difference (bf16: expect ~1e-2, not 1e-5).

Measured on 2 shared CPU cores (hidden 64, 4 layers, vocab 1024, 8 rows x 64 tokens, 10 steps):
see docs/train.md ("DDP or FSDP").

Usage: ``python scripts/bench_fsdp.py [--device cpu|cuda] [--steps 10]``; the last line is one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from logitcache.format import SourceInfo, TargetsInfo, TopKCodec, TopKTargets
from logitcache.store import CacheHeader, CacheWriter

K = 16


def write_cache(url: Path, rows: int, seq: int, vocab: int, seed: int = 0) -> None:
    """``rows`` rows of random ids with random top-K teacher distributions, one row a shard."""
    if vocab & (vocab - 1) or vocab < K:
        raise SystemExit(f"--vocab must be a power of two >= {K}, got {vocab}")
    rng = np.random.default_rng(seed)
    hdr = CacheHeader(
        codec=TopKCodec(k=K, vocab_size=vocab),
        targets=TargetsInfo(method="topk", k=K),
        seq_len=seq,
        vocab_size=vocab,
        padded_vocab_size=vocab,
        teacher=SourceInfo(name="synthetic-teacher"),
    )
    ids = rng.integers(0, vocab, (rows, seq))
    mask = np.ones((rows, seq), bool)
    mask[:, -1] = False
    n = int(mask.sum())
    # K distinct ids per position: an odd stride is a unit modulo a power of two
    start = rng.integers(0, vocab, (n, 1))
    stride = 2 * rng.integers(0, vocab // 2, (n, 1)) + 1
    top_ids = (start + stride * np.arange(K)[None, :]) % vocab
    logits = rng.normal(0.0, 3.0, (n, K + 1))
    logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    top = -np.sort(-logp[:, :K], axis=1)
    targets = TopKTargets(
        top_ids.astype(np.int32),
        top.astype(np.float32),
        logp[:, K].astype(np.float32),
        np.zeros((n, 0), np.float32),
    )
    with CacheWriter(str(url), hdr, shard_bytes=1) as w:
        w.write(np.arange(rows), ids, mask, targets)


def write_student(path: Path, vocab: int, hidden: int, layers: int, seq: int) -> None:
    path.write_text(
        json.dumps(
            {
                "model_type": "llama",
                "vocab_size": vocab,
                "hidden_size": hidden,
                "intermediate_size": 2 * hidden,
                "num_hidden_layers": layers,
                "num_attention_heads": max(1, hidden // 32),
                "num_key_value_heads": max(1, hidden // 64),
                "max_position_embeddings": seq,
                "tie_word_embeddings": False,
            }
        )
    )


def train(nproc: int, out: Path, common: list[str], *flags: str) -> dict[str, Any]:
    """One run: one plain process (nproc 0) or torchrun with ``nproc`` ranks; its summary."""
    if nproc:
        launch = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    else:
        launch = []
    cmd = [sys.executable, *launch, "-m", "logitcache", "train", *common, "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([*cmd, *flags], capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd + list(flags))} failed:\n{r.stderr[-3000:]}")
    return dict(json.loads((out / "summary.json").read_text()))


def max_rel_diff(a: list[float], b: list[float]) -> float:
    if len(a) != len(b):
        raise SystemExit(f"loss curves of different lengths: {len(a)} vs {len(b)}")
    diffs = [abs(x - y) / max(abs(y), 1e-30) for x, y in zip(a, b, strict=True)]
    return max(diffs) if all(math.isfinite(d) for d in diffs) else math.inf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    a = ap.parse_args()
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        write_cache(d / "cache", a.rows, a.seq, a.vocab)
        write_student(d / "student.json", a.vocab, a.hidden, a.layers, a.seq)
        common = [
            "--cache", str(d / "cache"), "--student-config", str(d / "student.json"),
            "--max-steps", str(a.steps), "--lr", "0.003", "--order", "random",
            "--log-every", "1", "--no-progress", "--device", "cpu",
        ]  # fmt: skip
        one = train(0, d / "one", common, "--batch-size", str(a.rows))
        two = train(2, d / "two", common, "--fsdp", "--batch-size", str(a.rows // 2))
        ratio = two["state_bytes_per_rank"] / one["state_bytes_per_rank"]
        diff = max_rel_diff(two["losses"], one["losses"])
        print(f"state bytes per rank: 1 process {one['state_bytes_per_rank']:,}, FSDP 2 ranks "
              f"{two['state_bytes_per_rank']:,} ({ratio:.3f}x); loss max rel diff {diff:.2e}; "
              f"steps/s {one['steps_per_s']:.2f} vs {two['steps_per_s']:.2f}")  # fmt: skip
        result.update(
            fsdp_state_bytes_per_rank_ratio=round(ratio, 4),
            fsdp_loss_max_rel_diff=diff,
            state_bytes_one_process=one["state_bytes_per_rank"],
            state_bytes_fsdp_rank0=two["state_bytes_per_rank"],
            steps_per_s_ratio_fsdp2_vs_one=round(two["steps_per_s"] / one["steps_per_s"], 3),
            cpu_config={
                k: getattr(a, k) for k in ("rows", "seq", "vocab", "hidden", "layers", "steps")
            },
        )
        if a.device == "cuda":
            result.update(cuda_figures(d, a))
    print(json.dumps(result))


def cuda_figures(d: Path, a: argparse.Namespace) -> dict[str, Any]:
    """One GPU: plain bf16 autocast vs FSDP (1 rank, bf16 mixed precision) vs FSDP + CPU offload
    + activation checkpointing, on a bigger student; peak CUDA memory and the loss difference."""
    vocab, hidden, layers, seq, rows = 32768, 1024, 8, 512, 8
    write_cache(d / "cache_gpu", rows, seq, vocab)
    write_student(d / "student_gpu.json", vocab, hidden, layers, seq)
    common = [
        "--cache", str(d / "cache_gpu"), "--student-config", str(d / "student_gpu.json"),
        "--max-steps", str(a.steps), "--lr", "0.0003", "--order", "random", "--log-every", "1",
        "--no-progress", "--device", "cuda", "--batch-size", str(rows), "--fused",
    ]  # fmt: skip
    plain = train(0, d / "gpu_plain", common)
    fsdp = train(1, d / "gpu_fsdp", common, "--fsdp")
    lean = train(1, d / "gpu_lean", common, "--fsdp", "--fsdp-cpu-offload",
                 "--activation-checkpointing")  # fmt: skip
    for name, s in (("plain", plain), ("fsdp", fsdp), ("fsdp+offload+ac", lean)):
        print(f"cuda {name}: peak {s['peak_device_bytes'] / 2**20:.0f} MiB, "
              f"{s['steps_per_s']:.2f} steps/s, final loss {s['final_loss']:.4f}")  # fmt: skip
    return dict(
        cuda_peak_bytes_plain=plain["peak_device_bytes"],
        cuda_peak_ratio_fsdp=round(fsdp["peak_device_bytes"] / plain["peak_device_bytes"], 3),
        cuda_peak_ratio_fsdp_offload_ac=round(
            lean["peak_device_bytes"] / plain["peak_device_bytes"], 3
        ),
        cuda_loss_max_rel_diff_fsdp_bf16=max_rel_diff(fsdp["losses"], plain["losses"]),
        cuda_loss_max_rel_diff_offload_ac=max_rel_diff(lean["losses"], fsdp["losses"]),
        cuda_steps_per_s_ratio_fsdp=round(fsdp["steps_per_s"] / plain["steps_per_s"], 3),
        cuda_config=dict(rows=rows, seq=seq, vocab=vocab, hidden=hidden, layers=layers),
    )


if __name__ == "__main__":
    main()
