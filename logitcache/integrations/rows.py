"""The data side of the trainer integrations: row ids in, decoded KD batches out.

A Hugging Face ``Trainer`` owns its data loop: its sampler (shuffled, sharded per process by
Accelerate), gradient accumulation, ``resume_from_checkpoint`` (it replays the epoch's sampler
order and skips the batches already trained) and FSDP/DeepSpeed all assume a **map-style dataset**
plus a **collator**. So the cache is split in two here:

- :class:`CacheRowDataset`: item ``i`` is the global row id of the cache (a plain ``int``), over
  the whole cache or one side of ``logitcache train``'s held-out split (the same fixed,
  seed-independent rows). Items are not dicts on purpose: the Trainer's
  ``remove_unused_columns`` drops the dict keys the model's ``forward`` does not accept (the bug
  that silently dropped the logits column in DistillKit), and it passes anything else through
  untouched, so there is nothing it could drop. A ``datasets.Dataset`` with one ``row_id`` column
  works too (TRL's ``SFTTrainer`` accepts nothing else); the trainer mixin keeps that column.
- :class:`CacheCollator`: ``collator([row ids])`` reads those rows through the loader's map-style
  :class:`~logitcache.data.CachedLogitDataset` (shard LRU per process, checksums verified) and its
  :class:`~logitcache.data.TargetDequantizer`, and returns the loader's batch layout
  (``docs/loader.md``) as CPU tensors: ``input_ids``, pre-shifted ``labels``, ``target_index``,
  ``target_labels``, ``target_ids``, ``logprobs``, ``tail_logprob``... The Trainer (Accelerate)
  moves them to the device. The decode runs on the host, in the DataLoader's workers when
  ``dataloader_num_workers > 0``: the loader's compact device-side decode needs its own prefetcher,
  which a Trainer does not run (cost measured by ``scripts/bench_loader.py``: ~3.6 ms per 16k
  positions at k=64 on one core, small next to a student step).
- :class:`CacheOrderSampler`: optional; the row order of ``logitcache train`` (its
  :class:`~logitcache.data.RowSampler` at world size 1), so that a Trainer run and a
  ``logitcache train`` run see the same rows in the same steps (the comparison in
  ``tests/integrations``); the Trainer's own sampler is the default.

Worker note: inside a DataLoader worker the loader's collate writes into that worker's ring of
shared-memory buffers (``data/_packing.py``); this collator decodes in the worker, so the ring's
slots stay lent and the collate falls back to one new shared segment per batch after the first
six. Correct, and the same cost as a plain DataLoader; a hook to skip the ring would save it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.utils.data

from logitcache.data import (
    CachedLogitDataset,
    RowBatch,
    RowSampler,
    TargetDequantizer,
    make_loader,
)
from logitcache.data.collate import TargetOptions
from logitcache.data.sampler import split_mask
from logitcache.errors import ConfigError
from logitcache.format.manifest import Manifest
from logitcache.store import CacheReader

__all__ = ["ROW_COLUMN", "CacheCollator", "CacheOrderSampler", "CacheRowDataset"]

#: the one column a ``datasets.Dataset`` of cache rows holds (the batch key of the same ids)
ROW_COLUMN = "row_id"


def _split(split: tuple[str, float] | None) -> tuple[str, float] | None:
    if split is None:
        return None
    if not (isinstance(split, tuple | list) and len(split) == 2):
        raise ConfigError(f"split must be ('train' | 'eval', held-out fraction), got {split!r}")
    return (str(split[0]), float(split[1]))


class CacheRowDataset(torch.utils.data.Dataset[int]):
    """Map-style: ``ds[i]`` is a global row id of the cache at ``url`` (an ``int``).

    ``split=("train", f)`` / ``("eval", f)``: only the rows ``logitcache train --eval-fraction f``
    trains on / holds out. Opening the manifest refuses an incomplete cache
    (:class:`~logitcache.errors.CacheIncompleteError`).
    """

    def __init__(
        self,
        url: str,
        *,
        split: tuple[str, float] | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        reader = CacheReader(url, storage_options=storage_options)
        self.url = url
        self.storage_options = dict(storage_options) if storage_options else None
        self.manifest: Manifest = reader.manifest
        self.shard_sizes = [s.rows for s in reader.manifest.shards]
        self.split = _split(split)
        total = int(sum(self.shard_sizes))
        keep = np.ones(total, bool) if self.split is None else split_mask(total, *self.split)
        self.rows = np.flatnonzero(keep).astype(np.int64)
        if not len(self.rows):
            raise ConfigError(f"cache {url} has no rows in split {self.split}")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> int:
        return int(self.rows[index])

    def index_of(self, rows: np.ndarray) -> np.ndarray:
        """Dataset indices of global row ids (which must be in this dataset)."""
        rows = np.asarray(rows, dtype=np.int64)
        at = np.searchsorted(self.rows, rows)
        if rows.size and (at.max() >= len(self.rows) or (self.rows[at] != rows).any()):
            raise ConfigError(f"some rows are not in this dataset (split {self.split})")
        return at

    def to_hf(self) -> Any:
        """The same rows as a ``datasets.Dataset`` with one ``row_id`` column (for TRL)."""
        try:
            import datasets
        except ImportError as e:
            raise ConfigError("to_hf needs datasets: pip install 'logitcache[datasets]'") from e
        return datasets.Dataset.from_dict({ROW_COLUMN: self.rows.tolist()})


def _row_ids(features: Sequence[Any]) -> np.ndarray:
    out = np.empty(len(features), dtype=np.int64)
    for i, f in enumerate(features):
        value = f[ROW_COLUMN] if isinstance(f, Mapping) and ROW_COLUMN in f else f
        if isinstance(value, torch.Tensor):
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ConfigError(
                f"CacheCollator takes cache row ids (ints, or dicts with a {ROW_COLUMN!r} key, "
                f"from CacheRowDataset); item {i} is {type(f).__name__} {f!r:.80}; if it is a dict "
                f"without {ROW_COLUMN!r}, the Trainer's remove_unused_columns dropped it: use "
                "KDTrainer / KDTrainerMixin, which keep it"
            )
        out[i] = int(value)
    return out


class CacheCollator:
    """``collator(row ids) -> batch``: the loader's batch layout as CPU tensors, dequantised.

    ``top_k``, ``keep_tail``, ``temperature``, ``student_vocab``: see
    :class:`~logitcache.data.TargetOptions` (``temperature`` attaches the stored normaliser when
    the cache recorded it; ``student_vocab`` refuses input tokens a truncated student lacks,
    which :class:`~logitcache.integrations.transformers.KDTrainer` sets itself). Picklable
    (DataLoader workers open their own reader). ``max_cached_shards``: decoded shards kept per
    process; a shuffled order touches every shard, so size it to the cache when it fits.
    """

    def __init__(
        self,
        url: str,
        *,
        top_k: int | None = None,
        keep_tail: bool = True,
        temperature: float | None = None,
        student_vocab: int | None = None,
        max_cached_shards: int = 16,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.url = url
        self.max_cached_shards = max_cached_shards
        self.storage_options = storage_options
        self.dataset = self._dataset(
            TargetOptions(
                top_k=top_k,
                keep_tail=keep_tail,
                temperature=temperature,
                student_vocab=student_vocab,
            )
        )
        self.manifest: Manifest = self.dataset.reader.manifest
        self.dequantize = TargetDequantizer(self.dataset.reader.codec)

    def restrict_vocab(self, student_vocab: int) -> None:
        """From now on refuse rows with input tokens ``>= student_vocab`` (a truncated student
        cannot embed them), naming row and position, as ``logitcache train``'s loader does."""
        options = self.dataset.collator.options
        self.dataset = self._dataset(dataclasses.replace(options, student_vocab=student_vocab))

    def _dataset(self, options: TargetOptions) -> CachedLogitDataset:
        return CachedLogitDataset(
            self.url,
            options=options,
            max_cached_shards=self.max_cached_shards,
            storage_options=self.storage_options,
        )

    def __call__(self, features: Sequence[Any]) -> dict[str, Any]:
        rows = _row_ids(features)
        if not len(rows):
            raise ConfigError("CacheCollator got an empty batch")
        batch = RowBatch(epoch=0, start=0, rows=rows, is_pad=np.zeros(len(rows), bool))
        out = self.dequantize(self.dataset[batch])
        # own memory: the fields are views of one packed buffer, which may be a worker ring slot
        return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in out.items()}


