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

Id layouts: every top-k figure uses the default ``id_layout="hi-delta"``; ``*_delta_layout`` is
the same data in the layout of caches before format 1.2, measured in the same run.

262,144-token vocabulary (``*_v262k``): the real top-64 with its ids spread into [0, 262144) by a
fixed (seeded) random injective map, three ways: ``frequency`` (the headline): order-preserving,
the slot density falling like ``1/sqrt(slot)`` (a large BPE vocabulary keeps frequent tokens at
low ids and spreads rare ones); calibrated on the one real measurement we have, a 262k teacher
whose old-layout high plane cost 0.40 B/entry (this map: 0.39); ``uniform``: order-preserving,
uniform density (a harder case: ids 5.3x farther apart everywhere); ``random``: a random
permutation (the worst case: no order survives).

Loss error of the value quantiser (``*_rel_err_<loss>``): the relative error of each loss (sum
over the 2048 positions) when the teacher's top-64 values are sqrt-quantised (or float16)
instead of float32, against a student = the teacher's logits (top-256 known, the rest of the
mass spread evenly over the other ids) plus Gaussian noise of std ``--student-noise``
(default 1.0: a partly trained student; 0.3: a nearly converged one is also printed).
The last line is one JSON object with the headline figures.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from numcodecs import Zstd

from logitcache.format.sampled import SampledCodec
from logitcache.format.targets import SampledTargets, TopKTargets
from logitcache.format.topk import TopKCodec
from logitcache.loss import TopKTeacher, kd_loss
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


def spread_ids(ids: np.ndarray, v0: int, vocab: int, how: str) -> np.ndarray:
    """Ids of a ``v0``-token vocabulary spread into ``[0, vocab)`` (see the module docstring)."""
    rng = np.random.default_rng(262_144)
    if how == "random":
        slots = rng.permutation(vocab)[:v0]
    elif how == "uniform":
        slots = np.sort(rng.choice(vocab, v0, replace=False))
    else:
        w = (np.arange(vocab) + 1.0) ** -0.5
        slots = np.sort(rng.choice(vocab, v0, replace=False, p=w / w.sum()))
    return slots[ids].astype(np.int32)


def topk_bytes(ids: np.ndarray, lp: np.ndarray, vocab: int, k: int, layout: str) -> dict:
    """Bytes per entry of each array (and the total), one layout."""
    t, _ = topk_targets(ids, lp, k)
    enc = TopKCodec(k=k, vocab_size=vocab, id_layout=layout).encode(t)
    out = {name: zbytes({name: a}) / t.ids.size for name, a in enc.items()}
    out["total"] = sum(out.values())
    return out


def loss_errors(ids: np.ndarray, lp: np.ndarray, d: np.lib.npyio.NpzFile, noise: float) -> dict:
    """Relative error of each top-k loss with quantised teacher values (module docstring)."""
    k, vocab, chunk = 64, int(d["vocab_size"]), 256
    t, _ = topk_targets(ids, lp, k)
    modes = {"float32": t}
    for values in ("sqrt", "float16"):
        codec = TopKCodec(k=k, vocab_size=vocab, values=values)
        modes[values] = codec.decode(codec.encode(t))
    logits, lse = d["topk_logits"].astype(np.float64), d["logsumexp"].astype(np.float64)
    rest = np.log(np.maximum(np.exp(lse) - np.exp(logits).sum(1), 1e-30) / (vocab - 256))
    rng = np.random.default_rng(0)
    sums = {(m, loss): 0.0 for m in modes for loss in LOSSES}
    for c0 in range(0, len(ids), chunk):
        sl = slice(c0, c0 + chunk)
        z = np.repeat(rest[sl, None], vocab, axis=1)
        np.put_along_axis(z, d["topk_ids"][sl].astype(np.int64), logits[sl], axis=1)
        z += rng.normal(0.0, noise, z.shape)
        student = torch.from_numpy(z.astype(np.float32))
        for m, tt in modes.items():
            teacher = TopKTeacher(
                ids=torch.from_numpy(tt.ids[sl].astype(np.int64)),
                logprobs=torch.from_numpy(tt.logprobs[sl]),
                tail_logprob=torch.from_numpy(tt.tail_logprob[sl]),
            )
            for loss in LOSSES:
                sums[m, loss] += float(kd_loss(student, teacher, loss=loss)[0])
    out: dict[str, float] = {}
    for loss in LOSSES:
        ref = sums["float32", loss]
        out[f"loss_{loss}"] = ref / len(ids)
        for m in ("sqrt", "float16"):
            out[f"{m}_rel_err_{loss}"] = abs(sums[m, loss] - ref) / ref
    return out


