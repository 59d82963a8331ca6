"""Write a small top-k cache with the library, read it back, and report size and fidelity.

Usage: python scripts/roundtrip_example.py OUT_DIR

The teacher here is synthetic (Zipf-shaped random distributions over a 32k vocabulary), so this
runs anywhere in seconds; `logitcache dump` produces the same kind of cache from a real model.
"""

from __future__ import annotations

import json
import sys

import numpy as np

from logitcache.format import SourceInfo, TargetsInfo, TopKCodec, TopKTargets
from logitcache.store import CacheHeader, CacheReader, CacheWriter

VOCAB, K, SEQ, ROWS = 32_000, 64, 256, 32


def teacher_logprobs(rng: np.random.Generator, n: int) -> np.ndarray:
    """Peaked, heavy-tailed distributions: Zipf prior over a random permutation + noise."""
    ranks = np.arange(1, VOCAB + 1, dtype=np.float64)
    z = -1.1 * np.log(ranks)[None, :] + rng.standard_normal((n, VOCAB)) * 0.8
    z = np.take_along_axis(z, rng.permuted(np.tile(np.arange(VOCAB), (n, 1)), axis=1), axis=1)
    z -= z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def main(out: str) -> None:
    rng = np.random.default_rng(0)
    header = CacheHeader(
        codec=TopKCodec(k=K, vocab_size=VOCAB),
        targets=TargetsInfo(method="topk", k=K),
        seq_len=SEQ,
        vocab_size=VOCAB,
        padded_vocab_size=VOCAB,
        teacher=SourceInfo(name="synthetic-zipf"),
    )
    kl = []
    with CacheWriter(out, header, shard_bytes=1 << 20, overwrite=True) as w:
        for b in range(ROWS // 8):
            mask = np.ones((8, SEQ), bool)
            lp = teacher_logprobs(rng, 8 * SEQ)
            ids = np.argpartition(-lp, K, axis=1)[:, :K]
            top = np.take_along_axis(lp, ids, axis=1)
            tail = np.log1p(-np.exp(top).sum(axis=1))
            t = TopKTargets(
                ids.astype(np.int32),
                top.astype(np.float32),
                tail.astype(np.float32),
                np.zeros((8 * SEQ, 0), np.float32),
            )
            w.write(np.arange(b * 8, b * 8 + 8), rng.integers(0, VOCAB, (8, SEQ)), mask, t)
            dec = header.codec.decode(header.codec.encode(t))
            order = np.argsort(ids, axis=1)
            p = np.exp(np.take_along_axis(top, order, axis=1))
            kl.append(
                float(
                    np.mean(
                        (p * (np.log(p) - dec.logprobs)).sum(axis=1)
                        + np.exp(tail) * (tail - dec.tail_logprob)
                    )
                )
            )
    reader = CacheReader(out)
    m = reader.manifest
    rows = reader.read_rows(0, reader.num_rows)
    entries = m.num_positions * K
    print(f"wrote {m.num_rows} rows x {SEQ} tokens, top-{K} over vocab {VOCAB} into {out}")
    print(
        f"{m.num_bytes:,} bytes: {m.num_bytes / entries:.3f} bytes/entry "
        f"(naive int32 ids + float16 values: 6.0), {m.num_bytes / (m.num_rows * SEQ):.1f} "
        "bytes/token"
    )
    print(
        f"quantisation KL (top-k + tail bucket): {np.mean(kl):.2e} nats/token; "
        f"decoded {rows.targets.num_positions:,} positions"
    )
    print(json.dumps({"bytes_per_entry": m.num_bytes / entries, "quant_kl": float(np.mean(kl))}))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "demo-out/roundtrip-cache")
