"""The "tree" sampling rule: draws that do not move when the logits move by their rounding.

**The rule.** Ids ``0 .. V_pad - 1`` (``V_pad`` the next power of two of the real vocabulary;
ids beyond it have mass 0) are the leaves of a fixed binary tree of depth ``D = log2 V_pad``. A
draw walks from the root: at depth ``l`` it goes to the left child iff
``u_l * (m_left + m_right) < m_left``, with its own uniform ``u_l`` per
``(seed, row, position, draw, level)`` (:func:`logitcache.dump.draws.uniforms` with
``levels``), ``m`` the children's unnormalised masses ``exp(z - max)``. The product of the
conditionals is ``p_i``: exact sampling, the same law as inverse CDF, other ids.

**Why, and what it buys.** Inverse CDF over the vocabulary in id order (the rule before, kept as
``"inverse-cdf"`` for caches dumped with it) uses one uniform per draw against the *absolute*
cumulative mass: a tensor-parallel forward shifts the logits by ~1e-5..1e-4, the CDF by ~1e-5
absolute, and a uniform landing in a long stretch of tiny-probability ids slides across many of
them. Here a draw changes only if some decision on its path flips, i.e. ``u_l`` falls between the
old and new conditional ratio ``m_left / (m_left + m_right)``; a relative mass error ``delta``
moves a ratio by at most ``r (1 - r) * 2 delta <= delta / 2``, so a draw flips with probability
at most ~``D * delta / 2`` *whatever the masses are*: the error is relative, not absolute.
That needs node masses with relative precision, so they are pairwise (segment-tree) sums of the
leaves, never differences of a cumulative sum (which cancel): float32 inside groups of 32 ids
(relative error <= 5 x 2^-24 = 3e-7, 300x below a TP forward's 1e-4), float64 above. Float64 from
the leaves up cost 7x more (1.56 vs 0.22 ms per 10 rows at vocab 49k on one CPU core, against
0.28 ms for the cumsum of inverse CDF): not worth it for a precision no decision can see.
Uniforms have 24 bits, so each conditional is resolved to 2^-24.

Measured (``tests/dump/test_sampling_rule.py``: vocab 49,152, Zipf ranks in random id order plus
noise, 128 positions x 64 draws, logits perturbed by N(0, 1e-4)): 8.6% of the draws moved with
inverse CDF (a heavy tail of tiny ids), 1.2e-4 with the tree. SmolLM2-135M at T=3 against one
process: see ``scripts/bench_dump.py``.

**Cost, and the layout that keeps it small.** Only the masses of the nodes at level
``c = LEAF_LEVELS`` (groups of 32 ids) and above are kept: ``V / 32`` float64 per position
(1/16 of the float32 logits), built from ``exp(z')`` pairwise while it is in the cache. The walk
runs once per chunk (not per 2 MiB block: ~16 gathers per level are launch-bound on few rows):
down to level ``c`` through the stored masses, then each draw's group of 32 ids is gathered from
the chunk's logits ``z'`` (still in place), exponentiated and summed pairwise again (the same
float operations in the same order: the same masses), and the walk ends there. The walk goes in
groups of rows so its ``[rows, draws, 32]`` temporaries stay under ``_WALK_BYTES``. Measured
on 512 positions of real SmolLM2-135M logits (vocab 49,152), one CPU thread, ``sparsify_chunk``
alone, min of 7 interleaved runs: tree 141 ms at 16 draws and 194 ms at 64, inverse CDF 167 and
173 ms (top-64: 163 ms), i.e. 0.85x and 1.12x (no cumsum over the vocabulary; the walk grows with
the draws). For scale: SmolLM2's base model took 1,767 ms for 2,044 positions on 2 cores
(:mod:`logitcache.dump.sparsify`). ``scripts/bench_dump.py`` reports the ratio as
``sampling_tree_vs_inverse_cdf_ratio``.

**Tensor parallel.** Rank ``r`` holds the real ids ``[a, b)`` (any alignment; a rank of padded
rows only holds none). It builds the level-``c`` masses of the groups that intersect its range
from its own leaves (the others count 0), in its own frame, scaled to the group's frame
(``exp(m_r - M)``) when they travel. Per level, one ``all_reduce(SUM)`` of the children's
partial masses ``[2, rows, draws]`` (float64) gives every rank the same node masses, so every
rank takes the same decisions; the leaf's logit comes from its owner (one more all_reduce, one
non-zero term: exact). Nothing of vocabulary size is ever gathered.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["LEAF_LEVELS", "group_masses", "tree_depth", "tree_walk"]

LEAF_LEVELS = 5  # the walk's last 5 levels are rebuilt per draw from 32 logits
_WALK_BYTES = 64 << 20
_F64 = torch.float64


def tree_depth(vocab: int) -> int:
    """Levels of the tree over ``vocab`` ids: ``log2`` of the next power of two."""
    return max(0, (vocab - 1).bit_length())


def _pair_sums(x: torch.Tensor, start: int) -> tuple[torch.Tensor, int]:
    """Parent masses [r, m] of the nodes ``start .. start + w`` of one level, ``x`` [r, w]
    (absent siblings count 0: ``a + 0`` is exact), and the parents' first index."""
    r, w = x.shape
    lead = start & 1  # x[:, 0] is a right child whose left sibling lies outside
    end = lead + (w - lead) // 2 * 2
    parts = []
    if lead and w:
        parts.append(x[:, :1])
    if end > lead:
        parts.append(x[:, lead:end:2] + x[:, lead + 1 : end : 2])
    if end < w:  # a left child whose right sibling lies outside
        parts.append(x[:, end:])
    if len(parts) == 1:
        return parts[0], start >> 1
    return (torch.cat(parts, dim=1) if parts else x.new_zeros((r, 0))), start >> 1


