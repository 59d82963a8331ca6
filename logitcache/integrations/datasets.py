"""A cache as a Hugging Face ``datasets.IterableDataset``, for tools that only take ``datasets``.

``to_iterable_dataset(url)`` streams the cache's rows, decoded, one record per row (columns named
like the loader's batch keys, ``docs/loader.md``):

- ``row_id`` int64; ``input_ids`` list<int32> [S]; ``loss_mask`` list<bool> [S] (True where
  position ``t`` has a target: the teacher's prediction of token ``t + 1``);
- ``target_ids`` list<list<int32>> [S][k]: the stored top-k ids of each position in ascending id
  order (as stored and as the loader delivers them), an empty list where ``loss_mask`` is False;
- ``logprobs`` list<list<float32>> [S][k]: their log-probs at T = 1 over the teacher's whole
  vocabulary (the codec's quantisation decoded; ``-inf`` for padding entries of short rows);
- ``tail_logprob`` list<float32> [S]: log of the mass outside ``target_ids`` (null where there is
  no target). Absent when the cache's ``targets.tail`` is ``"unknown"`` (values renormalised over
  the k ids by an import).

Streaming: nothing is materialised; each generator call opens its own reader and reads whole
shards (``batch_rows`` rows at a time), decoded by the codec's one decode (``CacheReader``). The
shard list is the generator's sharded argument, so ``ds.num_shards`` equals the cache's shard
count and a ``DataLoader(ds, num_workers=n)`` (or ``datasets.distributed.split_dataset_by_node``)
splits the shards between workers/ranks. ``split=("train" | "eval", f)`` keeps the rows of
``logitcache train --eval-fraction f``'s split. Sampled caches are refused (these columns would
read draw counts as a truncated distribution): train on them with the loader.

Python lists are the cost of ``datasets``' row records: decoding is ~100x faster than building
them, so this is for tools that need ``datasets``, not the fast path (``make_loader`` is).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from logitcache.data.sampler import split_mask
from logitcache.errors import ConfigError
from logitcache.format.targets import TopKTargets
from logitcache.store import CacheReader

__all__ = ["features", "to_iterable_dataset"]


def features(tail: bool = True) -> Any:
    """The ``datasets.Features`` of the records (``tail``: with the ``tail_logprob`` column)."""
    import datasets as hf

    cols: dict[str, Any] = {
        "row_id": hf.Value("int64"),
        "input_ids": hf.Sequence(hf.Value("int32")),
        "loss_mask": hf.Sequence(hf.Value("bool")),
        "target_ids": hf.Sequence(hf.Sequence(hf.Value("int32"))),
        "logprobs": hf.Sequence(hf.Sequence(hf.Value("float32"))),
    }
    if tail:
        cols["tail_logprob"] = hf.Sequence(hf.Value("float32"))
    return hf.Features(cols)


def to_iterable_dataset(
    url: str,
    *,
    split: tuple[str, float] | None = None,
    batch_rows: int = 64,
    storage_options: Mapping[str, Any] | None = None,
) -> Any:
    """Stream the cache at ``url`` as a ``datasets.IterableDataset`` of decoded rows."""
    try:
        import datasets as hf
    except ImportError as e:
        raise ConfigError(
            "to_iterable_dataset needs the datasets package: pip install 'logitcache[datasets]'"
        ) from e
    if batch_rows < 1:
        raise ConfigError(f"batch_rows must be >= 1, got {batch_rows}")
    reader = CacheReader(url, storage_options=storage_options)  # refuses an incomplete cache
    m = reader.manifest
    if m.targets.method != "topk":
        raise ConfigError(
            f"cache {url} holds {m.targets.method} targets (ids with draw counts); these columns "
            "hold top-k log-probs and would misread them; read it with make_loader instead"
        )
    tail = m.targets.tail != "unknown"
    return hf.IterableDataset.from_generator(
        _records,
        features=features(tail),
        gen_kwargs={
            "shards": list(range(reader.num_shards)),
            "url": url,
            "split": None if split is None else (str(split[0]), float(split[1])),
            "batch_rows": int(batch_rows),
            "tail": tail,
            "storage_options": dict(storage_options) if storage_options else None,
        },
    )


def _records(
    shards: list[int],
    url: str,
    split: tuple[str, float] | None,
    batch_rows: int,
    tail: bool,
    storage_options: dict[str, Any] | None,
) -> Iterator[dict[str, Any]]:
    """Generator body (module level: ``datasets`` pickles it); ``shards`` is its sharded list."""
    reader = CacheReader(url, storage_options=storage_options)
    offsets = reader.shard_row_offsets
    keep = None if split is None else split_mask(int(offsets[-1]), *split)
    for shard in shards:
        lo, hi = int(offsets[shard]), int(offsets[shard + 1])
        for start in range(lo, hi, batch_rows):
            stop = min(start + batch_rows, hi)
            rows = reader.read_rows(start, stop)
            targets = rows.targets
            if not isinstance(targets, TopKTargets):
                raise ConfigError(f"cache {url}: expected top-k targets in shard {shard}")
            yield from _row_records(rows, targets, tail, keep, start)


def _row_records(
    rows: Any, t: TopKTargets, tail: bool, keep: np.ndarray | None, start: int
) -> Iterator[dict[str, Any]]:
    mask = np.asarray(rows.loss_mask, dtype=bool)
    ids, lps, tails = t.ids.tolist(), t.logprobs.tolist(), t.tail_logprob.tolist()
    at = 0  # the targets of row r are its loss_mask positions, in order
    for r in range(mask.shape[0]):
        where = np.flatnonzero(mask[r]).tolist()
        n = len(where)
        if keep is None or keep[start + r]:
            s = mask.shape[1]
            row_ids: list[list[int]] = [[] for _ in range(s)]
            row_lps: list[list[float]] = [[] for _ in range(s)]
            row_tail: list[float | None] = [None] * s
            for j, p in enumerate(where):
                row_ids[p], row_lps[p], row_tail[p] = ids[at + j], lps[at + j], tails[at + j]
            rec: dict[str, Any] = {
                "row_id": int(rows.row_id[r]),
                "input_ids": rows.input_ids[r].tolist(),
                "loss_mask": mask[r].tolist(),
                "target_ids": row_ids,
                "logprobs": row_lps,
            }
            if tail:
                rec["tail_logprob"] = row_tail
            yield rec
        at += n
