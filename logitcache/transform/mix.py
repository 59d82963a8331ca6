"""``logitcache mix``: several teachers' top-k caches over the same rows into one cache.

The mixture of teachers with weights ``w_s`` (summing to 1) is ``q(v) = sum_s w_s p_s(v)``. From
sparse targets it is built per position as:

1. the union of the sources' stored ids, each id's mixed probability ``sum_s w_s p_s(v)`` where a
   source that did not store ``v`` contributes 0 (``v`` is somewhere in its tail, and the tail
   does not say where);
2. re-cut to the ``k`` most probable ids of the union (``k`` = the largest source ``k`` unless
   given); the mass of the ids cut, plus ``sum_s w_s tail_s``, is the new tail bucket, so the
   result is a proper distribution over the k ids plus the tail.

What that costs, against the exact mixture of the full distributions: an id stored by one source
and not another loses the other's (unknown, at most that source's smallest stored probability)
share to the tail. With the tail-bucket KL that is a move of mass within the coarsened
distribution, never a loss of mass. Step 2 is lossless for the tail-bucket KL (the cut ids' mass
is exactly what the bucket holds); ``MixResult.moved_mass`` reports the mean probability it moved
into the bucket. ``scripts/bench_derived.py`` measures the KL from the exact mixture of full
distributions to the mixed cache on real distributions.

Rows: the sources must hold the same rows (row ids) with the same tokens and loss masks, which is
checked row by row (a cache dumped with another world size stores its rows in another order: rows
are matched by id). Same tokenizer (fingerprint) and vocabulary are required; caches of different
tokenizers are first aligned to one (``logitcache align``). Recorded temperatures are dropped (the
mixture's log-normaliser at another temperature is not a function of the sources').

Sampled caches are refused: an RS-KD sample is drawn from one teacher, and mixing counts from
several would need each draw's probability under every other teacher, which a sampled cache does
not store. Dump top-k caches to mix, or dump the mixture's samples directly.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from logitcache.errors import ConfigError
from logitcache.format import TopKCodec
from logitcache.format.manifest import Manifest, SourceInfo, TargetsInfo
from logitcache.format.targets import TopKTargets
from logitcache.store import CacheHeader, CacheReader, CacheWriter
from logitcache.store.header import DEFAULT_SHARD_BYTES
from logitcache.store.tokenizer import read_tokenizer_files

__all__ = ["MixResult", "mix_caches", "mix_topk"]

_BATCH_ROWS = 64


@dataclass(frozen=True)
class MixResult:
    manifest: Manifest
    weights: tuple[float, ...]
    moved_mass: float  # mean probability per position moved into the tail by the re-cut

    def summary(self) -> str:
        m = self.manifest
        return (
            f"mixed {len(self.weights)} caches (weights {list(self.weights)}): {m.num_rows:,} "
            f"rows, {m.num_positions:,} positions, top-{m.targets.k} + tail; the re-cut moved "
            f"{self.moved_mass:.4f} of the mass per position into the tail; content digest "
            f"{m.content_digest}"
        )


def mix_topk(parts: Sequence[TopKTargets], weights: Sequence[float], k: int) -> TopKTargets:
    """The weighted mixture of top-k targets over the same positions, re-cut to ``k`` (see the
    module docstring). Pure numpy; ids of the result come back by decreasing probability."""
    n = parts[0].num_positions
    ids = np.concatenate([t.ids for t in parts], axis=1).astype(np.int64)
    probs = np.concatenate(
        [w * np.exp(t.logprobs.astype(np.float64)) for t, w in zip(parts, weights, strict=True)],
        axis=1,
    )
    tail = sum(
        w * np.exp(t.tail_logprob.astype(np.float64)) for t, w in zip(parts, weights, strict=True)
    )
    order = np.argsort(ids, axis=1, kind="stable")
    ids = np.take_along_axis(ids, order, axis=1)
    probs = np.take_along_axis(probs, order, axis=1)
    width = ids.shape[1]
    first = np.ones_like(ids, dtype=bool)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    group = np.cumsum(first.reshape(-1)) - 1
    merged = np.bincount(group, weights=probs.reshape(-1))
    slot = np.cumsum(first, axis=1) - 1  # each entry's index among its position's unique ids
    uniq_ids = np.zeros((n, width), dtype=np.int64)
    uniq_p = np.zeros((n, width))
    rows = np.repeat(np.arange(n), width).reshape(n, width)
    uniq_ids[rows[first], slot[first]] = ids[first]
    uniq_p[rows[first], slot[first]] = merged
    if width > k:
        top = np.argpartition(-uniq_p, k - 1, axis=1)[:, :k]
        kept_ids = np.take_along_axis(uniq_ids, top, axis=1)
        kept_p = np.take_along_axis(uniq_p, top, axis=1)
        tail = tail + (uniq_p.sum(axis=1) - kept_p.sum(axis=1))
    else:
        pad = k - width
        kept_ids = np.pad(uniq_ids, ((0, 0), (0, pad)))
        kept_p = np.pad(uniq_p, ((0, 0), (0, pad)))
    by_p = np.argsort(-kept_p, axis=1, kind="stable")
    kept_ids = np.take_along_axis(kept_ids, by_p, axis=1)
    kept_p = np.take_along_axis(kept_p, by_p, axis=1)
    with np.errstate(divide="ignore"):
        return TopKTargets(
            ids=kept_ids.astype(np.int32),
            logprobs=np.log(kept_p).astype(np.float32),
            tail_logprob=np.log(np.clip(tail, 0.0, None)).astype(np.float32),
            temperature_lognorm=np.zeros((n, 0), dtype=np.float32),
        )


def mix_caches(
    out: str,
    sources: Sequence[str],
    weights: Sequence[float] | None = None,
    *,
    k: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
) -> MixResult:
    """Mix the top-k caches ``sources`` with ``weights`` (default equal) into a new cache."""
    if len(sources) < 2:
        raise ConfigError(f"mix needs at least two caches, got {len(sources)}")
    w = _weights(weights, len(sources))
    readers = [CacheReader(u, storage_options=storage_options) for u in sources]
    manifests = [r.manifest for r in readers]
    _check_sources(sources, manifests)
    k = k or max(int(m.targets.k or 0) for m in manifests)
    first = manifests[0]
    names = [f"{m.teacher.name or '?'}:{x:g}" for m, x in zip(manifests, w, strict=True)]
    header = CacheHeader(
        # the first source's value mode: mixing float caches gives a float cache
        codec=TopKCodec(
            k=k,
            vocab_size=first.vocab_size,
            num_temperatures=0,
            values=getattr(first.codec, "values", "sqrt"),
        ),
        targets=TargetsInfo("topk", k=k, tail="bucket"),
        seq_len=first.seq_len,
        vocab_size=first.vocab_size,
        padded_vocab_size=first.padded_vocab_size,
        backend=first.backend,
        compression_level=int(first.compression.get("level", 15)),
        teacher=SourceInfo(
            "mix(" + ", ".join(names) + ")",
            None,
            hashlib.sha256(
                json.dumps([m.teacher.to_dict() for m in manifests]).encode()
            ).hexdigest(),
        ),
        tokenizer=first.tokenizer,
        dataset=first.dataset,
        extra={
            "mix": {
                "weights": list(w),
                "sources": [
                    {"url": u, "content_digest": m.content_digest, "teacher": m.teacher.to_dict()}
                    for u, m in zip(sources, manifests, strict=True)
                ],
            }
        },
    )
    moved, positions = 0.0, 0
    writer = CacheWriter(
        out,
        header,
        shard_bytes=shard_bytes,
        overwrite=overwrite,
        storage_options=storage_options,
        tokenizer_files=_tokenizer_files(readers),  # the sources' (format 1.3)
    )
    with writer:
        for (row_id, input_ids, loss_mask), parts in _aligned_batches(sources, readers):
            cut = mix_topk(parts, w, k)
            union_tail = sum(x * np.exp(t.tail_logprob.astype(np.float64))
                             for t, x in zip(parts, w, strict=True))  # fmt: skip
            moved += float((np.exp(cut.tail_logprob.astype(np.float64)) - union_tail).sum())
            positions += cut.num_positions
            writer.write(row_id, input_ids, loss_mask, cut)
        manifest = writer.commit()
    return MixResult(manifest, w, moved / max(positions, 1))


def _weights(weights: Sequence[float] | None, n: int) -> tuple[float, ...]:
    if weights is None:
        return tuple([1.0 / n] * n)
    if len(weights) != n:
        raise ConfigError(f"--weights has {len(weights)} values for {n} caches; give one each")
    if any(not (x >= 0 and np.isfinite(x)) for x in weights) or sum(weights) <= 0:
        raise ConfigError(f"--weights must be finite, >= 0 and not all 0, got {list(weights)}")
    total = float(sum(weights))
    return tuple(float(x) / total for x in weights)


def _tokenizer_files(readers: Sequence[CacheReader]) -> dict[str, bytes] | None:
    """The tokenizer's files of the first source that stores them (sources share a tokenizer)."""
    for r in readers:
        if r.manifest.tokenizer.files:
            return read_tokenizer_files(r.loc, r.manifest)
    return None


