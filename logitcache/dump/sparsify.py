"""Turn a teacher's forward pass into sparse targets, on the device.

**Chunked head.** At vocab 128k-262k the full [batch, seq, vocab] logits are the dump's memory
ceiling. So the base model gives final hidden states, only positions with ``loss_mask = 1`` are
kept (row-major), and the output projection (:mod:`logitcache.dump.head`) is applied to
``chunk_tokens`` positions at a time, sparsifying each chunk before the next. Extra device memory
per chunk is about ``chunk_tokens x vocab x 6`` bytes (float32 logits, plus the matmul output in
bf16/fp16); ``chunk_tokens`` defaults to what fits ``chunk_bytes`` (1 GiB). The logits buffer and
the scratch are kept on the teacher (:meth:`Teacher.scratch`) from batch to batch: on a CPU a
fresh 400 MB buffer per batch paid its page faults every time. A teacher whose head could not be
split off gets full logits per batch instead.

Non-finite logits raise :class:`NonFiniteLogitsError` naming the rows, before anything reaches the
host. Results are the numpy containers of :mod:`logitcache.format.targets`.

**The math of one chunk, and what it costs.** The chunk is processed in blocks of rows: on a CPU
~2 MiB of logits (10 rows at vocab 49k), so after the first read every pass over a block hits the
cache, not memory; on an accelerator the whole chunk is one block. Per block, float32, on the
logits' device; only the small results leave:

- top-k on the *raw* logits ``z`` first: its first value is the row maximum ``m`` (no separate
  max pass). ``z' = z - m <= 0`` in place, ``e = exp(z')`` into scratch;
- the top-k entries of ``e`` are set to 0 and what is left is summed: ``tail_sum``, summed
  directly over the ids outside the top-k, never as ``1 - captured`` (which cancels
  catastrophically when the top-k holds almost all the mass); ``head_sum`` comes from the k
  values. The normaliser ``S = head_sum + tail_sum`` adds two non-negative numbers;
- log-probs are ``z' - log S`` over the *real* vocabulary (padded columns are dropped before);
  ``tail_logprob = log tail_sum - log S``; captured mass ``head_sum / S``;
- entropy ``-sum p log p = log S - sum(e z') / S``: one in-place multiply of the scratch and a
  sum, plus the same over the k values (no [N, V] temporary, no batched dot product);
- ``temperature_lognorm[:, j] = log sum_v p_v^(1/T_j) = log sum exp(z'/T_j) - log S / T_j``
  (``z' <= 0``, so no overflow at any T);
- the teacher's NLL of the true next token, ``log S - z'[label]``, gathered before ``z'`` is
  overwritten: the manifest's ``coverage.teacher_nll`` (a weakened teacher, e.g. one fed without
  its BOS, shows there at a glance);
- a non-finite logit anywhere in a row makes its entropy NaN (NaN and +inf propagate through the
  max, -inf through ``0 * -inf``), so the check costs nothing.

Measured on SmolLM2-135M (vocab 49,152) on a 2-core CPU, one batch of 4 x 512 tokens (2,044
positions; min of 3, old and new in the same run): base model 1,767 ms, head matmul 276 ms, the
previous sparsify (finite-check sum, max, subtract, exp, sum, subtract, batched-dot entropy,
top-k and a scatter, each over the whole [N, V] chunk) 371 ms, this one 172 ms with the NLL
(top-k through segment maxima about two thirds of it, every other pass together ~50 ms). The
whole ``sparsify_batch`` took 2,218 ms against 2,167 ms for the plain forward with its full
logits (``scripts/bench_dump.py`` reports the end-to-end ratios).

Sampling is driven by a counter-based hash of ``(seed, row_id, position, draw)`` (and the tree
level) instead of a stateful generator: a draw depends on nothing else, so it is the same
whatever the batch composition, chunk size or device. Two rules turn the uniforms into ids
(``SparsifyConfig.sampling_rule``): ``"tree"`` (the default; :mod:`logitcache.dump.tree_sampling`:
one uniform per level of a binary tree over the ids, a draw that the logits' rounding, e.g. a
tensor-parallel forward, almost never moves; the blocks keep only the tree's masses of groups of
32 ids and the walk runs once per chunk) and ``"inverse-cdf"`` (the rule of older caches:
``searchsorted`` of one uniform on the float32 cumulative probabilities, per block). Uniforms have
24 bits, so ids with p below ~6e-8 (a conditional below 2^-24 in the tree) are (almost) never
drawn: a bias far below anything a loss can see.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from logitcache.dump.draws import distinct_draws, uniforms
from logitcache.dump.head import forward_logits
from logitcache.dump.teacher import Teacher
from logitcache.dump.tree_sampling import group_masses, tree_depth, tree_walk
from logitcache.errors import ConfigError, NonFiniteLogitsError
from logitcache.format.targets import SampledTargets, TopKTargets

__all__ = [
    "SAMPLING_RULES",
    "CoverageStats",
    "SamplingRule",
    "SparseBatch",
    "SparsifyConfig",
    "sparsify_batch",
    "sparsify_chunk",
]

_BYTES_PER_LOGIT = 6  # the chunk's logits (float32) + the head's matmul output in bf16/fp16
_CPU_BLOCK_BYTES = 1 << 21
_TOPK_SEGMENT = 96

SamplingRule = Literal["tree", "inverse-cdf"]
#: how uniforms become sampled ids: "tree" (the default) or "inverse-cdf" (caches before it)
SAMPLING_RULES: tuple[SamplingRule, ...] = ("tree", "inverse-cdf")


@dataclass(frozen=True)
class SparsifyConfig:
    """What to keep per position: top-k (``k``) or ``samples`` draws (``seed``, drawn by
    ``sampling_rule``: :mod:`logitcache.dump.tree_sampling`)."""

    method: Literal["topk", "sampled"] = "topk"
    k: int = 64
    samples: int = 64
    seed: int = 0
    temperatures: tuple[float, ...] = ()
    sample_logprobs: bool = True
    chunk_tokens: int | None = None
    chunk_bytes: int = 1 << 30
    sampling_rule: SamplingRule = "tree"

    def __post_init__(self) -> None:
        if self.method not in ("topk", "sampled"):
            raise ConfigError(f"method must be 'topk' or 'sampled', got {self.method!r}")
        if self.sampling_rule not in SAMPLING_RULES:
            raise ConfigError(
                f"sampling_rule must be one of {SAMPLING_RULES}, got {self.sampling_rule!r}"
            )
        if self.k < 1 or self.samples < 1:
            raise ConfigError(f"k and samples must be >= 1, got {self.k}, {self.samples}")
        if any(not (t > 0 and np.isfinite(t)) for t in self.temperatures):
            raise ConfigError(f"temperatures must be finite and > 0, got {self.temperatures}")
        if self.chunk_tokens is not None and self.chunk_tokens < 1:
            raise ConfigError(f"chunk_tokens must be >= 1, got {self.chunk_tokens}")


@dataclass(frozen=True, eq=False)
class CoverageStats:
    """Per position: captured_mass [P] float32 (mass of the stored ids), entropy [P] (nats),
    nll [P] (nats: minus the teacher's log-prob of the true next token; NaN where none)."""

    captured_mass: np.ndarray
    entropy: np.ndarray
    nll: np.ndarray


@dataclass(frozen=True, eq=False)
class SparseBatch:
    """Targets of one batch: positions of row i are the i-th run of ``positions_per_row[i]``."""

    row_ids: np.ndarray
    positions_per_row: np.ndarray
    targets: TopKTargets | SampledTargets
    stats: CoverageStats


@dataclass
class ChunkResult:
    """Device tensors for one chunk; ``ids`` etc. are [N, k] for top-k, flat [E] for samples."""

    ids: torch.Tensor
    logprobs: torch.Tensor | None
    tail_logprob: torch.Tensor | None
    num_unique: torch.Tensor | None
    counts: torch.Tensor | None
    temperature_lognorm: torch.Tensor
    captured_mass: torch.Tensor
    entropy: torch.Tensor
    nll: torch.Tensor | None
    finite: torch.Tensor
    # tree rule, before the walk: level-5 node masses [N, G] float64 and log of the normaliser
    groups: torch.Tensor | None = None
    log_total: torch.Tensor | None = None


def block_rows(vocab: int, device: torch.device) -> int:
    """Rows of logits processed together: on a CPU a block of ~2 MiB, so every pass after the
    first reads the cache, not memory; on an accelerator the whole chunk (fewer launches)."""
    if device.type != "cpu":
        return 1 << 30
    return max(1, _CPU_BLOCK_BYTES // (4 * vocab))


def sparsify_chunk(
    z: torch.Tensor,
    *,
    method: str,
    k: int,
    samples: int,
    seed: int,
    temperatures: tuple[float, ...],
    row_ids: torch.Tensor,
    positions: torch.Tensor,
    labels: torch.Tensor | None = None,
    work: torch.Tensor | None = None,
    sampling_rule: SamplingRule = "tree",
) -> ChunkResult:
    """Sparsify float32 logits ``z`` [N, V] (overwritten). row_ids/positions [N] int64.

    ``labels`` [N] int64 (optional): the true next token of each position, for the teacher's
    NLL (-1 where there is none). ``work`` (optional, float32): scratch of at least
    [2 * min(N, block_rows), V], reused across chunks (a fresh buffer costs page faults on a CPU).
    The chunk is processed ``block_rows`` rows at a time; see the module docstring.
    """
    n, vocab = z.shape
    rows = min(n, block_rows(vocab, z.device)) if n else 1
    if work is None or work.numel() < 2 * rows * vocab:
        work = torch.empty((2 * rows * vocab,), device=z.device, dtype=torch.float32)
    flat = work.reshape(-1)
    a = flat[: rows * vocab].view(rows, vocab)
    b = flat[rows * vocab : 2 * rows * vocab].view(rows, vocab)
    parts = [
        _block(
            z[lo : lo + rows],
            a[: min(rows, n - lo)],
            b[: min(rows, n - lo)],
            method=method,
            k=k,
            samples=samples,
            seed=seed,
            temperatures=temperatures,
            row_ids=row_ids[lo : lo + rows],
            positions=positions[lo : lo + rows],
            labels=None if labels is None else labels[lo : lo + rows],
            tree=sampling_rule == "tree",
        )
        for lo in range(0, n, rows)
    ]
    if len(parts) == 1:
        result = parts[0]
    else:
        fields: dict[str, Any] = {
            f: None if getattr(parts[0], f) is None else torch.cat([getattr(p, f) for p in parts])
            for f in ChunkResult.__dataclass_fields__
        }
        result = ChunkResult(**fields)
    if result.groups is None or result.log_total is None:
        return result
    # the tree walk, once for the whole chunk: z still holds z' = z - max of every row
    u = uniforms(seed, row_ids, positions, samples, levels=tree_depth(vocab))
    drawn, drawn_z = tree_walk(result.groups, z, 0, vocab, u)
    return unique_draws(drawn, drawn_z, result.log_total, result)


def _block(
    z: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    method: str,
    k: int,
    samples: int,
    seed: int,
    temperatures: tuple[float, ...],
    row_ids: torch.Tensor,
    positions: torch.Tensor,
    labels: torch.Tensor | None,
    tree: bool,
) -> ChunkResult:
    """One block of rows: ``z`` [r, V] logits (overwritten), ``a``/``b`` [r, V] scratch.
    Sampled with ``tree``: no draws yet, the tree's group masses (the walk is per chunk)."""
    n, vocab = z.shape
    if method == "topk":
        k_eff = min(k, vocab)
        vals, ids = _topk(z, k_eff)  # on the raw logits: its max is vals[:, 0]
        m = vals[:, :1]
    else:
        m = z.amax(dim=1, keepdim=True)
    z.sub_(m)  # z' = z - max <= 0: nothing below overflows
    tsums = [torch.mul(z, 1.0 / t, out=a).exp_().sum(dim=1) for t in temperatures]
    e = torch.exp(z, out=a)  # exp(z'), unnormalised
    label_z = _label_logit(z, labels)
    if method == "topk":
        vz = vals - m
        head_e = vz.exp()
        head_sum = head_e.sum(dim=1)
        head_dot = (head_e * vz).sum(dim=1)
        # the tail summed directly over the ids outside the top-k, never as 1 - captured
        tail_sum = e.scatter_(1, ids, 0.0).sum(dim=1)
        tail_dot = e.mul_(z).sum(dim=1)
        total = head_sum + tail_sum  # both >= 0: no cancellation
        log_total = total.log()
        entropy = log_total - (head_dot + tail_dot) / total
        logp = vz - log_total[:, None]
        tail = tail_sum.log() - log_total
        captured = head_sum / total
        if k_eff < k:  # fewer ids than k exist: pad as TopKTargets documents
            ids = torch.cat([ids, ids.new_zeros((n, k - k_eff))], dim=1)
            logp = torch.cat([logp, logp.new_full((n, k - k_eff), float("-inf"))], dim=1)
        tln = _temperature_lognorm(tsums, temperatures, log_total, n, z)
        nll = _nll(label_z, log_total)
        finite = torch.isfinite(entropy) & torch.isfinite(m[:, 0])
        return ChunkResult(ids, logp, tail, None, None, tln, captured, entropy, nll, finite)
    if tree:
        groups = group_masses(e, 0, vocab)  # before e is overwritten by the entropy's product
        total = groups.sum(dim=1).float()
        log_total = total.log()
        entropy = log_total - e.mul_(z).sum(dim=1) / total
        tln = _temperature_lognorm(tsums, temperatures, log_total, n, z)
        finite = torch.isfinite(entropy) & torch.isfinite(m[:, 0])
        none = z.new_zeros(0)
        return ChunkResult(
            none.long(),
            none,
            None,
            none.int(),
            none.long(),
            tln,
            none,
            entropy,
            _nll(label_z, log_total),
            finite,
            groups,
            log_total,
        )
    cdf = torch.cumsum(e, dim=1, out=b)  # unnormalised: the uniforms are scaled by its end
    total = cdf[:, -1].clone()
    log_total = total.log()
    entropy = log_total - e.mul_(z).sum(dim=1) / total
    u = uniforms(seed, row_ids, positions, samples) * cdf[:, -1:]
    drawn = torch.searchsorted(cdf, u, right=True).clamp_(max=vocab - 1)
    drawn, _ = drawn.sort(dim=1)
    _, uniq, counts, owner, num_unique = distinct_draws(drawn)
    lp = z[owner, uniq] - log_total[owner]
    captured = torch.zeros(n, device=z.device, dtype=torch.float32).index_add_(0, owner, lp.exp())
    tln = _temperature_lognorm(tsums, temperatures, log_total, n, z)
    finite = torch.isfinite(entropy) & torch.isfinite(m[:, 0])
    return ChunkResult(
        uniq,
        lp,
        None,
        num_unique,
        counts,
        tln,
        captured,
        entropy,
        _nll(label_z, log_total),
        finite,
    )


def unique_draws(
    drawn: torch.Tensor, drawn_z: torch.Tensor, log_total: torch.Tensor, base: ChunkResult
) -> ChunkResult:
    """``base`` with its draws: ``drawn`` [n, samples] ids and ``drawn_z`` their logits minus
    the row's max (any order) become sorted distinct ids, counts, log-probs (``z - log_total``)
    and the captured mass. Shared by the tree rule and the tensor-parallel path."""
    n = drawn.shape[0]
    drawn, order = drawn.sort(dim=1)
    drawn_z = drawn_z.gather(1, order)
    first, uniq, counts, owner, num_unique = distinct_draws(drawn)
    lp = drawn_z.reshape(-1)[first] - log_total[owner]
    captured = torch.zeros(n, device=drawn.device).index_add_(0, owner, lp.exp())
    return dataclasses.replace(
        base,
        ids=uniq,
        logprobs=lp,
        num_unique=num_unique,
        counts=counts,
        captured_mass=captured,
        groups=None,
    )


def _topk(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``z.topk(k, sorted=True)`` over the rows of ``z``, on a CPU through segment maxima.

    The columns are cut into segments of ``_TOPK_SEGMENT``; the k segments with the largest
    maxima hold the top k: the k-th largest segment maximum t has k elements >= t, so the k-th
    largest value is >= t, and every element >= it lies in a segment whose maximum is >= t.
    One top-k over those k segments (k x 96 candidates instead of the vocabulary) gives the
    same values (ids too, but for exact ties). CPU top-k is a heap over every element, so this
    takes it from ~88 to ~60 ms per 1,560 positions at vocab 49k; CUDA's top-k is fast as is.
    """
    n, vocab = z.shape
    seg = _TOPK_SEGMENT
    q = vocab // seg
    if z.device.type != "cpu" or q < 4 * k:
        return z.topk(k, dim=1, sorted=True)
    main = z[:, : q * seg].unflatten(1, (q, seg))
    best = main.amax(dim=2).topk(k, dim=1, sorted=False).indices
    cand = main.gather(1, best[:, :, None].expand(-1, -1, seg)).flatten(1)
    col = (best[:, :, None] * seg + torch.arange(seg, device=z.device)).flatten(1)
    if q * seg < vocab:  # the last, partial segment: always a candidate
        cand = torch.cat([cand, z[:, q * seg :]], dim=1)
        rest = torch.arange(q * seg, vocab, device=z.device).expand(n, -1)
        col = torch.cat([col, rest], dim=1)
    vals, loc = cand.topk(k, dim=1, sorted=True)
    return vals, col.gather(1, loc)


def _label_logit(z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor | None:
    """z'[i, labels[i]] (NaN where there is no label), gathered before ``z`` is overwritten."""
    if labels is None:
        return None
    ok = (labels >= 0) & (labels < z.shape[1])  # an id beyond the real vocabulary: no NLL
    got = z.gather(1, torch.where(ok, labels, 0)[:, None]).squeeze(1)
    return torch.where(ok, got, float("nan"))


def _nll(label_z: torch.Tensor | None, log_total: torch.Tensor) -> torch.Tensor | None:
    return None if label_z is None else log_total - label_z


def _temperature_lognorm(
    sums: list[torch.Tensor],
    temperatures: tuple[float, ...],
    log_total: torch.Tensor,
    n: int,
    like: torch.Tensor,
) -> torch.Tensor:
    # log sum_v p_v^(1/T) = log sum exp(z'/T) - log_total / T
    if not temperatures:
        return like.new_zeros((n, 0))
    return torch.stack(
        [s.log() - log_total / t for s, t in zip(sums, temperatures, strict=True)], 1
    )


def sparsify_batch(
    teacher: Teacher,
    input_ids: np.ndarray | torch.Tensor,
    loss_mask: np.ndarray | torch.Tensor,
    row_ids: np.ndarray | torch.Tensor,
    config: SparsifyConfig,
) -> SparseBatch:
    """Run the teacher on [B, S] right-padded rows; sparse targets at ``loss_mask`` positions.

    A tensor-parallel teacher (:attr:`Teacher.sharded_head`) goes through
    :func:`logitcache.dump.tp_sparsify.sparsify_batch_tp` instead (same results, no full
    vocabulary); here it is refused."""
    if teacher.sharded_head is not None:
        raise ConfigError(
            "this teacher is sharded by tensor parallel: sparsify its batches with "
            "logitcache.dump.tp_sparsify.sparsify_batch_tp (every rank of its group)"
        )
    ids, mask, rows, b_idx, t_idx, pos_rows, labels = prepare_positions(
        teacher, input_ids, loss_mask, row_ids
    )
    dev = teacher.device
    vocab = teacher.real_vocab_size
    with torch.no_grad():
        n = int(b_idx.shape[0])
        step = config.chunk_tokens or max(1, config.chunk_bytes // (vocab * _BYTES_PER_LOGIT))
        step = min(step, max(n, 1))
        chunk_logits = _logit_source(teacher, ids, b_idx, t_idx, step)
        work = teacher.scratch("sparsify", 2 * min(step, block_rows(vocab, dev)) * vocab)
        parts = [
            sparsify_chunk(
                chunk_logits(lo, min(lo + step, n)),
                method=config.method,
                k=config.k,
                samples=config.samples,
                seed=config.seed,
                temperatures=config.temperatures,
                row_ids=pos_rows[lo : lo + step],
                positions=t_idx[lo : lo + step],
                labels=labels[lo : lo + step],
                work=work,
                sampling_rule=config.sampling_rule,
            )
            for lo in range(0, n, step)
        ]
    return finish_batch(parts, rows, mask, pos_rows, config)


def prepare_positions(
    teacher: Teacher,
    input_ids: np.ndarray | torch.Tensor,
    loss_mask: np.ndarray | torch.Tensor,
    row_ids: np.ndarray | torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """Checked device tensors: ids, mask [B, S], rows [B] (host), then per selected position
    (row-major) its batch index, position, row id and true next token (-1 at a row's end)."""
    dev = teacher.device
    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long).to(dev)
    mask = torch.as_tensor(np.asarray(loss_mask), dtype=torch.bool).to(dev)
    rows = torch.as_tensor(np.asarray(row_ids), dtype=torch.long)
    if ids.ndim != 2 or mask.shape != ids.shape or rows.shape != (ids.shape[0],):
        raise ConfigError(
            f"expected input_ids/loss_mask [B, S] and row_ids [B], got "
            f"{tuple(ids.shape)}, {tuple(mask.shape)}, {tuple(rows.shape)}"
        )
    if teacher.max_seq_len is not None and ids.shape[1] > teacher.max_seq_len:
        raise ConfigError(
            f"seq_len {ids.shape[1]} exceeds the teacher's context {teacher.max_seq_len}"
        )
    b_idx, t_idx = mask.nonzero(as_tuple=True)
    pos_rows = rows.to(dev)[b_idx]
    # the true next token of each position (none at a row's last position)
    has_label = t_idx + 1 < ids.shape[1]
    labels = torch.where(has_label, ids[b_idx, (t_idx + 1).clamp(max=ids.shape[1] - 1)], -1)
    return ids, mask, rows, b_idx, t_idx, pos_rows, labels


def finish_batch(
    parts: list[ChunkResult],
    rows: torch.Tensor,
    mask: torch.Tensor,
    pos_rows: torch.Tensor,
    config: SparsifyConfig,
) -> SparseBatch:
    """Check every position is finite (else raise naming the rows), then move to the host."""
    dev = mask.device
    finite = torch.cat([p.finite for p in parts]) if parts else torch.ones(0, dtype=torch.bool)
    if not bool(finite.all()):
        bad = sorted({int(r) for r in pos_rows[~finite.to(dev)].cpu().tolist()})
        raise NonFiniteLogitsError(
            f"the teacher produced NaN/inf logits in row(s) {bad[:10]}"
            f"{' ...' if len(bad) > 10 else ''}; nothing was written for this batch. Try "
            "dtype fp32, or check the teacher's weights"
        )
    per_row = mask.sum(dim=1).to(torch.int32).cpu().numpy()
    return SparseBatch(rows.numpy(), per_row, _to_targets(parts, config), _to_stats(parts))


def _logit_source(
    teacher: Teacher, ids: torch.Tensor, b_idx: torch.Tensor, t_idx: torch.Tensor, chunk: int
) -> Callable[[int, int], torch.Tensor]:
    """A function (lo, hi) -> float32 logits [hi - lo, real_vocab] of the selected positions
    (at most ``chunk`` at a time; the result is only valid until the next call)."""
    attention = torch.ones_like(ids)
    if teacher.head is not None:
        head = teacher.head
        hidden = head.hidden_states(ids, attention)[b_idx, t_idx]
        buf = teacher.scratch("logits", chunk * teacher.real_vocab_size)
        buf = buf.view(chunk, teacher.real_vocab_size)
        return lambda lo, hi: head.logits(hidden[lo:hi], out=buf[: hi - lo])
    full = forward_logits(teacher.model, ids, attention)[b_idx, t_idx]
    real = teacher.real_vocab_size
    return lambda lo, hi: full[lo:hi, :real].float()


def _cat(parts: list[ChunkResult], field: str, dtype: np.dtype) -> np.ndarray:
    values = [getattr(p, field) for p in parts]
    if not values:
        return np.zeros(0, dtype=dtype)
    return torch.cat(values).cpu().numpy().astype(dtype, copy=False)


def _to_targets(parts: list[ChunkResult], config: SparsifyConfig) -> TopKTargets | SampledTargets:
    n_t = len(config.temperatures)
    tln = (
        torch.cat([p.temperature_lognorm for p in parts]).cpu().numpy()
        if parts
        else np.zeros((0, n_t), dtype=np.float32)
    )
    if config.method == "topk":
        k = config.k
        ids = _cat(parts, "ids", np.dtype(np.int32)).reshape(-1, k)
        lps = _cat(parts, "logprobs", np.dtype(np.float32)).reshape(-1, k)
        tail = _cat(parts, "tail_logprob", np.dtype(np.float32))
        return TopKTargets(ids, lps, tail, tln.astype(np.float32, copy=False))
    return SampledTargets(
        num_unique=_cat(parts, "num_unique", np.dtype(np.int32)),
        ids=_cat(parts, "ids", np.dtype(np.int32)),
        counts=_cat(parts, "counts", np.dtype(np.int32)),
        logprobs=_cat(parts, "logprobs", np.dtype(np.float32)) if config.sample_logprobs else None,
        temperature_lognorm=tln.astype(np.float32, copy=False),
    )


def _to_stats(parts: list[ChunkResult]) -> CoverageStats:
    return CoverageStats(
        captured_mass=_cat(parts, "captured_mass", np.dtype(np.float32)),
        entropy=_cat(parts, "entropy", np.dtype(np.float32)),
        nll=_cat(parts, "nll", np.dtype(np.float32)),
    )