def group_masses(e: torch.Tensor, offset: int, vocab: int) -> torch.Tensor:
    """Masses [r, groups] of the level-``LEAF_LEVELS`` nodes (groups of 32 ids) that intersect
    the ids ``offset .. offset + w`` held by ``e`` [r, w] (non-negative float32), summed
    pairwise in float32, returned as float64. The first column is node ``offset >> 5``."""
    x, s = e, offset
    for _ in range(min(LEAF_LEVELS, tree_depth(vocab))):
        x, s = _pair_sums(x, s)
    return x.to(_F64)


def _take(level: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """level[row, idx] for idx [r, d] (local indices), 0 outside the stored range."""
    w = level.shape[1]
    if w == 0:
        return level.new_zeros(idx.shape)
    inside = (idx >= 0) & (idx < w)
    got = level.gather(1, idx.clamp(0, w - 1))
    return torch.where(inside, got, 0.0)


Reduce = Callable[[torch.Tensor], None]


def _decide(
    left: torch.Tensor,
    m_left: torch.Tensor,
    m_right: torch.Tensor,
    u: torch.Tensor,
    scale: torch.Tensor | None,
    reduce: Reduce | None,
) -> torch.Tensor:
    """The child each draw goes to: left (``left``) iff u (m_left + m_right) < m_left."""
    pair = torch.stack([m_left, m_right])
    if scale is not None:
        pair.mul_(scale[None, :, None])
    if reduce is not None:
        reduce(pair)
    go_left = u.to(_F64) * (pair[0] + pair[1]) < pair[0]
    return torch.where(go_left, left, left + 1)


def tree_walk(
    groups: torch.Tensor,
    z: torch.Tensor,
    offset: int,
    vocab: int,
    u: torch.Tensor,
    *,
    scale: torch.Tensor | None = None,
    logit_shift: torch.Tensor | None = None,
    reduce: Reduce | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Walk every draw down the tree; returns the global ids [N, d] and their logits [N, d].

    ``groups`` [N, G]: :func:`group_masses` of this rank's leaves; ``z`` [N, w] float32: the
    logits (minus a per-row constant) of ids ``offset .. offset + w``; ``u`` [depth, N, d]:
    one uniform per level. Tensor parallel: ``scale`` [N] brings this rank's masses to the
    group's frame, ``logit_shift`` [N] its logits, ``reduce`` (an in-place all_reduce SUM)
    merges every rank's partial masses (every rank must call with the same N and d)."""
    n, d = u.shape[1], u.shape[2]
    c = min(LEAF_LEVELS, tree_depth(vocab))
    rows = max(1, _WALK_BYTES // (max(d, 1) * (1 << c) * 48))
    outs = [
        _walk_rows(
            groups[lo : lo + rows],
            z[lo : lo + rows],
            offset,
            vocab,
            u[:, lo : lo + rows],
            None if scale is None else scale[lo : lo + rows].to(_F64),
            None if logit_shift is None else logit_shift[lo : lo + rows],
            reduce,
        )
        for lo in range(0, n, rows)
    ]
    if not outs:
        empty = torch.zeros((0, d), dtype=torch.long, device=z.device)
        return empty, empty.float()
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def _walk_rows(
    groups: torch.Tensor,
    z: torch.Tensor,
    offset: int,
    vocab: int,
    u: torch.Tensor,
    scale: torch.Tensor | None,
    logit_shift: torch.Tensor | None,
    reduce: Reduce | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    n, d = u.shape[1], u.shape[2]
    depth = tree_depth(vocab)
    c = min(LEAF_LEVELS, depth)
    # the stored levels: c (the groups) up to the root, each with its first node's index
    levels = [(groups.to(_F64), offset >> c)]
    for _ in range(depth - c):
        levels.append(_pair_sums(*levels[-1]))
    node = torch.zeros((n, d), dtype=torch.long, device=z.device)
    for step, k in enumerate(range(depth, c, -1)):  # children at level k - 1
        level, first = levels[k - 1 - c]
        left = node * 2
        node = _decide(
            left, _take(level, left - first), _take(level, left + 1 - first), u[step], scale, reduce
        )
    # the last c levels: each draw's group of 2^c ids, rebuilt from the logits
    width = 1 << c
    local = (node * width - offset)[..., None] + torch.arange(width, device=z.device)
    w = z.shape[1]
    inside = (local >= 0) & (local < w)
    if w:
        zl = z.gather(1, local.clamp(0, w - 1).reshape(n, -1)).view(n, d, width)
        zl = torch.where(inside, zl, float("-inf"))
    else:
        zl = z.new_full((n, d, width), float("-inf"))
    mini = [torch.exp(zl)]  # the same float32 pairwise sums as group_masses
    for _ in range(c):
        mini.append(mini[-1][..., 0::2] + mini[-1][..., 1::2])
    pos = torch.zeros((n, d), dtype=torch.long, device=z.device)
    for step in range(depth - c, depth):
        level = mini[depth - 1 - step]
        left = pos * 2
        m_left = level.gather(2, left[..., None]).squeeze(2)
        m_right = level.gather(2, left[..., None] + 1).squeeze(2)
        pos = _decide(left, m_left, m_right, u[step], scale, reduce)
    ids = node * width + pos
    logit = zl.gather(2, pos[..., None]).squeeze(2)
    if reduce is not None:  # only the owner holds the leaf: one non-zero term per draw
        owned = inside.gather(2, pos[..., None]).squeeze(2)
        if logit_shift is not None:
            logit = logit + logit_shift[:, None]
        logit = torch.where(owned, logit, 0.0).to(_F64)
        reduce(logit)
        logit = logit.float()
    return ids, logit
