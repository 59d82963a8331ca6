"""The seeded randomness of sampled targets, shared by the one-process and tensor-parallel paths.

:func:`uniforms` gives each ``(seed, row, position, draw)`` its own uniform in (0, 1) as a pure
function (a chain of 32-bit integer hashes on int64 tensors, the same on every device and at any
batch split), so a resumed or re-split dump draws what an uninterrupted one drew; with
``levels`` it gives the tree rule one stream per level (:mod:`logitcache.dump.tree_sampling`).
The inverse-CDF stream is pinned by ``tests/dump/test_sampling_rule.py``: caches dumped with it
must keep drawing the same ids when resumed. :func:`distinct_draws` turns sorted draws into the
sampled codec's layout (distinct ids, counts, owners).
"""

from __future__ import annotations

import torch

__all__ = ["distinct_draws", "uniforms"]

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x * c) mod 2^32 for x, c < 2^32 without int64 overflow: split x into 16-bit halves.
    lo = (x & 0xFFFF) * c
    hi = ((x >> 16) * c) & 0xFFFF
    return (lo + (hi << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # "lowbias32" integer hash (hash-prospector); int64 tensors holding values in [0, 2^32).
    x = x ^ (x >> 16)
    x = _mul32(x, 0x21F0AAAD)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x735A2D97)
    return x ^ (x >> 15)


def uniforms(
    seed: int,
    row_ids: torch.Tensor,
    positions: torch.Tensor,
    num_draws: int,
    levels: int | None = None,
) -> torch.Tensor:
    """[N, num_draws] float32 uniforms in (0, 1), a pure function of (seed, row, position, draw)
    (the inverse-CDF rule's). With ``levels``: [levels, N, num_draws], one per tree level (the
    tree rule's streams 1 .. levels; stream 0, the default, is unchanged)."""
    dev = row_ids.device
    h = torch.full_like(row_ids, (seed & _M32) ^ 0x9E3779B9)
    h = _mix32(h)
    h = _mix32(h ^ ((seed >> 32) & _M32))
    h = _mix32(h ^ (row_ids & _M32))
    h = _mix32(h ^ ((row_ids >> 32) & _M32))
    h = _mix32(h ^ (positions & _M32))
    draws = torch.arange(num_draws, device=dev, dtype=torch.int64)
    g = _mix32(h[:, None] ^ (draws[None, :] * 0x9E3779B9 & _M32))
    if levels is not None:  # stream s: mix(g ^ s * c); stream 0 (mix(g)) is the inverse-CDF rule's
        streams = torch.arange(1, levels + 1, device=dev, dtype=torch.int64) * 0x85EBCA6B & _M32
        g = g[None] ^ streams[:, None, None]
    g = _mix32(g)
    return ((g >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def distinct_draws(drawn: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """For draws sorted per position ([n, samples] ids): the flat index of each distinct id's
    first draw, the distinct ids, their counts, the position owning each, and the number of
    distinct ids per position (the layout of SampledTargets). Shared by the one-rank and the
    tensor-parallel sparsify."""
    n, samples = drawn.shape
    starts = torch.ones_like(drawn, dtype=torch.bool)
    starts[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
    first = starts.reshape(-1).nonzero().squeeze(1)
    ends = torch.cat([first[1:], first.new_tensor([n * samples])])
    return first, drawn.reshape(-1)[first], ends - first, first // samples, starts.sum(dim=1)
