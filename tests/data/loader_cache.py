"""Small real caches for the loader tests: random peaked distributions, uneven shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from logitcache.format import SampledCodec, SampledTargets, TopKCodec, TopKTargets
from logitcache.format.manifest import SourceInfo, TargetsInfo
from logitcache.store import CacheHeader, CacheWriter

VOCAB = 97
SEQ = 12
TEMPS = (2.0,)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def topk_targets(rng: np.random.Generator, p: int, k: int) -> TopKTargets:
    lp = _log_softmax(rng.standard_normal((p, VOCAB)) * 3.0)
    ids = np.argsort(-lp, axis=1)[:, :k]
    top = np.take_along_axis(lp, ids, axis=1)
    rest = np.exp(lp).sum(axis=1) - np.exp(top).sum(axis=1)
    tl = np.stack([np.log(np.exp(lp / t).sum(axis=1)) for t in TEMPS], axis=1)
    return TopKTargets(
        ids=ids.astype(np.int32),
        logprobs=top.astype(np.float32),
        tail_logprob=np.log(np.maximum(rest, 1e-30)).astype(np.float32),
        temperature_lognorm=tl.astype(np.float32),
    )


def sampled_targets(rng: np.random.Generator, p: int, n: int) -> SampledTargets:
    lp = _log_softmax(rng.standard_normal((p, VOCAB)) * 3.0)
    nu, ids, counts, lps = [], [], [], []
    for i in range(p):
        pr = np.exp(lp[i])
        u, c = np.unique(rng.choice(VOCAB, size=n, p=pr / pr.sum()), return_counts=True)
        nu.append(len(u))
        ids.append(u)
        counts.append(c)
        lps.append(lp[i, u])
    return SampledTargets(
        num_unique=np.asarray(nu, np.int32),
        ids=np.concatenate(ids).astype(np.int32),
        counts=np.concatenate(counts).astype(np.int32),
        logprobs=np.concatenate(lps).astype(np.float32),
        temperature_lognorm=np.zeros((p, 0), np.float32),
    )


def build_cache(
    path: Path,
    *,
    rows: int = 53,
    kind: str = "topk",
    values: str = "sqrt",
    k: int = 8,
    backend: str = "zarr",
    seed: int = 0,
) -> str:
    """A committed cache of ``rows`` rows (row ids 1000+i) in several uneven shards."""
    rng = np.random.default_rng(seed)
    if kind == "topk":
        codec: TopKCodec | SampledCodec = TopKCodec(
            k=k, vocab_size=VOCAB, num_temperatures=len(TEMPS), values=values
        )
        info = TargetsInfo(method="topk", k=k, temperatures=TEMPS)
    else:
        codec = SampledCodec(samples=16, vocab_size=VOCAB, logprobs="uint8")
        info = TargetsInfo(method="sampled", samples=16, tail="none")
    header = CacheHeader(
        codec=codec,
        targets=info,
        seq_len=SEQ,
        vocab_size=VOCAB,
        padded_vocab_size=VOCAB + 3,
        backend=backend,  # type: ignore[arg-type]
        teacher=SourceInfo(name="synthetic", fingerprint="cd" * 32),
    )
    url = str(path)
    with CacheWriter(url, header, shard_bytes=2500) as w:
        start = 0
        for n in (5, 11, 7, 13, 4, 9, 4):
            n = min(n, rows - start)
            if n <= 0:
                break
            ids = rng.integers(0, VOCAB, (n, SEQ))
            mask = rng.random((n, SEQ)) > 0.25
            mask[0, :] = False  # a row without targets
            p = int(mask.sum())
            t = topk_targets(rng, p, k) if kind == "topk" else sampled_targets(rng, p, 16)
            w.write(np.arange(start, start + n) + 1000, ids, mask, t)
            start += n
    return url
