"""Loader throughput and data-wait benchmark (issue 5). Run: ``python scripts/bench_loader.py``.

1. Builds a top-64 cache (quantised codec, Zarr) in a temp dir from the real SmolLM2
   distributions in ``/work/shared/data/smollm2_pydoc_top256.npz`` (2048 positions, tiled with a
   per-row rotation), rows of 2048 tokens.
2. Positions/s delivered by ``make_loader`` (batch 8, dequantised batches on the CPU device) with
   0, 1 and 2 workers, side by side with the *raw* rate: gathering the same batches (decoded int32
   ids, float32 log-probs, tail, input ids) out of uncompressed in-memory numpy arrays, i.e. the
   memcpy limit. Both are measured over the same epochs in the same run; the ratio is printed.
3. A training loop with a tiny student (embedding + linear head over the 49k vocabulary, trained
   with the chunked fused-linear KD loss) and the loader with 1 worker: the fraction of step time
   the loop waited for data (``CachedLogitLoader.wait_seconds`` / loop time).

The last line is a JSON object. Absolute numbers depend on the machine; the ratios are the point.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from logitcache.data import make_loader, teacher_targets
from logitcache.format import TopKCodec, TopKTargets
from logitcache.format.manifest import SourceInfo, TargetsInfo
from logitcache.loss import fused_linear_kd_loss
from logitcache.store import CacheHeader, CacheWriter

DATA = Path("/work/shared/data/smollm2_pydoc_top256.npz")
K, SEQ, BATCH = 64, 2048, 8


def real_targets() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    d = np.load(DATA)
    lp = (d["topk_logits"][:, :K] - d["logsumexp"][:, None]).astype(np.float32)
    mass = np.exp(lp.astype(np.float64)).sum(axis=1)
    tail = np.log(np.clip(1.0 - mass, 1e-12, None)).astype(np.float32)
    return d["input_ids"], d["topk_ids"][:, :K].astype(np.int32), lp, tail, int(d["vocab_size"])


def build(url: str, rows: int) -> dict[str, np.ndarray]:
    """Write the cache; return the same data decoded and uncompressed (the raw reference)."""
    tokens, ids, lp, tail, vocab = real_targets()
    codec = TopKCodec(k=K, vocab_size=vocab)
    header = CacheHeader(
        codec=codec,
        targets=TargetsInfo(method="topk", k=K),
        seq_len=SEQ,
        vocab_size=vocab,
        padded_vocab_size=vocab,
        teacher=SourceInfo(name="SmolLM2-135M-Instruct", fingerprint="00" * 32),
    )
    rng = np.random.default_rng(0)
    shifts = rng.integers(0, SEQ, rows)
    raw_ids = np.empty((rows * SEQ, K), np.int32)
    raw_lp = np.empty((rows * SEQ, K), np.float32)
    raw_tail = np.empty(rows * SEQ, np.float32)
    raw_tokens = np.empty((rows, SEQ), np.int64)
    for r, s in enumerate(shifts):
        sl = slice(r * SEQ, (r + 1) * SEQ)
        raw_ids[sl], raw_lp[sl] = np.roll(ids, s, 0), np.roll(lp, s, 0)
        raw_tail[sl], raw_tokens[r] = np.roll(tail, s), np.roll(tokens, s)
    with CacheWriter(url, header, shard_bytes=24 << 20) as w:
        for start in range(0, rows, 16):
            stop = min(rows, start + 16)
            p = slice(start * SEQ, stop * SEQ)
            targets = TopKTargets(
                raw_ids[p], raw_lp[p], raw_tail[p], np.zeros((p.stop - p.start, 0), np.float32)
            )
            mask = np.ones((stop - start, SEQ), np.uint8)
            w.write(np.arange(start, stop), raw_tokens[start:stop], mask, targets)
    return {
        "ids": raw_ids,
        "logprobs": raw_lp,
        "tail": raw_tail,
        "tokens": raw_tokens,
        "vocab": np.asarray(vocab),
    }


def raw_rate(raw: dict[str, np.ndarray], epochs: int) -> float:
    """Positions/s of gathering shuffled batches out of uncompressed in-memory arrays."""
    rows = raw["tokens"].shape[0]
    rng = np.random.default_rng(1)
    positions, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        order = rng.permutation(rows)
        for b in range(0, rows, BATCH):
            sel = order[b : b + BATCH]
            pos = (sel[:, None] * SEQ + np.arange(SEQ)).reshape(-1)
            batch = {
                "input_ids": torch.from_numpy(raw["tokens"][sel]),
                "target_ids": torch.from_numpy(np.take(raw["ids"], pos, axis=0)),
                "logprobs": torch.from_numpy(np.take(raw["logprobs"], pos, axis=0)),
                "tail_logprob": torch.from_numpy(np.take(raw["tail"], pos)),
            }
            positions += batch["target_ids"].shape[0]
    return positions / (time.perf_counter() - t0)


def loader_rate(url: str, workers: int, epochs: int) -> float:
    """Steady-state positions/s: the first batch of each pass (worker start-up, first shard) is
    excluded, as it is amortised over a real epoch of thousands of batches."""
    loader = make_loader(url, BATCH, num_workers=workers, device="cpu", readahead=2)
    positions, elapsed = 0, 0.0
    for _ in range(epochs):
        it = iter(loader)
        next(it)
        t0 = time.perf_counter()
        for batch in it:
            positions += batch["target_ids"].shape[0]
        elapsed += time.perf_counter() - t0
    loader.close()
    return positions / elapsed


def train_wait_fraction(url: str, vocab: int, steps: int) -> tuple[float, float]:
    """(data-wait fraction, seconds per step) of a tiny student trained from the loader."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(vocab, 16)
    head = torch.nn.Linear(16, vocab, bias=False)
    opt = torch.optim.SGD([*emb.parameters(), *head.parameters()], lr=0.1)
    loader = make_loader(url, BATCH, num_workers=1, device="cpu", seed=7)
    it = iter(loader)
    next(it)  # warm-up step excluded: worker start and first shard
    loader.wait_seconds = 0.0
    done, t0 = 0, time.perf_counter()
    while done < steps:
        for batch in it:
            h = emb(batch["input_ids"]).flatten(0, 1).index_select(0, batch["target_index"])
            total, count = fused_linear_kd_loss(h, head.weight, None, teacher_targets(batch))
            opt.zero_grad(set_to_none=True)
            (total / count.clamp(min=1)).backward()
            opt.step()
            done += 1
            if done == steps:
                break
        else:
            it = iter(loader)
    elapsed = time.perf_counter() - t0
    wait = loader.wait_seconds
    loader.close()
    return wait / elapsed, elapsed / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--train-steps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        url = str(Path(tmp) / "cache")
        t0 = time.perf_counter()
        raw = build(url, args.rows)
        print(f"built {args.rows} rows x {SEQ} positions, k={K} in {time.perf_counter() - t0:.1f}s")
        result: dict[str, float] = {}
        raw_pps = raw_rate(raw, args.epochs)
        result["raw_positions_per_s"] = raw_pps
        print(f"raw in-memory gather      : {raw_pps / 1e6:8.2f} M positions/s")
        for workers in (0, 1, 2):
            pps = loader_rate(url, workers, args.epochs)
            result[f"loader_positions_per_s_{workers}worker"] = pps
            print(
                f"loader, {workers} worker(s)        : {pps / 1e6:8.2f} M positions/s "
                f"({pps / raw_pps:.2f} x raw)"
            )
        result["loader_vs_raw"] = result["loader_positions_per_s_1worker"] / raw_pps
        frac, step_s = train_wait_fraction(url, int(raw["vocab"]), args.train_steps)
        result["data_wait_fraction"] = frac
        result["train_step_seconds"] = step_s
        print(f"training loop: {step_s:.2f} s/step, data wait {100 * frac:.2f}% of step time")
    print(json.dumps({k: round(v, 4) for k, v in result.items()}))


if __name__ == "__main__":
    main()