LOSSES = ("kl", "reverse-kl", "jsd", "kl-renorm")


def bench_topk(ids: np.ndarray, lp: np.ndarray, vocab: int, k: int, reps: int) -> dict:
    t, tail = topk_targets(ids, lp, k)
    p = t.num_positions
    codec = TopKCodec(k=k, vocab_size=vocab)
    enc = codec.encode(t)
    old = TopKCodec(k=k, vocab_size=vocab, id_layout="delta").encode(t)
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
        "delta_layout_bytes_per_entry": zbytes(old) / t.ids.size,
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
    codec = SampledCodec(samples=n, vocab_size=vocab)
    codec_lp = SampledCodec(samples=n, vocab_size=vocab, logprobs="uint8")
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
        "bytes_per_token_with_uint8_logprobs": zbytes(codec_lp.encode(t)) / t.num_positions,
        "naive_bytes_per_entry": zbytes(naive) / e,
        "encode_pos_s": npos / best_of(encode),
        "decode_pos_s": npos / best_of(lambda: codec.decode(decompress(blobs))),
        "naive_decode_pos_s": npos / best_of(naive_decode),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--tile", type=int, default=32)
    ap.add_argument("--student-noise", type=float, default=1.0)
    args = ap.parse_args()
    torch.set_num_threads(1)
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
    smp = [bench_sampled(ids, lp, vocab, n, args.tile) for n in (16, 50, 64)]
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
    k64, s50, s64 = top[2], smp[1], smp[2]
    print("\ntop-64 at vocabulary 262,144 (ids spread by a fixed map), bytes/entry by array:")
    v262: dict[str, dict] = {}
    for how in ("frequency", "uniform", "random"):
        spread = spread_ids(ids, vocab, 262_144, how)
        for layout in ("hi-delta", "delta"):
            r = topk_bytes(spread, lp, 262_144, 64, layout)
            v262[f"{how}/{layout}"] = r
            print(f"{how:>10} {layout:>9}: " + ", ".join(f"{n} {x:.3f}" for n, x in r.items()))
    errs = {}
    for noise in sorted({args.student_noise, 0.3}, reverse=True):
        errs[noise] = loss_errors(ids, lp, d, noise)
        print(f"\nloss error of quantised teacher values, student = teacher + N(0, {noise}^2):")
        for loss in LOSSES:
            e = errs[noise]
            print(
                f"{loss:>11}: loss {e[f'loss_{loss}']:.4f} nats/position, relative error sqrt "
                f"{e[f'sqrt_rel_err_{loss}']:.2e}, float16 {e[f'float16_rel_err_{loss}']:.2e}"
            )
    err = errs[args.student_noise]
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
        "topk64_bytes_per_entry_delta_layout": round(k64["delta_layout_bytes_per_entry"], 4),
        "topk64_bytes_per_entry_v262k": round(v262["frequency/hi-delta"]["total"], 4),
        "topk64_bytes_per_entry_v262k_delta_layout": round(v262["frequency/delta"]["total"], 4),
        **{
            f"topk64_bytes_per_entry_v262k_{how}{suffix}": round(v262[f"{how}/{lay}"]["total"], 4)
            for how in ("uniform", "random")
            for lay, suffix in (("hi-delta", ""), ("delta", "_delta_layout"))
        },
        "sampled50_bytes_per_entry_uint8_logprobs": round(
            s50["bytes_per_entry_with_uint8_logprobs"], 4
        ),
        "sampled64_bytes_per_token_uint8_logprobs": round(
            s64["bytes_per_token_with_uint8_logprobs"], 2
        ),
        "sampled64_bytes_per_token": round(s64["bytes_per_token"], 2),
        "student_noise": args.student_noise,
        **{
            f"sqrt_rel_err_{x.replace('-', '_')}": float(f"{err[f'sqrt_rel_err_{x}']:.3g}")
            for x in LOSSES
        },
        **{
            f"float16_rel_err_{x.replace('-', '_')}": float(f"{err[f'float16_rel_err_{x}']:.3g}")
            for x in LOSSES
        },
        **{
            f"sqrt_rel_err_{x.replace('-', '_')}_student_noise_0.3": float(
                f"{errs[0.3][f'sqrt_rel_err_{x}']:.3g}"
            )
            for x in LOSSES
        },
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
