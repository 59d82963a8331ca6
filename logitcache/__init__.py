"""logitcache: offline knowledge distillation from cached sparse teacher targets.

The public API, importable from the top level (loaded on first use, so ``import logitcache`` and
the CLI stay fast):

- the cache: :class:`CacheWriter`, :class:`CacheHeader`, :class:`CacheReader`,
  :func:`finalize_cache`, :func:`cache_tokenizer` (the tokenizer a cache stores); format:
  :class:`Manifest`, :class:`TopKCodec`, :class:`SampledCodec`, :class:`TopKTargets`,
  :class:`SampledTargets`, :class:`TargetsInfo`, :class:`SourceInfo`;
- training data: :func:`make_loader`, :func:`teacher_targets`, :class:`RowSampler`;
- losses: :func:`kd_loss`, :func:`fused_linear_kd_loss`, :class:`SparseKDLoss`,
  :class:`FusedLinearKDLoss`, :class:`TopKTeacher`, :class:`SampledTeacher`;
- the two stages as functions: :func:`run_dump` / :class:`DumpConfig` (returns a
  :class:`DumpResult`), :func:`run_train` / :class:`TrainConfig` (no exported name shadows a
  subpackage, so ``logitcache.run_train`` stays callable after ``import logitcache.train``);
- other tools' layouts: :func:`import_cache` / :class:`ImportConfig`, :func:`export_cache`;
- errors: :class:`LogitCacheError` and its subclasses in :mod:`logitcache.errors`.
"""

from __future__ import annotations

import importlib
from typing import Any

from logitcache.errors import LogitCacheError

__version__ = "0.1.0"

_LAZY = {
    "CacheHeader": "logitcache.store",
    "CacheReader": "logitcache.store",
    "CacheWriter": "logitcache.store",
    "finalize_cache": "logitcache.store",
    "cache_tokenizer": "logitcache.store.tokenizer",
    "Manifest": "logitcache.format",
    "SampledCodec": "logitcache.format",
    "SampledTargets": "logitcache.format",
    "SourceInfo": "logitcache.format",
    "TargetsInfo": "logitcache.format",
    "TopKCodec": "logitcache.format",
    "TopKTargets": "logitcache.format",
    "RowSampler": "logitcache.data",
    "make_loader": "logitcache.data",
    "teacher_targets": "logitcache.data.targets",
    "FusedLinearKDLoss": "logitcache.loss",
    "SampledTeacher": "logitcache.loss",
    "SparseKDLoss": "logitcache.loss",
    "TopKTeacher": "logitcache.loss",
    "fused_linear_kd_loss": "logitcache.loss",
    "kd_loss": "logitcache.loss",
    "DumpConfig": "logitcache.dump",
    "DumpResult": "logitcache.dump",
    "run_dump": "logitcache.dump",
    "ImportConfig": "logitcache.transform.importer",
    "import_cache": "logitcache.transform.importer",
    "export_cache": "logitcache.transform.exporter",
    "TrainConfig": "logitcache.train",
    "run_train": "logitcache.train",
}

__all__ = ["LogitCacheError", "__version__", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'logitcache' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
