"""Column-wise conversion of one Arrow record batch of a logit dataset into cache rows.

The nested list columns are flattened once through their Arrow offsets into ``[positions, w]``
arrays (a reshape when every position has the same width), checked per position (vocabulary,
NaN, repeated ids, probabilities summing above one), cut or padded to ``k`` and normalised; no
Python loop runs over positions. What is checked and how values are normalised is specified in
:mod:`logitcache.transform.importer` and :mod:`logitcache.transform.layouts`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from logitcache.errors import ConfigError, InputError
from logitcache.transform.layouts import Layout

__all__ = ["Batch", "convert", "shape_of"]

SUM_EPS = 1e-3


@dataclass(frozen=True, eq=False)
class Batch:
    """Converted rows of one source batch (only the good ones)."""

    row_id: np.ndarray  # [B] source row numbers
    tokens: np.ndarray  # [T] the rows' input ids, concatenated
    lengths: np.ndarray  # [B] tokens per row
    positions: np.ndarray  # [B] target positions per row
    where: np.ndarray  # [P] the token position of each target within its row
    ids: np.ndarray  # [P, k] int32
    logprobs: np.ndarray  # [P, k] float32
    tail: np.ndarray  # [P] float32
    bad: int

    def drop_rows(self, n: int) -> Batch:
        """The batch without its first ``n`` rows (a resumed import skips written rows)."""
        cut = int(self.positions[:n].sum())
        t_cut = int(self.lengths[:n].sum())
        return Batch(
            self.row_id[n:],
            self.tokens[t_cut:],
            self.lengths[n:],
            self.positions[n:],
            self.where[cut:],
            self.ids[cut:],
            self.logprobs[cut:],
            self.tail[cut:],
            self.bad,
        )


def _list_offsets(arr: Any) -> tuple[np.ndarray, Any]:
    """(offsets int64 [n+1] relative to the values, the values) of a list array."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if not pa.types.is_list(arr.type) and not pa.types.is_large_list(arr.type):
        if pa.types.is_fixed_size_list(arr.type):
            size = arr.type.list_size
            n = len(arr)
            return np.arange(n + 1, dtype=np.int64) * size, arr.flatten()
        raise InputError(f"expected a list column, got type {arr.type}")
    offsets = np.asarray(arr.offsets, dtype=np.int64)
    return offsets - offsets[0], arr.flatten()


def _numbers(arr: Any, kind: Literal["int", "float"]) -> np.ndarray:
    """The values of a flat Arrow array as numpy, zero-copy when the type allows: any integer
    type (``kind="int"``) or float32/float64 (``"float"``) stays as it is, anything else becomes
    int64/float64 (the range checks and the one cast to the cache's dtypes come later)."""
    if arr.null_count:
        raise InputError("null values inside a list")
    a = arr.to_numpy(zero_copy_only=False)
    if kind == "int":
        return a if np.issubdtype(a.dtype, np.integer) else np.asarray(a, dtype=np.int64)
    return a if a.dtype in (np.float32, np.float64) else np.asarray(a, dtype=np.float64)


def _out_of_range(a: np.ndarray, vocab: int) -> bool:
    """Whether any value of ``a`` lies outside ``[0, vocab)`` (two reductions, no mask)."""
    return bool(a.size) and (int(a.min()) < 0 or int(a.max()) >= vocab)