def _check_sources(sources: Sequence[str], manifests: Sequence[Manifest]) -> None:
    a = manifests[0]
    for url, m in zip(sources, manifests, strict=True):
        if m.targets.method != "topk":
            raise ConfigError(
                f"{url} holds sampled targets; mix takes top-k caches only (a sample is drawn "
                "from one teacher: mixing counts would need every draw's probability under the "
                "other teachers). Dump top-k caches to mix them"
            )
        if m.targets.tail != "bucket":
            raise ConfigError(
                f"{url}: its tail mass is {m.targets.tail}; mixing needs each source's tail"
            )
        for field in ("seq_len", "vocab_size"):
            if getattr(m, field) != getattr(a, field):
                raise ConfigError(
                    f"{url} has {field} {getattr(m, field)} but {sources[0]} has "
                    f"{getattr(a, field)}: mixed caches must cover the same rows of the same "
                    "vocabulary"
                )
        fa, fm = a.tokenizer.fingerprint, m.tokenizer.fingerprint
        if fa and fm and fa != fm:
            raise ConfigError(
                f"{url} was dumped with another tokenizer than {sources[0]} (fingerprints "
                f"{fm[:12]} vs {fa[:12]}); align one to the other first: logitcache align"
            )
        if m.num_rows != a.num_rows:
            raise ConfigError(
                f"{url} holds {m.num_rows} rows but {sources[0]} holds {a.num_rows}: mixed caches "
                "must hold the same rows"
            )


