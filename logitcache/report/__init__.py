"""Looking at caches and training runs: ``logitcache info``, ``verify`` and ``report``.

- :mod:`.info`: a summary from the manifest alone (``logitcache info``);
- :mod:`.verify`: every shard read and checked (``logitcache verify``);
- :mod:`.cache_stats`: what the stored targets say (captured mass vs k, fidelity, entropy,
  bytes per array) from a documented, seeded sample of positions; numpy only;
- :mod:`.runs`: a training run's ``metrics.jsonl`` and ``summary.json`` read back;
- :mod:`.plots` and :mod:`.html`: the figures (matplotlib, the optional ``report`` extra) and one
  self-contained HTML page with them inline;
- :mod:`.build`: ``logitcache report`` itself (:func:`report`).

Only the plotting needs matplotlib; it is imported when a figure is drawn, so ``info`` and
``verify`` never pay for it, and without it the report stops with one line naming the extra.
"""

from __future__ import annotations

from logitcache.report.build import ReportResult, report, report_cache, report_runs
from logitcache.report.info import cache_info, format_info
from logitcache.report.verify import VerifyReport, verify_cache

__all__ = [
    "ReportResult",
    "VerifyReport",
    "cache_info",
    "format_info",
    "report",
    "report_cache",
    "report_runs",
    "verify_cache",
]