def convert(
    rb: Any,
    base: int,
    layout: Layout,
    vocab: int,
    k_fixed: int | None,
    seq_len: int | None,
    skip_bad_rows: bool,
    path: str,
) -> Batch:
    n = rb.num_rows
    tok_off, tok_vals = _list_offsets(rb.column(layout.input_ids))
    tokens = _numbers(tok_vals, "int")
    pos_off, entry_off, ids_flat, vals_flat, which = _targets_arrays(rb, layout)
    n_pos = np.diff(pos_off)
    widths = np.diff(entry_off)
    k = k_fixed or max(int(widths.max(initial=1)), 1)
    bad: dict[int, str] = {}

    def flag(rows: np.ndarray, column: str, why: str) -> None:
        for r in np.unique(rows).tolist():
            bad.setdefault(int(r), f"column {column!r}: {why}")

    row_of_pos = np.repeat(np.arange(n), n_pos)
    lengths = np.diff(tok_off)
    flag(np.nonzero(n_pos > lengths)[0], which, "more target positions than input tokens")
    if seq_len is not None:
        flag(
            np.nonzero(lengths > seq_len)[0],
            layout.input_ids,
            f"longer than --seq-len {seq_len}",
        )
    # each check is one whole-batch reduction; the per-position detail (which rows) is
    # computed only when that reduction finds something
    if _out_of_range(tokens, vocab):
        tok_rows = np.repeat(np.arange(n), lengths)
        flag(tok_rows[(tokens < 0) | (tokens >= vocab)], layout.input_ids,
             f"token ids outside the vocabulary [0, {vocab})")  # fmt: skip
    # only positions that will be targets are checked: a masked-out position may hold anything
    live = widths > 0
    if layout.loss_mask is not None:
        live &= _position_mask(rb.column(layout.loss_mask), pos_off)
    ids, vals, pad = _dense(ids_flat, vals_flat, entry_off, widths)
    if vals.size and not vals.min() > -np.inf:  # a -inf entry (zero mass: padding), or NaN
        pad = np.isneginf(vals) if pad is None else pad | np.isneginf(vals)
    if _out_of_range(ids, vocab):
        outside = (ids < 0) | (ids >= vocab)
        oov = outside if pad is None else outside & ~pad
        flag(row_of_pos[oov.any(axis=1) & live], which, f"ids outside the vocabulary [0, {vocab})")
        ids = np.where(outside, 0, ids)  # bad rows are dropped; padding keeps no id
    ids = ids.astype(np.int32, copy=False)
    if vals.size and not vals.max() < np.inf:  # NaN or +inf somewhere
        nan = np.isnan(vals) | np.isposinf(vals)
        flag(row_of_pos[nan.any(axis=1) & live], which, "NaN or +inf values")
        vals = np.where(nan, -np.inf, vals)
    if pad is None and ids.shape[1] == k:
        # k entries everywhere (the common case): sort each position by id here, once; the
        # repeat check is then a comparison of neighbours, and the codec finds the ids sorted
        ids, vals = _sort_by_id(ids, vals)
        repeats = (ids[:, 1:] == ids[:, :-1]).any(axis=1)
    else:
        repeats = _repeats(ids, pad, vocab)
        ids, vals = _top(ids, vals, k)
    flag(row_of_pos[repeats & live], which, "an id repeated within one position")
    lp, tail, over = _normalise(vals, widths, layout, rb, pos_off)
    flag(row_of_pos[over & live], which, f"probabilities summing above 1 + {SUM_EPS:g}")
    if bad and not skip_bad_rows:
        row, why = min(bad.items())
        raise InputError(
            f"{path}: source row {base + row}, {why}; fix the source or pass --skip-bad-rows "
            "to count and skip such rows"
        )
    where = np.arange(len(row_of_pos)) - np.repeat(pos_off[:-1], n_pos)
    if not bad and live.all():  # the common case: every row and position kept, no copies
        rows, tok_keep = np.arange(n), tokens
        keep_pos: Any = slice(None)
        per_row = n_pos
    else:
        keep_row = np.ones(n, dtype=bool)
        keep_row[list(bad)] = False
        keep_pos = np.repeat(keep_row, n_pos) & live
        rows = np.nonzero(keep_row)[0]
        per_row = np.bincount(row_of_pos[keep_pos], minlength=n)[rows]
        tok_keep = tokens[_ranges(tok_off[rows], lengths[rows])]
    return Batch(
        row_id=(rows + base).astype(np.int64),
        tokens=tok_keep.astype(np.int32, copy=False),
        lengths=lengths[rows],
        positions=per_row.astype(np.int64),
        where=where[keep_pos],
        ids=ids[keep_pos],
        logprobs=lp[keep_pos].astype(np.float32, copy=False),
        tail=tail[keep_pos].astype(np.float32, copy=False),
        bad=len(bad),
    )


def shape_of(rb: Any, layout: Layout) -> tuple[int, int]:
    """(the longest row's tokens, the widest position's entries) of a record batch: what an
    import takes as ``seq_len`` and ``k`` when they are not given. Offsets only, no values."""
    tok_off, _ = _list_offsets(rb.column(layout.input_ids))
    if layout.pairs is not None:
        _, per_pos = _list_offsets(rb.column(layout.pairs))
        _, pair_vals = _list_offsets(per_pos)
        entry_off, _ = _list_offsets(pair_vals)
        widths = np.diff(entry_off)[0::2]
    else:
        column = layout.records if layout.records is not None else layout.ids
        _, per_pos = _list_offsets(rb.column(column))
        entry_off, _ = _list_offsets(per_pos)
        widths = np.diff(entry_off)
    return int(np.diff(tok_off).max(initial=0)), int(widths.max(initial=0))