def _aligned_batches(
    sources: Sequence[str], readers: Sequence[CacheReader]
) -> Iterator[tuple[tuple[np.ndarray, np.ndarray, np.ndarray], list[TopKTargets]]]:
    """Batches of the first source's rows, with every source's targets for the same rows (matched
    by row id), tokens and loss masks checked equal."""
    for a in readers[0].iter_rows(batch_rows=_BATCH_ROWS):
        parts = [_topk(a.targets, sources[0])]
        for j in range(1, len(readers)):
            input_ids, loss_mask, targets = _rows_like(readers[j], a.row_id, sources[j])
            differ = (input_ids != a.input_ids).any(1) | (loss_mask != a.loss_mask).any(1)
            if differ.any():
                raise ConfigError(
                    f"row {int(a.row_id[np.argmax(differ)])} has other tokens or loss mask in "
                    f"{sources[j]} than in {sources[0]}: mixed caches must be dumped over the "
                    "same rows (same data, seq_len, packing and special-token settings)"
                )
            parts.append(targets)
        yield (a.row_id, a.input_ids, a.loss_mask), parts


def _topk(targets: Any, url: str) -> TopKTargets:
    if not isinstance(targets, TopKTargets):
        raise ConfigError(f"{url}: expected top-k targets")
    return targets


def _rows_like(
    reader: CacheReader, row_ids: np.ndarray, url: str
) -> tuple[np.ndarray, np.ndarray, TopKTargets]:
    """``reader``'s rows with these ids, in this order: read as one run when the caches agree
    on the order (the usual case), else row by row through the reader's row-id index."""
    start = _position(reader, int(row_ids[0]), url)
    rows = reader.read_rows(start, min(start + len(row_ids), reader.num_rows))
    if len(rows.row_id) == len(row_ids) and np.array_equal(rows.row_id, row_ids):
        return rows.input_ids, rows.loss_mask, _topk(rows.targets, url)
    singles = [reader.read_rows(i, i + 1) for i in (_position(reader, int(r), url)
                                                      for r in row_ids.tolist())]  # fmt: skip
    ts = [_topk(r.targets, url) for r in singles]
    return (
        np.concatenate([r.input_ids for r in singles]),
        np.concatenate([r.loss_mask for r in singles]),
        TopKTargets(
            ids=np.concatenate([t.ids for t in ts]),
            logprobs=np.concatenate([t.logprobs for t in ts]),
            tail_logprob=np.concatenate([t.tail_logprob for t in ts]),
            temperature_lognorm=np.concatenate([t.temperature_lognorm for t in ts]),
        ),
    )


def _position(reader: CacheReader, row_id: int, url: str) -> int:
    try:
        return reader.find(row_id)
    except KeyError:
        raise ConfigError(
            f"row {row_id} is missing from {url}: mixed caches must hold the same rows"
        ) from None
