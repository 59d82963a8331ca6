"""Stage one: run a teacher once over a dataset and write its sparse targets to a cache.

::

    inputs (readers, chat, packing) -> teacher (loaded, head split off) -> sparsify (on device)
      -> pipeline (background writer, progress) -> store (shards, manifest)

- :mod:`logitcache.dump.run`: :class:`DumpConfig` and :func:`run_dump`, the order of work;
- :mod:`logitcache.dump.inputs` (with ``readers`` and ``chat``): documents to fixed-length rows;
- :mod:`logitcache.dump.teacher` and ``head``: loading a teacher, its chunkable output head;
- :mod:`logitcache.dump.sparsify`: top-k or sampled targets on the device;
- :mod:`logitcache.dump.pipeline`: the threads around the loop, rank parts, resume trimming.

The training side never imports this package: a student's machine needs neither the teacher nor
its input pipeline (``tests/test_layout.py`` keeps that rule).
"""

from __future__ import annotations

from logitcache.dump.run import DumpConfig, DumpResult, finalize_dump, run_dump

__all__ = ["DumpConfig", "DumpResult", "finalize_dump", "run_dump"]