def _targets_arrays(rb: Any, layout: Layout) -> tuple[Any, ...]:
    """(position offsets [n+1], entry offsets [P+1], ids [E], values [E], column name)."""
    if layout.pairs is not None:
        pos_off, per_pos = _list_offsets(rb.column(layout.pairs))
        pair_off, pair_vals = _list_offsets(per_pos)
        if np.any(np.diff(pair_off) != 2):
            raise InputError(f"column {layout.pairs!r}: each position must hold [ids, values]")
        entry_off, flat = _list_offsets(pair_vals)
        nums = _numbers(flat, "float")
        widths = np.diff(entry_off)
        ids = nums[_ranges(entry_off[:-1][0::2], widths[0::2])]
        vals = nums[_ranges(entry_off[:-1][1::2], widths[1::2])]
        off = np.concatenate([[0], np.cumsum(widths[0::2])])
        return pos_off, off, ids.astype(np.int64), vals, layout.pairs
    if layout.records is not None:
        pos_off, per_pos = _list_offsets(rb.column(layout.records))
        entry_off, structs = _list_offsets(per_pos)
        return (
            pos_off,
            entry_off,
            _token_ids(structs),
            _numbers(structs.field("logprob"), "float"),
            layout.records,
        )
    if layout.ids is None or layout.values is None:
        raise ConfigError("the layout names no targets column")  # Layout refuses this already
    pos_off, id_pos = _list_offsets(rb.column(layout.ids))
    vpos_off, val_pos = _list_offsets(rb.column(layout.values))
    entry_off, id_flat = _list_offsets(id_pos)
    ventry_off, val_flat = _list_offsets(val_pos)
    if not (np.array_equal(pos_off, vpos_off) and np.array_equal(entry_off, ventry_off)):
        raise InputError(
            f"columns {layout.ids!r} and {layout.values!r} do not have the same shape per row"
        )
    return (
        pos_off,
        entry_off,
        _numbers(id_flat, "int"),
        _numbers(val_flat, "float"),
        layout.ids,
    )


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(s, s + n)`` for each (s, n), vectorised."""
    lengths = np.asarray(lengths, dtype=np.int64)
    out_starts = np.cumsum(lengths) - lengths
    shift = np.repeat(np.asarray(starts, dtype=np.int64) - out_starts, lengths)
    return shift + np.arange(int(lengths.sum()), dtype=np.int64)


def _token_ids(structs: Any) -> np.ndarray:
    """``token`` of vLLM records: an int, or a string ``"token_id:N"``."""
    tok = structs.field("token")
    if pa.types.is_integer(tok.type):
        return _numbers(tok, "int")
    text = np.asarray(tok.to_pylist(), dtype=object)
    try:
        return np.array([int(str(t).rsplit(":", 1)[-1]) for t in text], dtype=np.int64)
    except ValueError as e:
        raise InputError(
            "record tokens must be ids or 'token_id:N' strings (vLLM's return_tokens_as_token_ids)"
        ) from e


def _dense(
    ids_flat: np.ndarray, vals_flat: np.ndarray, entry_off: np.ndarray, widths: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Ragged entries -> [P, w] ids and values (w the widest position) and the [P, w] mask of
    padding entries (id 0, value -inf); None when every position has w entries (a reshape)."""
    p = len(widths)
    w = int(widths.max(initial=0))
    if p and int(widths.min()) == w:
        return ids_flat.reshape(p, w), vals_flat.reshape(p, w), None
    col = np.arange(len(ids_flat)) - np.repeat(entry_off[:-1], widths)
    row = np.repeat(np.arange(p), widths)
    ids = np.zeros((p, w), dtype=ids_flat.dtype)
    vals = np.full((p, w), -np.inf, dtype=vals_flat.dtype)
    pad = np.ones((p, w), dtype=bool)
    ids[row, col] = ids_flat
    vals[row, col] = vals_flat
    pad[row, col] = False
    return ids, vals, pad


def _repeats(ids: np.ndarray, pad: np.ndarray | None, vocab: int) -> np.ndarray:
    """[P] flag of positions that hold an id twice (padding entries never count: each gets its
    own key past the vocabulary). ``ids``: int32, inside ``[0, vocab)``. A per-row sort of int32
    keys (numpy's SIMD sort), then one comparison of neighbours."""
    key = ids
    if pad is not None:
        key = np.where(pad, vocab + np.arange(ids.shape[1], dtype=np.int64), ids)
    srt = np.sort(key, axis=1)
    return np.asarray((srt[:, 1:] == srt[:, :-1]).any(axis=1))


