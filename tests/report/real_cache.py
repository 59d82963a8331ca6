"""Caches built from real teacher distributions (``../shared/data``: SmolLM2-135M on Python's
documentation, top-256 log-probs + exact log-sum-exp over 49,152 ids), for the report's tests
and ``scripts/bench_report.py`` (which puts this folder on ``sys.path``); without that folder (a
bare clone), synthetic distributions of the same shapes.

The 2,048 real positions are reused in a seeded random order to fill as many positions as
asked; a top-k cache stores their top-k with the exact tail mass, a sampled cache n draws from
the top-256 plus the tail (a tail draw picks an id outside the top-256 uniformly, with the
tail's mass spread evenly). The coverage statistics passed to the writer are the exact ones
(captured mass, full entropy, the NLL of the true next token), as a dump records them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from logitcache.format import SampledCodec, SampledTargets, SourceInfo, TargetsInfo, TopKCodec
from logitcache.format.targets import TopKTargets
from logitcache.store import CacheHeader, CacheWriter

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "smollm2_pydoc_top256.npz"
VOCAB = 49_152


def _synthetic() -> dict[str, np.ndarray]:
    """Stand-in with the same shapes when ../shared/data is absent (a bare CI clone): Zipf-like
    top-256 probabilities holding 0.8-0.97 of the mass, the rest spread evenly over the other
    ids, so the full entropy and the NLL are exact."""
    rng = np.random.default_rng(0)
    n, w = 2048, 256
    raw = np.arange(1, w + 1) ** -1.1 * rng.uniform(0.5, 1.5, (n, w))
    raw = -np.sort(-raw, axis=1)
    mass = rng.uniform(0.8, 0.97, n)
    p = raw / raw.sum(axis=1, keepdims=True) * mass[:, None]
    tail = 1 - mass
    steps = rng.integers(1, VOCAB // w, (n, w))
    ids = (rng.integers(0, VOCAB, (n, 1)) + np.cumsum(steps, axis=1)) % VOCAB
    rest = VOCAB - w
    entropy = -(p * np.log(p)).sum(axis=1) - tail * np.log(tail / rest)
    targets = np.where(rng.random(n) < 0.7, ids[:, 0], (ids[:, -1] + 1) % VOCAB)
    return {
        "topk_ids": ids.astype(np.int32),
        "topk_logits": np.log(p),
        "logsumexp": np.zeros(n),
        "entropy": entropy,
        "targets": targets.astype(np.int32),
        "input_ids": rng.integers(0, VOCAB, n).astype(np.int32),
    }


def real() -> dict[str, np.ndarray]:
    d = np.load(DATA) if DATA.exists() else _synthetic()
    lp = (d["topk_logits"] - d["logsumexp"][:, None]).astype(np.float64)
    nll = np.full(len(lp), np.nan)
    hit = d["topk_ids"] == d["targets"][:, None]
    rows = hit.any(axis=1)
    nll[rows] = -lp[rows][hit[rows]]  # true next token inside the top-256; else unknown
    return {
        "ids": d["topk_ids"],
        "lp": lp,
        "entropy": d["entropy"].astype(np.float64),
        "nll": nll,
        "input_ids": d["input_ids"],
    }


def _topk(src: dict[str, np.ndarray], pick: np.ndarray, k: int) -> tuple[TopKTargets, np.ndarray]:
    lp = src["lp"][pick]
    tail = np.log1p(-np.exp(lp[:, :k]).sum(axis=1).clip(max=1 - 1e-12))
    t = TopKTargets(
        src["ids"][pick, :k].astype(np.int32),
        lp[:, :k].astype(np.float32),
        tail.astype(np.float32),
        np.zeros((len(pick), 0), np.float32),
    )
    return t, np.exp(lp[:, :k]).sum(axis=1)


def _sampled(
    src: dict[str, np.ndarray], pick: np.ndarray, n: int, rng: np.random.Generator
) -> tuple[SampledTargets, np.ndarray]:
    lp = src["lp"][pick]
    p = np.exp(lp)
    tail = (1 - p.sum(axis=1)).clip(min=0)
    probs = np.concatenate([p, tail[:, None]], axis=1)
    probs /= probs.sum(axis=1, keepdims=True)
    cum = probs.cumsum(axis=1)
    u = rng.random((len(pick), n))
    num_unique, ids, counts, lps, mass = [], [], [], [], []
    for i in range(len(pick)):
        draws = np.searchsorted(cum[i], u[i], side="right").clip(max=256)
        uniq, c = np.unique(draws, return_counts=True)
        row_ids = np.where(uniq < 256, src["ids"][pick[i], np.minimum(uniq, 255)], -1)
        row_lp = np.where(uniq < 256, lp[i, np.minimum(uniq, 255)], 0.0)
        if (uniq == 256).any():  # a tail draw: an id outside the top-256, chosen uniformly
            outside = np.setdiff1d(rng.integers(0, VOCAB, 300), src["ids"][pick[i]])[0]
            row_ids[uniq == 256] = outside
            row_lp[uniq == 256] = np.log(max(tail[i], 1e-30) / (VOCAB - 256))
        order = np.argsort(row_ids)
        num_unique.append(len(uniq))
        ids.append(row_ids[order])
        counts.append(c[order])
        lps.append(row_lp[order])
        mass.append(np.exp(row_lp).sum())
    t = SampledTargets(
        np.asarray(num_unique, np.int32),
        np.concatenate(ids).astype(np.int32),
        np.concatenate(counts).astype(np.int32),
        np.concatenate(lps).astype(np.float32),
        np.zeros((len(pick), 0), np.float32),
    )
    return t, np.asarray(mass)


def write_cache(
    url: str | Path,
    positions: int,
    *,
    k: int = 64,
    samples: int | None = None,
    seq_len: int = 128,
    backend: str = "zarr",
    shard_bytes: int = 1 << 20,
    compression_level: int = 3,
    seed: int = 0,
    batch_rows: int = 256,
) -> None:
    """A cache of ``positions`` positions (a multiple of ``seq_len``; every position of every
    row has a target) from the real distributions; top-k unless ``samples`` is given."""
    src = real()
    rng = np.random.default_rng(seed)
    if samples is None:
        codec: TopKCodec | SampledCodec = TopKCodec(k=k, vocab_size=VOCAB)
        info = TargetsInfo(method="topk", k=k)
    else:
        codec = SampledCodec(samples=samples, vocab_size=VOCAB, logprobs="float16")
        info = TargetsInfo(method="sampled", samples=samples, tail="none")
    hdr = CacheHeader(
        codec=codec,
        targets=info,
        seq_len=seq_len,
        vocab_size=VOCAB,
        padded_vocab_size=VOCAB,
        backend=backend,  # type: ignore[arg-type]
        compression_level=compression_level,
        teacher=SourceInfo(
            name="SmolLM2-135M-Instruct", revision="gguf-q4_1", fingerprint="ab" * 32
        ),
        tokenizer=SourceInfo(name="SmolLM2", fingerprint="cd" * 32),
        dataset=SourceInfo(name="pydoc_data.topics", fingerprint="ef" * 32),
    )
    rows = positions // seq_len
    with CacheWriter(str(url), hdr, shard_bytes=shard_bytes) as w:
        for r0 in range(0, rows, batch_rows):
            r = min(batch_rows, rows - r0)
            pick = rng.integers(0, len(src["lp"]), r * seq_len)
            if samples is None:
                t, mass = _topk(src, pick, k)
            else:
                t, mass = _sampled(src, pick, samples, rng)
            w.write(
                np.arange(r0, r0 + r),
                src["input_ids"][pick].reshape(r, seq_len),
                np.ones((r, seq_len), bool),
                t,
                captured_mass=mass,
                entropy=src["entropy"][pick],
                nll=src["nll"][pick],
            )
