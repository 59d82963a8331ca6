"""Benchmark the sparse-target codecs on real teacher distributions, beside a naive baseline.

    python scripts/bench_codec.py [--data ../shared/data/smollm2_pydoc_top256.npz] [--tile 32]

Bytes are what the store writes: each array's raw little-endian bytes through zstd at the
store's default level (``DEFAULT_COMPRESSION_LEVEL``, 15; numcodecs ``Zstd``), measured on the
2048 real positions (not tiled: repeats would flatter zstd). Speeds are measured on the positions
tiled ``--tile`` times, compressed in chunks of
one tile (so no chunk holds a repeat), on one core, best of 3: encode = codec.encode + zstd,
decode = zstd decompress + codec.decode. Naive baselines, measured in the same run: top-k = int32
ids + float16 log-probs + float16 tail; sampled = int32 ids + uint16 counts + int32 num_unique.
Quantisation KL = KL(exact || decoded) over the k stored ids plus a tail bucket, nats/token.
Bytes at other zstd levels (the writer's ``compression_level``) are printed too, with the raw
encode throughput each costs: the level trades dump-side CPU for bytes, never fidelity.
The last line is one JSON object with the headline figures.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from numcodecs import Zstd

from logitcache.format.sampled import SampledCodec
from logitcache.format.targets import SampledTargets, TopKTargets
from logitcache.format.topk import TopKCodec
from logitcache.store.header import DEFAULT_COMPRESSION_LEVEL

LEVEL = DEFAULT_COMPRESSION_LEVEL
ZSTD = Zstd(level=LEVEL)
OTHER_LEVELS = (3, 9, LEVEL)
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/data/smollm2_pydoc_top256.npz"
Arrays = dict[str, np.ndarray]


def zbytes(arrays: Arrays, level: int = LEVEL) -> int:
    z = ZSTD if level == LEVEL else Zstd(level=level)
    return sum(len(z.encode(np.ascontiguousarray(a).tobytes())) for a in arrays.values())


def by_level(arrays: Arrays, entries: int) -> dict[str, float]:
    """Bytes per entry at several zstd levels (the store's ``compression_level`` option), and
    the raw encode throughput each costs, MB/s on one core."""
    out: dict[str, float] = {}
    raw = sum(a.nbytes for a in arrays.values())
    for level in OTHER_LEVELS:
        t0 = time.perf_counter()
        out[f"zstd{level}_bytes_per_entry"] = zbytes(arrays, level) / entries
        out[f"zstd{level}_mb_per_s"] = raw / (time.perf_counter() - t0) / 1e6
    return out


def compress(arrays: Arrays, pieces: int) -> dict[str, tuple[list[bytes], str, tuple]]:
    """zstd each array in ``pieces`` equal chunks along its leading axis (one tile each)."""
    out = {}
    for name, a in arrays.items():
        chunks = [ZSTD.encode(np.ascontiguousarray(c).tobytes()) for c in np.split(a, pieces)]
        out[name] = (chunks, a.dtype.str, a.shape[1:])
    return out


def decompress(blobs: dict[str, tuple[list[bytes], str, tuple]]) -> Arrays:
    out = {}
    for name, (chunks, dtype, inner) in blobs.items():
        raw = b"".join(bytes(ZSTD.decode(c)) for c in chunks)
        out[name] = np.frombuffer(raw, dtype=dtype).reshape(-1, *inner)
    return out


def best_of(fn: Callable[[], object], repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def tile(a: np.ndarray, n: int) -> np.ndarray:
    return np.tile(a, (n,) + (1,) * (a.ndim - 1))


def topk_targets(ids: np.ndarray, lp: np.ndarray, k: int) -> tuple[TopKTargets, np.ndarray]:
    p = np.exp(lp[:, :k].astype(np.float64))
    tail = np.maximum(1.0 - p.sum(1), 1e-12)
    t = TopKTargets(
        ids[:, :k].copy(),
        lp[:, :k].copy(),
        np.log(tail).astype(np.float32),
        np.zeros((len(ids), 0), np.float32),
    )
    return t, tail


def quant_kl(
    t: TopKTargets, tail: np.ndarray, ids: np.ndarray, lq: np.ndarray, lq_tail: np.ndarray
) -> float:
    """KL(exact || decoded) over k + tail buckets; decoded entries may be in another order."""
    o1, o2 = np.argsort(t.ids, 1, kind="stable"), np.argsort(ids, 1, kind="stable")
    if not np.array_equal(np.take_along_axis(t.ids, o1, 1), np.take_along_axis(ids, o2, 1)):
        raise SystemExit("decoded ids differ from the input ids")
    lp = np.take_along_axis(t.logprobs, o1, 1).astype(np.float64)
    lq = np.take_along_axis(lq, o2, 1).astype(np.float64)
    kl = (np.exp(lp) * (lp - lq)).sum(1) + tail * (np.log(tail) - lq_tail)
    return float(kl.mean())


def bench_topk(ids: np.ndarray, lp: np.ndarray, vocab: int, k: int, reps: int) -> dict:
    t, tail = topk_targets(ids, lp, k)
    p = t.num_positions
    codec = TopKCodec(k=k, vocab_size=vocab)
    enc = codec.encode(t)
    dec = codec.decode(enc)
    naive = {
        "ids": t.ids.astype(np.int32),
        "values": t.logprobs.astype(np.float16),
        "tail": t.tail_logprob.astype(np.float16),
    }
    big = TopKTargets(
        *(tile(a, reps) for a in (t.ids, t.logprobs, t.tail_logprob, t.temperature_lognorm))
    )
    big_naive = {n: tile(a, reps) for n, a in naive.items()}
    blobs, nblobs = compress(codec.encode(big), reps), compress(big_naive, reps)

    def naive_decode() -> None:
        a = decompress(nblobs)
        a["ids"].astype(np.int32, copy=False), a["values"].astype(np.float32)
        a["tail"].astype(np.float32)

    def naive_encode() -> None:
        compress(
            {
                "ids": big.ids.astype(np.int32),
                "values": big.logprobs.astype(np.float16),
                "tail": big.tail_logprob.astype(np.float16),
            },
            reps,
        )

    n = p * reps
    return {
        "k": k,
        "levels": codec.levels,
        "bytes_per_entry": zbytes(enc) / t.ids.size,
        "bytes_per_token": zbytes(enc) / p,
        **by_level(enc, t.ids.size),
        "naive_bytes_per_entry": zbytes(naive) / t.ids.size,
        "quant_kl": quant_kl(t, tail, dec.ids, dec.logprobs, dec.tail_logprob),
        "expected_kl": codec.expected_kl(),
        "naive_quant_kl": quant_kl(
            t, tail, t.ids, naive["values"].astype(np.float32), naive["tail"].astype(np.float64)
        ),
        "encode_pos_s": n / best_of(lambda: compress(codec.encode(big), reps)),
        "naive_encode_pos_s": n / best_of(naive_encode),
        "decode_pos_s": n / best_of(lambda: codec.decode(decompress(blobs))),
        "naive_decode_pos_s": n / best_of(naive_decode),
    }


def draw_samples(ids: np.ndarray, lp: np.ndarray, n: int, seed: int) -> SampledTargets:
    """n draws per position from the top-256 distribution renormalised (the tail is not sampled)."""
    p = np.exp(lp.astype(np.float64))
    cdf = np.cumsum(p / p.sum(1, keepdims=True), axis=1)
    cdf[:, -1] = 1.0
    rows = np.arange(len(p))[:, None]
    u = np.random.default_rng(seed).random((len(p), n))
    col = np.searchsorted((cdf + rows).ravel(), (u + rows).ravel(), side="right")
    col = np.minimum(col.reshape(len(p), n) - rows * cdf.shape[1], cdf.shape[1] - 1)
    drawn = np.take_along_axis(ids, col, 1).astype(np.int64)
    keys, counts = np.unique((rows * (1 << 20) + drawn).ravel(), return_counts=True)
    pos, tok = keys >> 20, keys & ((1 << 20) - 1)
    num_unique = np.bincount(pos, minlength=len(p)).astype(np.int32)
    lp_of = dict(zip((rows * (1 << 20) + ids).ravel().tolist(), lp.ravel().tolist(), strict=True))
    logprobs = np.array([lp_of[int(x)] for x in keys], dtype=np.float32)
    return SampledTargets(
        num_unique,
        tok.astype(np.int32),
        counts.astype(np.int32),
        logprobs,
        np.zeros((len(p), 0), np.float32),
    )


def bench_sampled(ids: np.ndarray, lp: np.ndarray, vocab: int, n: int, reps: int) -> dict:
    t = draw_samples(ids, lp, n, seed=n)
    t_nolp = SampledTargets(t.num_unique, t.ids, t.counts, None, t.temperature_lognorm)
    codec = SampledCodec(n=n, vocab_size=vocab)
    codec_lp = SampledCodec(n=n, vocab_size=vocab, logprobs="uint8")
    enc = codec.encode(t_nolp)
    dec = codec.decode(enc)
    if not (np.array_equal(dec.ids, t.ids) and np.array_equal(dec.counts, t.counts)):
        raise SystemExit("sampled round trip failed")
    naive = {
        "num_unique": t.num_unique.astype(np.int32),
        "ids": t.ids.astype(np.int32),
        "counts": t.counts.astype(np.uint16),
    }
    e = t.ids.size
    reps_t = SampledTargets(
        tile(t.num_unique, reps),
        tile(t.ids, reps),
        tile(t.counts, reps),
        None,
        tile(t.temperature_lognorm, reps),
    )
    # Chunks of one tile: the entry arrays are cut at the same position boundaries.
    blobs = compress(codec.encode(reps_t), reps)
    nblobs = compress({name: tile(a, reps) for name, a in naive.items()}, reps)

    def naive_decode() -> None:
        a = decompress(nblobs)
        a["ids"].astype(np.int32, copy=False), a["counts"].astype(np.int32)

    def encode() -> None:
        compress(codec.encode(reps_t), reps)

    npos = t.num_positions * reps
    return {
        "n": n,
        "mean_unique": e / t.num_positions,
        "bytes_per_entry": zbytes(enc) / e,
        **by_level(enc, e),
        "bytes_per_token": zbytes(enc) / t.num_positions,
        "bytes_per_entry_with_uint8_logprobs": zbytes(codec_lp.encode(t)) / e,
        "naive_bytes_per_entry": zbytes(naive) / e,
        "encode_pos_s": npos / best_of(encode),
        "decode_pos_s": npos / best_of(lambda: codec.decode(decompress(blobs))),
        "naive_decode_pos_s": npos / best_of(naive_decode),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--tile", type=int, default=32)
    args = ap.parse_args()
    d = np.load(args.data)
    vocab = int(d["vocab_size"])
    lp = (d["topk_logits"] - d["logsumexp"][:, None]).astype(np.float32)
    ids = d["topk_ids"].astype(np.int32)
    print(f"{len(ids)} positions, vocab {vocab}; speeds on x{args.tile} tiles, one core\n")
    top = [bench_topk(ids, lp, vocab, k, args.tile) for k in (12, 32, 64, 128)]
    print(
        f"{'top-k':>6} {'lvls':>4} {'B/entry':>8} {'naive':>6} {'B/token':>8} {'quant KL':>9} "
        f"{'expect':>8} {'naive KL':>9} {'enc pos/s':>10} {'naive':>10} {'dec pos/s':>10} "
        f"{'naive':>10}"
    )
    for r in top:
        print(
            f"{r['k']:>6} {r['levels']:>4} {r['bytes_per_entry']:>8.3f} "
            f"{r['naive_bytes_per_entry']:>6.2f} {r['bytes_per_token']:>8.1f} "
            f"{r['quant_kl']:>9.2e} {r['expected_kl']:>8.2e} {r['naive_quant_kl']:>9.2e} "
            f"{r['encode_pos_s']:>10.3g} {r['naive_encode_pos_s']:>10.3g} "
            f"{r['decode_pos_s']:>10.3g} {r['naive_decode_pos_s']:>10.3g}"
        )
    smp = [bench_sampled(ids, lp, vocab, n, args.tile) for n in (16, 50)]
    print("\nsampled: n draws from the top-256 renormalised (the tail is not sampled)")
    print(
        f"{'n':>6} {'uniq':>5} {'B/entry':>8} {'naive':>6} {'+lp u8':>7} {'B/token':>8} "
        f"{'enc pos/s':>10} {'dec pos/s':>10} {'naive':>10}"
    )
    for r in smp:
        print(
            f"{r['n']:>6} {r['mean_unique']:>5.1f} {r['bytes_per_entry']:>8.3f} "
            f"{r['naive_bytes_per_entry']:>6.2f} "
            f"{r['bytes_per_entry_with_uint8_logprobs']:>7.3f} {r['bytes_per_token']:>8.1f} "
            f"{r['encode_pos_s']:>10.3g} {r['decode_pos_s']:>10.3g} "
            f"{r['naive_decode_pos_s']:>10.3g}"
        )
    k64, s50 = top[2], smp[1]
    print("\nzstd level (store option compression_level): bytes/entry (raw encode MB/s, 1 core)")
    for name, r in (("top-64", k64), ("sampled-50", s50)):
        print(
            f"{name:>10}: "
            + ", ".join(
                f"level {lv} {r[f'zstd{lv}_bytes_per_entry']:.3f} "
                f"({r[f'zstd{lv}_mb_per_s']:.1f} MB/s)"
                for lv in OTHER_LEVELS
            )
        )
    summary = {
        "topk64_bytes_per_entry": round(k64["bytes_per_entry"], 4),
        "topk64_quant_kl": float(f"{k64['quant_kl']:.4g}"),
        "sampled50_bytes_per_entry": round(s50["bytes_per_entry"], 4),
        "decode_positions_per_s_k64": round(k64["decode_pos_s"]),
        "compression_level": LEVEL,
        "zstd_encode_mb_per_s_k64": round(k64[f"zstd{LEVEL}_mb_per_s"], 2),
        "topk64_bytes_per_entry_zstd3": round(k64["zstd3_bytes_per_entry"], 4),
        "sampled50_bytes_per_entry_zstd3": round(s50["zstd3_bytes_per_entry"], 4),
        "decode_vs_naive_k64": round(k64["decode_pos_s"] / k64["naive_decode_pos_s"], 3),
        "topk_bytes_per_entry": {r["k"]: round(r["bytes_per_entry"], 4) for r in top},
        "topk_quant_kl": {r["k"]: float(f"{r['quant_kl']:.4g}") for r in top},
        "topk_naive_bytes_per_entry": {r["k"]: round(r["naive_bytes_per_entry"], 4) for r in top},
        "sampled_bytes_per_entry": {r["n"]: round(r["bytes_per_entry"], 4) for r in smp},
        "sampled16_bytes_per_entry": round(smp[0]["bytes_per_entry"], 4),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
