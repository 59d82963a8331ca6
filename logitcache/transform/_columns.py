"""Column-wise conversion of one Arrow record batch of a logit dataset into cache rows.

The nested list columns are flattened once through their Arrow offsets into ``[positions, w]``
arrays (a reshape when every position has the same width), checked per position (vocabulary,
NaN, repeated ids, probabilities summing above one), cut or padded to ``k`` and normalised; no
Python loop runs over positions. What is checked and how values are normalised is specified in
:mod:`logitcache.transform.importer` and :mod:`logitcache.transform.layouts`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from logitcache.errors import ConfigError, InputError
from logitcache.transform.layouts import Layout

__all__ = ["Batch", "convert"]

SUM_EPS = 1e-3


@dataclass(frozen=True, eq=False)
class Batch:
    """Converted rows of one source batch (only the good ones)."""

    row_id: np.ndarray  # [B] source row numbers
    tokens: list[np.ndarray]  # each row's input ids
    positions: np.ndarray  # [B] target positions per row
    where: np.ndarray  # [P] the token position of each target within its row
    ids: np.ndarray  # [P, k]
    logprobs: np.ndarray  # [P, k]
    tail: np.ndarray  # [P]
    bad: int


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


def _numbers(arr: Any, dtype: Any) -> np.ndarray:
    if arr.null_count:
        raise InputError("null values inside a list")
    return np.asarray(arr.to_numpy(zero_copy_only=False), dtype=dtype)


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
    tokens_flat = _numbers(tok_vals, np.int64)
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
    tok_rows = np.repeat(np.arange(n), lengths)
    flag(tok_rows[(tokens_flat < 0) | (tokens_flat >= vocab)], layout.input_ids,
         f"token ids outside the vocabulary [0, {vocab})")  # fmt: skip
    # only positions that will be targets are checked: a masked-out position may hold anything
    live = widths > 0
    if layout.loss_mask is not None:
        live &= _position_mask(rb.column(layout.loss_mask), pos_off)
    ids, vals, pad = _dense(ids_flat, vals_flat, entry_off, widths)
    pad = np.isneginf(vals) if pad is None else pad | np.isneginf(vals)
    oov = ((ids < 0) | (ids >= vocab)) & ~pad
    flag(row_of_pos[oov.any(axis=1) & live], which, f"ids outside the vocabulary [0, {vocab})")
    nan = np.isnan(vals) | np.isposinf(vals)
    flag(row_of_pos[nan.any(axis=1) & live], which, "NaN or +inf values")
    flag(row_of_pos[_repeats(ids, pad) & live], which, "an id repeated within one position")
    ids, vals = _top(ids, np.where(nan, -np.inf, vals), k)
    lp, tail, over = _normalise(vals, widths, layout, rb, pos_off)
    flag(row_of_pos[over & live], which, f"probabilities summing above 1 + {SUM_EPS:g}")
    if bad and not skip_bad_rows:
        row, why = min(bad.items())
        raise InputError(
            f"{path}: source row {base + row}, {why}; fix the source or pass --skip-bad-rows "
            "to count and skip such rows"
        )
    keep_row = np.ones(n, dtype=bool)
    keep_row[list(bad)] = False
    keep_pos = np.repeat(keep_row, n_pos) & live
    rows = np.nonzero(keep_row)[0]
    per_row = np.bincount(row_of_pos[keep_pos], minlength=n)
    where = np.arange(len(row_of_pos)) - np.repeat(pos_off[:-1], n_pos)
    return Batch(
        row_id=(rows + base).astype(np.int64),
        tokens=[tokens_flat[tok_off[r] : tok_off[r + 1]] for r in rows.tolist()],
        positions=per_row[rows].astype(np.int64),
        where=where[keep_pos],
        ids=ids[keep_pos],
        logprobs=lp[keep_pos],
        tail=tail[keep_pos],
        bad=len(bad),
    )


def _targets_arrays(rb: Any, layout: Layout) -> tuple[Any, ...]:
    """(position offsets [n+1], entry offsets [P+1], ids [E], values [E], column name)."""
    if layout.pairs is not None:
        pos_off, per_pos = _list_offsets(rb.column(layout.pairs))
        pair_off, pair_vals = _list_offsets(per_pos)
        if np.any(np.diff(pair_off) != 2):
            raise InputError(f"column {layout.pairs!r}: each position must hold [ids, values]")
        entry_off, flat = _list_offsets(pair_vals)
        nums = _numbers(flat, np.float64)
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
            _numbers(structs.field("logprob"), np.float64),
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
        _numbers(id_flat, np.int64),
        _numbers(val_flat, np.float64),
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
        return _numbers(tok, np.int64)
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
    ids = np.zeros((p, w), dtype=np.int64)
    vals = np.full((p, w), -np.inf)
    pad = np.ones((p, w), dtype=bool)
    ids[row, col] = ids_flat
    vals[row, col] = vals_flat
    pad[row, col] = False
    return ids, vals, pad


def _repeats(ids: np.ndarray, pad: np.ndarray) -> np.ndarray:
    """[P] flag of positions that hold an id twice (padding entries never count)."""
    key = np.where(pad, -1 - np.arange(ids.shape[1], dtype=np.int32), ids.astype(np.int32))
    srt = np.sort(key, axis=1)
    return np.asarray((srt[:, 1:] == srt[:, :-1]).any(axis=1))


def _top(ids: np.ndarray, vals: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest values per position (and their ids), padded with -inf to ``k``."""
    p, w = ids.shape
    if w > k:
        top = np.argpartition(-vals, k - 1, axis=1)[:, :k]
        return np.take_along_axis(ids, top, axis=1), np.take_along_axis(vals, top, axis=1)
    if w < k:
        ids = np.concatenate([ids, np.zeros((p, k - w), dtype=ids.dtype)], axis=1)
        vals = np.concatenate([vals, np.full((p, k - w), -np.inf)], axis=1)
    return ids, vals


def _normalise(
    vals: np.ndarray, widths: np.ndarray, layout: Layout, rb: Any, pos_off: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(log-probs [P, k], tail [P], over [P] flag of sums above one)."""
    if layout.value_kind == "prob":
        with np.errstate(divide="ignore"):
            lp = np.log(np.clip(vals, 0.0, None))
    else:
        lp = vals
    p = lp.shape[0]
    if not layout.normalized:
        m = np.max(lp, axis=1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)
        with np.errstate(divide="ignore"):
            lse = m + np.log(np.exp(lp - m).sum(axis=1, keepdims=True))
        return lp - lse, np.full(p, -np.inf), np.zeros(p, dtype=bool)
    total = np.exp(lp).sum(axis=1)
    over = total > 1 + SUM_EPS
    if layout.tail is not None:
        _, t_vals = _list_offsets(rb.column(layout.tail))
        tail = _numbers(t_vals, np.float64)
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
        vals = _numbers(flat, np.int64) != 0
        any_on = np.add.reduceat(vals, e_off[:-1]) > 0 if len(vals) else np.zeros(0, bool)
        any_on = np.where(np.diff(e_off) > 0, any_on, False)
        per_pos = any_on
    else:
        per_pos = _numbers(per, np.int64) != 0
    out = np.zeros(int(pos_off[-1]), dtype=bool)
    n_pos = np.diff(pos_off)
    n_mask = np.diff(off)
    take = np.minimum(n_pos, n_mask)
    src = _ranges(off[:-1], take)
    dst = _ranges(pos_off[:-1], take)
    out[dst] = per_pos[src]
    return out
