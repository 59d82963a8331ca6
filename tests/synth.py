"""Synthetic but valid teacher targets for store tests (real distributions, random logits)."""

from __future__ import annotations

import numpy as np

from logitcache.format.targets import SampledTargets, TopKTargets


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def topk_targets(
    rng: np.random.Generator,
    positions: int,
    k: int,
    vocab: int,
    temperatures: tuple[float, ...] = (),
) -> TopKTargets:
    """Top-k of random peaked distributions over ``vocab`` (k may equal vocab)."""
    z = rng.standard_normal((positions, vocab)).astype(np.float64) * 3.0
    lp = log_softmax(z)
    ids = np.argsort(-lp, axis=1)[:, :k]
    top = np.take_along_axis(lp, ids, axis=1)
    rest = lp.copy()
    np.put_along_axis(rest, ids, -np.inf, axis=1)
    with np.errstate(divide="ignore"):
        mx = rest.max(axis=1, keepdims=True)
        safe = np.where(np.isfinite(mx), mx, 0.0)
        tail = np.log(np.exp(rest - safe).sum(axis=1)) + safe[:, 0]
    tail = np.where(np.isfinite(mx[:, 0]), tail, -np.inf)
    tl = np.zeros((positions, 0))
    if temperatures:
        tl = np.stack([np.log(np.exp(lp / t).sum(axis=1)) for t in temperatures], axis=1)
    return TopKTargets(
        ids=ids.astype(np.int32),
        logprobs=top.astype(np.float32),
        tail_logprob=tail.astype(np.float32),
        temperature_lognorm=tl.astype(np.float32),
    )


def sampled_targets(
    rng: np.random.Generator, positions: int, n: int, vocab: int, with_logprobs: bool = True
) -> SampledTargets:
    z = rng.standard_normal((positions, vocab)) * 3.0
    lp = log_softmax(z)
    p = np.exp(lp)
    num_unique, ids, counts, lps = [], [], [], []
    for i in range(positions):
        draws = rng.choice(vocab, size=n, p=p[i] / p[i].sum())
        u, c = np.unique(draws, return_counts=True)
        num_unique.append(len(u))
        ids.append(u)
        counts.append(c)
        lps.append(lp[i, u])

    def cat(xs: list[np.ndarray], dt: type) -> np.ndarray:
        return np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)

    return SampledTargets(
        num_unique=np.asarray(num_unique, dtype=np.int32),
        ids=cat(ids, np.int32),
        counts=cat(counts, np.int32),
        logprobs=cat(lps, np.float32) if with_logprobs else None,
        temperature_lognorm=np.zeros((positions, 0), np.float32),
    )