class CacheOrderSampler(torch.utils.data.Sampler[int]):
    """The row order of ``logitcache train`` over a :class:`CacheRowDataset`, one epoch at a time.

    Yields dataset indices: epoch ``e``'s batches of the sampler of ``make_loader(url, batch_size,
    order=order, seed=seed, split=dataset.split, world_size=1)`` (the loader ``logitcache train``
    builds, so its defaults are shared), padding rows left out (at world
    size 1 they only fill the epoch's last batch, so the Trainer's batches of ``batch_size`` are
    exactly the trainer's). ``set_epoch`` is called by the Trainer (through Accelerate) at each
    epoch. Under several processes Accelerate deals these batches to the ranks in turn: every row
    is still seen once per epoch, in another split than ``logitcache train``'s.
    """

    def __init__(
        self,
        dataset: CacheRowDataset,
        batch_size: int,
        *,
        order: str = "random",
        seed: int = 0,
    ) -> None:
        if not isinstance(dataset, CacheRowDataset):
            raise ConfigError(
                f"CacheOrderSampler needs a CacheRowDataset, got {type(dataset).__name__}"
            )
        self.dataset = dataset
        # the trainer's own loader builds the sampler: its defaults (window size...) are the
        # one source of truth, so the two orders cannot drift apart
        loader = make_loader(
            dataset.url,
            batch_size,
            seed=seed,
            order=order,
            split=dataset.split,
            rank=0,
            world_size=1,
            device="cpu",
            storage_options=dataset.storage_options,
        )
        self.sampler: RowSampler = loader.sampler
        loader.close()

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[int]:
        for batch in self.sampler:  # iterated in the main process: one unit
            rows = np.asarray(batch.rows)[~np.asarray(batch.is_pad, dtype=bool)]
            yield from self.dataset.index_of(rows).tolist()
