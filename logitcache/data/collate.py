"""Collate: a batch of cached rows becomes one dict of contiguous, compact host tensors.

Batch layout (B rows of S tokens; N = target positions kept in the batch; all keys always present
unless marked optional):

- ``input_ids`` int64 [B, S]; ``row_id`` int64 [B]; ``is_pad`` bool [B];
- ``position_mask`` bool [B, S]: the positions that carry a target in this batch: stored
  (``loss_mask``), selected (``TargetOptions.positions``) and not in a padding row;
- ``labels`` int64 [B, S]: ``input_ids[b, t + 1]`` where ``position_mask`` (position t predicts the
  next token), ``-100`` elsewhere and at ``t = S - 1``. They are already shifted: compare them with
  the logits at the same position, do not hand them to a Hugging Face model's ``labels=``;
- ``target_index`` int64 [N]: flat indices into ``B * S`` of the kept positions, row-major (the
  student's ``logits.flatten(0, 1).index_select(0, target_index)`` lines up with the targets,
  without the device sync a boolean index costs); ``target_labels`` int64 [N]: the labels there;
- top-k targets, **as they cross to the device** (no ``top_k`` cut): the stored arrays of the kept
  positions, unchanged: the codec's id arrays [N, k] (``id_lo`` + ``id_hi_delta`` (+
  ``id_hi_delta_top`` above 65,536 ids), all uint8, or, in caches before format 1.2,
  ``id_delta_lo`` uint8 + ``id_delta_hi`` uint8/uint16; see ``format/_decode.py``) and either
  ``value_code`` [N, k] + ``tail_code`` [N] (sqrt codecs; ``keep_tail=False`` adds the non-tensor
  ``keep_tail: False``: the tail code is still needed for the normaliser) or ``logprobs`` [N, k]
  in the stored dtype + ``tail_logprob`` float32 [N]. That is 3 B per entry instead of 5 (int32
  ids + codes), and the host does no per-entry arithmetic:
  :class:`~logitcache.data.targets.TargetDequantizer` turns them on the device into
  ``target_ids`` int32 [N, k] (ascending within a position, padding id 0), float32
  ``logprobs`` [N, k] (``log p = value_table[code] - log(sum q(codes) + q(tail_code))``, the
  formula of ``format/_decode.py``; code 0 = padding = ``-inf``) and ``tail_logprob`` float32 [N];
- top-k targets with a ``top_k`` cut (the host must decode to choose the k'): ``target_ids`` int32
  [N, k'] and, for sqrt codecs, ``value_code`` [N, k'] + ``value_lognorm`` float32 [N] (the
  normaliser over all k + 1 stored buckets), else ``logprobs``; ``tail_logprob`` float32 [N]
  (optional: ``keep_tail=False`` drops it);
- sampled targets: ``target_ids`` int32 [N, m] and ``counts`` int32 [N, m], padded to the batch's
  largest ``m`` with id 0 and count 0; ``samples`` (int: draws per position); optional
  ``logprob_code`` uint8 or ``logprobs`` float16 [N, m] when the cache stores the sampled ids'
  log-probs;
- ``temperature_lognorm`` float32 [N] (optional): ``log sum_v p_v^(1/T)`` for
  ``TargetOptions.temperature`` when the cache recorded that T;
- ``kind``: ``"topk"`` or ``"sampled"``.

**Fewer targets than stored** (``top_k``): decoded ids come back sorted by id, not by probability,
so the k' entries with the largest values are selected per position (ties: the smaller id), kept in
ascending id order, and the mass of the dropped entries is *added to the tail bucket*: the tail is
then the mass outside the k' kept ids, exactly what a top-k' dump would have stored (up to the
quantisation of the dropped entries). The sqrt normaliser stays the one over all k + 1 stored
buckets, so the kept log-probs are those of the full decode.

**Checked once per shard, on the host.** :meth:`Collator.view` (the loader builds every shard view
through it) refuses a shard whose decoded ids leave ``[0, vocab_size)``, whose value codes exceed
the codec's levels, or whose ``input_ids`` (hence labels) leave ``[0, padded_vocab_size)``, naming
the shard file and rows (:class:`~logitcache.errors.CacheCorruptError`). The encoder refuses such
values, so only damage or a hand-edited cache gets there. Checking here costs one sum per
position when a shard is loaded (its zstd decompression costs far more), so neither the collate
of each batch nor the device decode nor the training step pays a check: a range check of ids on
the GPU (``int(ids.min())``) is a host synchronisation per step.

**DDP padding.** Rows with ``is_pad`` keep their tokens (static shapes) but have an all-false
``position_mask``, all ``-100`` labels and no targets: they add nothing to a ``(sum, count)`` loss.

Collation is numpy over whole arrays (no per-row or per-position Python loop). Without a cut the
host's only per-entry work is one copy of the kept positions' stored bytes, written straight into
the batch's (shared-memory, in a worker) buffer; the id cumsum and the normaliser run on the
device, where they are nearly free. (Profile before this change, k=64, 16k positions: ~10 ms to
build a batch on the host, of which ids ~1 ms, normaliser ~2-4 ms, pack + copy into shared memory
~2 ms.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from logitcache.data._gather import (
    ShardView,
    batch_order_sources,
    gather_positions,
    gather_rows,
    ragged_arange,
)
from logitcache.data._packing import allocate, pack
from logitcache.errors import CacheCorruptError, ConfigError
from logitcache.format._decode import (
    bad_id_positions,
    decode_entry_ids_np,
    decode_ids_np,
    id_array_dtypes,
    sqrt_cut_np,
)
from logitcache.format.manifest import Manifest
from logitcache.format.sampled import SampledCodec
from logitcache.format.topk import TopKCodec
from logitcache.store.base import EncodedRows

__all__ = ["IGNORE_INDEX", "Collator", "PositionSelector", "TargetOptions", "select_top"]

IGNORE_INDEX = -100
#: ``(input_ids [B, S] int64, loss_mask [B, S] bool) -> bool [B, S]``; must be picklable for workers
PositionSelector = Callable[[np.ndarray, np.ndarray], np.ndarray]
#: a host batch (numpy arrays, before packing) -> a new one; picklable (``data/retokenize.py``)
BatchTransform = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class TargetOptions:
    """What the collate keeps of the stored targets.

    ``top_k``: keep the k' most likely of the k stored ids (top-k caches; None keeps all).
    ``keep_tail``: ship ``tail_logprob`` (False drops it; the loss then derives the tail, or
    ignores it with ``kl-renorm``). ``temperature``: attach that temperature's stored log-normaliser
    (None or 1.0: none). ``positions``: a picklable function selecting a subset of the stored
    positions, e.g. to skip a row's first tokens. ``student_vocab``: a student with fewer ids
    than the teacher (a truncated vocabulary): a shard holding an input token (hence a label)
    ``>=`` it is refused when loaded, naming the first such row and position.
    """

    top_k: int | None = None
    keep_tail: bool = True
    temperature: float | None = None
    positions: PositionSelector | None = None
    #: applied to each host batch before it is packed (in the loader's workers), e.g. the rows
    #: re-expressed in a student's tokens (:class:`~logitcache.data.retokenize.Retokenizer`)
    transform: BatchTransform | None = None
    student_vocab: int | None = None

    def __post_init__(self) -> None:
        if self.top_k is not None and (isinstance(self.top_k, bool) or self.top_k < 1):
            raise ConfigError(f"top_k must be an integer >= 1 or None, got {self.top_k!r}")
        if self.temperature is not None and not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature!r}")
        if self.student_vocab is not None and self.student_vocab < 1:
            raise ConfigError(f"student_vocab must be >= 1 or None, got {self.student_vocab!r}")


def select_top(score: np.ndarray, k: int) -> np.ndarray:
    """Column indices [N, k] of the k largest ``score`` per row (ties: lower column), sorted."""
    order = np.argsort(-score.astype(np.float32), axis=1, kind="stable")[:, :k]
    return np.sort(order, axis=1)


class Collator:
    """Builds host batches for one cache (its codec, sequence length and temperatures)."""

    def __init__(self, manifest: Manifest, options: TargetOptions | None = None) -> None:
        self.options = options or TargetOptions()
        self.codec = manifest.codec
        self.seq_len = manifest.seq_len
        self._shard_paths = tuple(r.path for r in manifest.shards)
        self._input_vocab = manifest.padded_vocab_size
        self.kind = manifest.targets.method
        if not isinstance(self.codec, TopKCodec | SampledCodec):
            raise ConfigError(f"the loader cannot collate codec {self.codec.name!r}")
        if self.options.top_k is not None and not isinstance(self.codec, TopKCodec):
            raise ConfigError("top_k applies to top-k caches; this cache holds sampled targets")
        self._temp_col: int | None = None
        t = self.options.temperature
        if t is not None and t != 1.0:
            temps = manifest.targets.temperatures
            hits = [i for i, v in enumerate(temps) if abs(v - t) <= 1e-6 * max(1.0, t)]
            self._temp_col = hits[0] if hits else None
        self._position_arrays = tuple(
            s.name for s in self.codec.array_specs() if s.level == "position"
        )
        # top-k without a cut ships what is stored and decodes on the device
        self._compact = isinstance(self.codec, TopKCodec) and (
            self.options.top_k is None or self.options.top_k >= self.codec.k
        )
        self._compact_arrays = tuple(
            n
            for n in self._position_arrays
            if n != "temperature_lognorm" and (self.options.keep_tail or n != "tail_logprob")
        )

    def view(self, index: int, data: EncodedRows) -> ShardView:
        """The view of shard ``index`` (just loaded), after the once-per-shard range checks."""
        view = ShardView.build(index, data, self.codec.entry_count_array)
        problem = self._check_shard(view)
        if problem is not None:
            what, positions = problem
            rows = np.unique(np.searchsorted(view.pos_off, positions, side="right") - 1)
            where = self._shard_paths[index] if index < len(self._shard_paths) else "?"
            raise CacheCorruptError(
                f"shard {index} ({where}) is damaged: {what} at {positions.size} positions in "
                f"{rows.size} rows (row ids {data.row_id[rows[:5]].tolist()}"
                f"{' ...' if rows.size > 5 else ''}); run `logitcache verify` and re-copy or "
                "re-dump the cache"
            )
        self._check_student_vocab(index, data)
        return view

    def _check_student_vocab(self, index: int, data: EncodedRows) -> None:
        """Refuse input tokens a truncated student lacks (its embedding cannot read them and, as
        labels, they cannot be learned), naming the first one."""
        v = self.options.student_vocab
        ids = data.input_ids
        if v is None or not ids.size or int(ids.max()) < v:
            return
        r, t = (int(x[0]) for x in np.nonzero(ids >= v))
        where = self._shard_paths[index] if index < len(self._shard_paths) else "?"
        raise ConfigError(
            f"row id {int(data.row_id[r])} position {t} (shard {where}) holds token "
            f"{int(ids[r, t])}, but the student has {v} ids (a truncated vocabulary): it cannot "
            f"read that token nor learn it as a label; use a student with at least "
            f"{int(ids.max()) + 1} ids, or `logitcache align` the cache to the student's tokenizer"
        )

    def _check_shard(self, view: ShardView) -> tuple[str, np.ndarray] | None:
        """(what is wrong, the positions concerned) or None; see the module docstring."""
        data, codec = view.data, self.codec
        ids = data.input_ids
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self._input_vocab):
            bad_rows = np.flatnonzero(((ids < 0) | (ids >= self._input_vocab)).any(axis=1))
            return (
                f"input_ids outside [0, {self._input_vocab}) (padded_vocab_size)",
                view.pos_off[bad_rows],
            )
        enc = data.encoded
        if isinstance(codec, TopKCodec):
            names = id_array_dtypes(codec.id_layout, codec.vocab_size)
            bad = bad_id_positions({n: enc[n] for n in names}, codec.vocab_size)
            if bad.size:
                return f"decoded teacher ids >= vocab_size {codec.vocab_size}", bad
            if codec.values == "sqrt":
                codes, tail_codes, levels = enc["value_code"], enc["tail_code"], codec.quant_levels
                if codes.size and max(int(codes.max()), int(tail_codes.max())) > levels:
                    over = (codes > levels).any(axis=1) | (tail_codes > levels)
                    return f"value codes exceed levels={levels}", np.flatnonzero(over)
        elif isinstance(codec, SampledCodec) and view.ent_off is not None:
            num_unique = enc["num_unique"].astype(np.int64)
            ids_e = decode_entry_ids_np(enc["id_delta_lo"], enc["id_delta_hi"], num_unique)
            bad_e = np.flatnonzero(ids_e >= codec.vocab_size)
            if bad_e.size:
                bad = np.unique(np.searchsorted(view.ent_off, bad_e, side="right") - 1)
                return f"decoded sampled ids >= vocab_size {codec.vocab_size}", bad
        return None

    def __call__(
        self,
        views: Mapping[int, ShardView],
        shard: np.ndarray,
        local: np.ndarray,
        is_pad: np.ndarray,
    ) -> dict[str, Any]:
        """The batch of rows ``(shard[i], local[i])``; ``views`` holds every shard named."""
        row_id, input_ids, stored = gather_rows(views, shard, local, self.seq_len)
        keep = stored & ~np.asarray(is_pad, dtype=bool)[:, None]
        if self.options.positions is not None:
            chosen = np.asarray(self.options.positions(input_ids, stored), dtype=bool)
            if chosen.shape != stored.shape:
                raise ConfigError(
                    f"the positions selector returned shape {chosen.shape}, expected "
                    f"{stored.shape} (a bool mask like loss_mask)"
                )
            keep &= chosen
        labels = np.full(input_ids.shape, IGNORE_INDEX, dtype=np.int64)
        labels[:, :-1] = np.where(keep[:, :-1], input_ids[:, 1:], IGNORE_INDEX)
        target_index = np.flatnonzero(keep.reshape(-1))
        out: dict[str, Any] = {
            "input_ids": input_ids,
            "labels": labels,
            "position_mask": keep,
            "target_index": target_index,
            "target_labels": labels.reshape(-1)[target_index],
            "row_id": row_id,
            "is_pad": np.asarray(is_pad, dtype=bool),
        }
        if self._temp_col is not None:
            tl, _ = gather_positions(views, shard, local, stored, keep, ("temperature_lognorm",))
            out["temperature_lognorm"] = np.ascontiguousarray(
                tl["temperature_lognorm"][:, self._temp_col]
            )
        transform = self.options.transform
        if self._compact and transform is None:
            return self._compact_batch(views, shard, local, stored, keep, out)
        if self._compact and transform is not None:  # the stored arrays in hand, then pack
            pos, _ = gather_positions(views, shard, local, stored, keep, self._compact_arrays)
            if not self.options.keep_tail and "tail_code" in pos:
                out["keep_tail"] = False
            return pack(transform({**out, **pos, "kind": self.kind}))
        wanted = tuple(n for n in self._position_arrays if n != "temperature_lognorm")
        pos, sources = gather_positions(views, shard, local, stored, keep, wanted)
        if isinstance(self.codec, TopKCodec):
            out.update(self._topk(self.codec, pos))
        elif isinstance(self.codec, SampledCodec):
            out.update(self._sampled(self.codec, views, shard, keep, sources, pos))
        out["kind"] = self.kind
        return pack(out if transform is None else transform(out))

    def _compact_batch(
        self,
        views: Mapping[int, ShardView],
        shard: np.ndarray,
        local: np.ndarray,
        stored: np.ndarray,
        keep: np.ndarray,
        out: dict[str, np.ndarray],
    ) -> dict[str, Any]:
        """Top-k without a cut: the stored id deltas and codes, gathered straight into the
        (shared) batch buffer; the device decodes them (:class:`TargetDequantizer`)."""
        n = int(out["target_index"].shape[0])
        first = views[int(shard[0])].data.encoded
        names = self._compact_arrays
        specs = [(k, v.dtype, v.shape) for k, v in out.items()]
        specs += [(name, first[name].dtype, (n, *first[name].shape[1:])) for name in names]
        batch, buf = allocate(specs)
        for k, v in out.items():
            buf[k][...] = v
        gather_positions(views, shard, local, stored, keep, names, out=buf)
        batch["kind"] = self.kind
        if not self.options.keep_tail and "tail_code" in names:
            batch["keep_tail"] = False  # the tail code is shipped for the normaliser only
        return batch

    # -- top-k ---------------------------------------------------------------------------------

    def _topk(self, codec: TopKCodec, pos: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = decode_ids_np(pos)  # the shard was range-checked when loaded (view)
        k2 = codec.k if self.options.top_k is None else min(self.options.top_k, codec.k)
        cut = k2 < codec.k
        out: dict[str, np.ndarray] = {}
        if codec.values == "sqrt":
            codes = pos["value_code"]
            cols = select_top(codes, k2) if cut else None
            kept, lognorm, tail = sqrt_cut_np(codes, pos["tail_code"], codec.quant_levels, cols)
            if cols is not None:
                ids = np.take_along_axis(ids, cols, axis=1)
            out["value_code"], out["value_lognorm"], out["tail_logprob"] = kept, lognorm, tail
        else:
            lp, tail_lp = pos["logprobs"], pos["tail_logprob"]
            if cut:
                cols = select_top(lp, k2)
                dropped = lp.astype(np.float32)
                np.put_along_axis(dropped, cols, -np.inf, axis=1)
                lp = np.take_along_axis(lp, cols, axis=1)
                ids = np.take_along_axis(ids, cols, axis=1)
                tail_lp = np.logaddexp(tail_lp, _logsumexp(dropped))
            out["logprobs"], out["tail_logprob"] = lp, tail_lp.astype(np.float32)
        if cut:  # padding entries (-inf) that survived the cut keep id 0
            ids = np.where(_valid(out, codec), ids, 0).astype(np.int32)
        if not self.options.keep_tail:
            del out["tail_logprob"]
        out["target_ids"] = ids
        return out

    # -- sampled -------------------------------------------------------------------------------

    def _sampled(
        self,
        codec: SampledCodec,
        views: Mapping[int, ShardView],
        shard: np.ndarray,
        keep: np.ndarray,
        sources: Mapping[int, np.ndarray],
        pos: dict[str, np.ndarray],
    ) -> dict[str, Any]:
        m = pos["num_unique"].astype(np.int64)
        n = m.shape[0]
        width = max(1, int(m.max()) if n else 1)
        entry_arrays = [s.name for s in codec.array_specs() if s.level == "entry"]
        first = views[int(shard[0])].data.encoded
        flat = {e: np.zeros(n * width, dtype=first[e].dtype) for e in entry_arrays}
        pos_shard, src = batch_order_sources(shard, keep, sources)
        for s in sources:
            where = np.flatnonzero(pos_shard == s)
            ent_off = views[s].ent_off
            if ent_off is None:  # built for every sampled shard; guards a misuse
                raise ConfigError("sampled shard views need entry offsets")
            e_src = ragged_arange(ent_off[src[where]], m[where])
            e_dst = ragged_arange(where * width, m[where])
            for e in entry_arrays:
                flat[e][e_dst] = views[s].data.encoded[e][e_src]
        valid = np.arange(width)[None, :] < m[:, None]
        # each position's entries, padded with zero steps, are one row of the "delta" layout
        planes = {a: flat[a].reshape(n, width) for a in ("id_delta_lo", "id_delta_hi")}
        ids = decode_ids_np(planes)  # the shard was range-checked when loaded (view)
        ids[~valid] = 0
        counts = flat["count_minus1"].reshape(n, width).astype(np.int32) + 1
        counts[~valid] = 0
        out: dict[str, Any] = {"target_ids": ids, "counts": counts, "samples": codec.samples}
        if "logprob_code" in flat:
            out["logprob_code"] = flat["logprob_code"].reshape(n, width)  # pad code 0 = -inf
        elif "logprobs" in flat:
            lp = flat["logprobs"].reshape(n, width)
            lp[~valid] = -np.inf
            out["logprobs"] = lp
        return out


def _logsumexp(x: np.ndarray) -> np.ndarray:
    """Row-wise log-sum-exp of float32 [N, k] that may hold ``-inf`` rows."""
    m = x.max(axis=1) if x.shape[1] else np.full(x.shape[0], -np.inf, np.float32)
    safe = np.where(np.isfinite(m), m, 0.0).astype(np.float32)
    with np.errstate(divide="ignore"):
        return np.log(np.exp(x - safe[:, None]).sum(axis=1)) + safe


def _valid(out: Mapping[str, np.ndarray], codec: TopKCodec) -> np.ndarray:
    if codec.values == "sqrt":
        return out["value_code"] > 0
    return np.isfinite(out["logprobs"])
