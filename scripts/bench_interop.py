"""Import a published-style logit dataset into a cache and export it back, side by side.

The source is what people publish: one Parquet file (zstd), a record per row of ``--seq-len``
tokens, ``target_token_ids`` int32 and ``target_logprobs`` float32 per-position lists of the top
``--k`` (Axolotl's column names), built from real SmolLM2 distributions (``../shared/data``): the
2048 real positions are tiled, each copy's ids permuted within blocks of 1024 ids (so the ids keep
the low-id clustering of a real vocabulary) and its logits jittered by N(0, 0.1) before
renormalising, so that zstd cannot fold the copies in either file (a real dump has no repeats).

Measured in one run: the source's and the cache's bytes per target position (token), import and
export speed in positions/s (one process), and the round-trip error: the largest
``|log p_exported - log p_source|`` over entries with ``p >= 1e-3`` (the sqrt codec bounds
errors on ``sqrt(p)``, so tiny probabilities move more in log space; they carry little mass).

Usage: ``python scripts/bench_interop.py [--positions 100000 --k 64 --seq-len 512]``; the last
line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from logitcache.transform.exporter import export_cache
from logitcache.transform.importer import ImportConfig, import_cache

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "smollm2_pydoc_top256.npz"


def build_source(path: Path, positions: int, k: int, seq_len: int) -> tuple[np.ndarray, ...]:
    d = np.load(DATA)
    vocab = int(d["vocab_size"])
    base_ids = d["topk_ids"][:, :k].astype(np.int64)
    base_lp = d["topk_logits"][:, :k] - d["logsumexp"][:, None]
    rng = np.random.default_rng(0)
    reps = -(-positions // len(base_ids))
    blocks = np.arange(vocab) // 1024 * 1024

    def permuted() -> np.ndarray:
        perm = blocks + np.concatenate(
            [rng.permutation(min(1024, vocab - b)) for b in range(0, vocab, 1024)]
        )
        return perm[base_ids]

    def jittered() -> np.ndarray:
        lp = base_lp + rng.normal(0.0, 0.1, base_lp.shape)
        mass = np.exp(base_lp).sum(axis=1, keepdims=True)  # keep each position's top-k mass
        return lp - np.log(np.exp(lp).sum(axis=1, keepdims=True) / mass)

    ids = np.concatenate([permuted() for _ in range(reps)])[:positions]
    lps = np.concatenate([jittered() for _ in range(reps)])[:positions].astype(np.float32)
    rows = positions // seq_len
    ids, lps = ids[: rows * seq_len], lps[: rows * seq_len]
    tokens = rng.integers(0, vocab, size=(rows, seq_len), dtype=np.int32)
    n = rows * seq_len

    def nested(flat: np.ndarray, typ: pa.DataType) -> pa.Array:
        inner = pa.ListArray.from_arrays(
            pa.array(np.arange(n + 1, dtype=np.int32) * k), pa.array(flat.reshape(-1), typ)
        )
        return pa.ListArray.from_arrays(
            pa.array(np.arange(rows + 1, dtype=np.int32) * seq_len), inner
        )

    table = pa.table(
        {
            "input_ids": pa.array(tokens.tolist(), pa.list_(pa.int32())),
            "target_token_ids": nested(ids.astype(np.int32), pa.int32()),
            "target_logprobs": nested(lps, pa.float32()),
            "target_mask": pa.array(
                np.ones((rows, seq_len), np.uint8).tolist(), pa.list_(pa.uint8())
            ),
        }
    )
    pq.write_table(table, path, compression="zstd", row_group_size=64)
    return ids, lps, vocab


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--positions", type=int, default=100_000)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--level", type=int, default=15, help="zstd level of the cache")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "source.parquet"
        ids, lps, vocab = build_source(src, args.positions, args.k, args.seq_len)
        cache = os.path.join(tmp, "cache")
        t0 = time.perf_counter()
        res = import_cache(
            ImportConfig(
                str(src), cache, layout="axolotl", vocab_size=vocab, compression_level=args.level
            )
        )
        t_import = time.perf_counter() - t0
        out = os.path.join(tmp, "export")
        t0 = time.perf_counter()
        exp = export_cache(cache, out, layout="plain")
        t_export = time.perf_counter() - t0
        back = pq.read_table(os.path.join(out, "part-00000.parquet"))
        back_ids = np.asarray(back.column("target_token_ids").combine_chunks().flatten().flatten())
        back_lp = np.asarray(back.column("target_logprobs").combine_chunks().flatten().flatten())
        back_ids, back_lp = back_ids.reshape(-1, args.k), back_lp.reshape(-1, args.k)
        # both sides sorted by id so entries pair up whatever the order of equal values
        o_src = np.argsort(ids, axis=1)
        o_back = np.argsort(back_ids, axis=1)
        same_ids = np.array_equal(
            np.take_along_axis(ids, o_src, 1), np.take_along_axis(back_ids, o_back, 1)
        )
        a = np.take_along_axis(lps, o_src, 1).astype(np.float64)
        b = np.take_along_axis(back_lp, o_back, 1).astype(np.float64)
        big = a >= np.log(1e-3)
        err = float(np.abs(a - b)[big].max())
        n = res.positions
        figures = {
            "positions": n,
            "k": args.k,
            "source_bytes_per_token": round(res.source_bytes / n, 2),
            "cache_bytes_per_token": round(res.cache_bytes_per_token, 2),
            "size_ratio": round(res.manifest.num_bytes / res.source_bytes, 4),
            "import_positions_per_s": round(n / t_import),
            "export_positions_per_s": round(n / t_export),
            "export_bytes_per_token": round(exp.bytes / n, 2),
            "roundtrip_ids_equal": same_ids,
            "roundtrip_max_logprob_err": round(err, 5),
        }
        print(
            f"source {figures['source_bytes_per_token']} B/token -> cache "
            f"{figures['cache_bytes_per_token']} B/token ({figures['size_ratio']:.3f}x); import "
            f"{figures['import_positions_per_s']:,} positions/s, export "
            f"{figures['export_positions_per_s']:,} positions/s"
        )
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
