"""Stage two: train a student from a cache alone (single device, or DDP/FSDP2 under torchrun).

- :mod:`logitcache.train.run`: :class:`TrainConfig` and :func:`run_train`, the flat trainer loop;
- :mod:`logitcache.train.student`: loading a student and checking it fits the cache;
- :mod:`logitcache.train.checkpoint`: atomic, rotated checkpoints and their resume;
- :mod:`logitcache.train.fsdp`: ``--fsdp`` (FSDP2 sharding plan, process group, full export);
- :mod:`logitcache.train.sharded_checkpoint`: ``--fsdp`` checkpoints (DCP, reshardable);
- :mod:`logitcache.train.evaluate`: held-out metrics (KL to the teacher, CE, agreement, ECE).

Imports ``data``, ``loss``, ``store`` and ``format``; never ``dump``.
"""

from __future__ import annotations

from logitcache.train.run import TrainConfig, run_train

__all__ = ["TrainConfig", "run_train"]