def _sort_by_id(ids: np.ndarray, vals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ids [P, w] (int32, non-negative) ascending per position, their values alongside: one
    SIMD sort of uint64 keys ``id << 32 | low``, ``low`` the value's bits (float32 values, no
    gather) or the column (float64, then one gather). Where ids are distinct this is the
    order the codec's stable sort gives, so the cache is byte-identical either way; positions
    with a repeated id are refused or skipped."""
    key = ids.astype(np.uint64)
    key <<= np.uint64(32)
    if vals.dtype == np.float32:
        key |= vals.view(np.uint32)
        key.sort(axis=1)
        out_vals = key.astype(np.uint32).view(np.float32)  # the cast keeps the low 32 bits
    else:
        key |= np.arange(ids.shape[1], dtype=np.uint64)
        key.sort(axis=1)
        out_vals = np.take_along_axis(vals, key.astype(np.uint32).astype(np.intp), axis=1)
    key >>= np.uint64(32)
    return key.astype(np.int32), out_vals


def _top(ids: np.ndarray, vals: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest values per position (and their ids), padded with -inf to ``k``."""
    p, w = ids.shape
    if w > k:
        top = np.argpartition(-vals, k - 1, axis=1)[:, :k]
        return np.take_along_axis(ids, top, axis=1), np.take_along_axis(vals, top, axis=1)
    if w < k:
        ids = np.concatenate([ids, np.zeros((p, k - w), dtype=ids.dtype)], axis=1)
        vals = np.concatenate([vals, np.full((p, k - w), -np.inf, dtype=vals.dtype)], axis=1)
    return ids, vals


def _normalise(
    vals: np.ndarray, widths: np.ndarray, layout: Layout, rb: Any, pos_off: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(log-probs [P, k], tail [P], over [P] flag of sums above one). Sums and
    normalisers are computed in float64 whatever the source's float type; log-probs keep the
    source's float32 when there is nothing to compute on them (cast once, by the caller)."""
    if layout.value_kind == "prob":
        with np.errstate(divide="ignore"):
            lp = np.log(np.clip(vals.astype(np.float64), 0.0, None))
    else:
        lp = vals
    p = lp.shape[0]
    if not layout.normalized:
        lp = lp.astype(np.float64)
        m = np.max(lp, axis=1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)
        with np.errstate(divide="ignore"):
            lse = m + np.log(np.exp(lp - m).sum(axis=1, keepdims=True))
        return lp - lse, np.full(p, -np.inf), np.zeros(p, dtype=bool)
    total = np.exp(lp, dtype=np.float64).sum(axis=1)
    over = total > 1 + SUM_EPS
    if layout.tail is not None:
        _, t_vals = _list_offsets(rb.column(layout.tail))
        tail = _numbers(t_vals, "float")
        if len(tail) != p:
            raise InputError(f"column {layout.tail!r}: one tail value per target position")
        return lp, tail, over
    with np.errstate(divide="ignore", invalid="ignore"):
        tail = np.log1p(-np.minimum(total, 1.0))
    return lp, tail, over


def _position_mask(col: Any, pos_off: np.ndarray) -> np.ndarray:
    """A per-position keep mask from a loss-mask column: ``[S]`` 0/1 per token, or ``[S][k]``
    (Axolotl's ``target_mask``: a position counts when any of its entries does)."""
    off, per = _list_offsets(col)
    if pa.types.is_list(per.type) or pa.types.is_large_list(per.type):
        e_off, flat = _list_offsets(per)
        vals = _numbers(flat, "int") != 0
        any_on = np.add.reduceat(vals, e_off[:-1]) > 0 if len(vals) else np.zeros(0, bool)
        any_on = np.where(np.diff(e_off) > 0, any_on, False)
        per_pos = any_on
    else:
        per_pos = _numbers(per, "int") != 0
    n_pos = np.diff(pos_off)
    n_mask = np.diff(off)
    if np.array_equal(n_pos, n_mask):  # one mask entry per target position: nothing to align
        return np.asarray(per_pos, dtype=bool)
    out = np.zeros(int(pos_off[-1]), dtype=bool)
    take = np.minimum(n_pos, n_mask)
    src = _ranges(off[:-1], take)
    dst = _ranges(pos_off[:-1], take)
    out[dst] = per_pos[src]
    return out
