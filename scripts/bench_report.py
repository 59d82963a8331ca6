"""How long ``logitcache report CACHE`` takes on a cache of 1M and of 10M positions.

    python scripts/bench_report.py                     # 1M vs 10M positions, top-64, Zarr
    python scripts/bench_report.py --large 3000000 --repeats 1

The caches are synthetic but built from real teacher distributions (``../shared/data``:
SmolLM2-135M top-256 log-probs over 49,152 ids, reused in a seeded random order; see
``tests/report/real_cache.py``), written by the real ``CacheWriter`` with the default shard size
(128 MiB of raw rows, ~670k positions at k=64). Writing them is not timed. Because the same
2,048 real positions repeat, zstd finds long matches and the shards are smaller than a real
cache's (~32 vs ~100 B/token); decoding is what the report pays for, and that scales with
positions read.

Timed: the whole ``report_cache`` (statistics from the seeded sample, four figures, the page and
its PNGs), min over ``--repeats``, after one warm-up that imports matplotlib; ``stats_s_*`` is the
statistics alone. The report samples at most ``--max-positions`` (default 1M) positions, so the
10M cache reads the shards holding about 1M positions instead of all of them: the target is
``report_s_ratio`` (10M / 1M) <= 2.

The last line is one JSON object with ``report_s_1m``, ``report_s_10m`` and ``report_s_ratio``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "report"))

from real_cache import write_cache  # noqa: E402

from logitcache.report import cache_info, report_cache  # noqa: E402
from logitcache.report.cache_stats import DEFAULT_MAX_POSITIONS, cache_stats  # noqa: E402
from logitcache.report.plots import require_matplotlib  # noqa: E402
from logitcache.store.header import DEFAULT_SHARD_BYTES  # noqa: E402

SEQ = 128


def timed(fn: object, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", type=int, default=1_000_000, help="positions of the small cache")
    ap.add_argument("--large", type=int, default=10_000_000, help="positions of the large cache")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--max-positions", type=int, default=DEFAULT_MAX_POSITIONS)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--work", default=None, help="where to write the caches (default: a tempdir)")
    ap.add_argument("--keep", action="store_true", help="keep the caches")
    args = ap.parse_args()
    require_matplotlib()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-report-"))
    work.mkdir(parents=True, exist_ok=True)
    out: dict[str, float | int | bool] = {}
    try:
        caches = {}
        for label, n in (("1m", args.small), ("10m", args.large)):
            url = work / f"cache-{label}"
            t0 = time.perf_counter()
            if not (url / "manifest.json").exists():
                write_cache(url, n, k=args.k, seq_len=SEQ, shard_bytes=DEFAULT_SHARD_BYTES)
            info = cache_info(str(url))
            print(
                f"cache {label}: {info['positions']:,} positions, {info['shards']} shards, "
                f"{info['bytes_per_token']:.1f} B/token (written in "
                f"{time.perf_counter() - t0:.0f} s, not timed)",
                flush=True,
            )
            caches[label] = url
            out[f"positions_{label}"] = info["positions"]
            out[f"shards_{label}"] = info["shards"]
        report_cache(str(caches["1m"]), work / "warmup.html", max_positions=1000)  # imports
        for label, url in caches.items():
            page = work / f"report-{label}.html"
            rep = timed(
                lambda u=url, p=page: report_cache(str(u), p, max_positions=args.max_positions),
                args.repeats,
            )
            st = timed(lambda u=url: cache_stats(str(u), args.max_positions), args.repeats)
            s = cache_stats(str(url), args.max_positions)
            print(
                f"report {label}: {rep:.2f} s (statistics {st:.2f} s), {s.positions:,} positions "
                f"from {s.shards_read} of {len(s.manifest.shards)} shards"
                + (" (sampled)" if s.sampled else ""),
                flush=True,
            )
            out[f"report_s_{label}"] = round(rep, 3)
            out[f"stats_s_{label}"] = round(st, 3)
            out[f"sampled_{label}"] = s.sampled
            out[f"shards_read_{label}"] = s.shards_read
        out["report_s_ratio"] = round(float(out["report_s_10m"]) / float(out["report_s_1m"]), 3)
        print(f"10M / 1M: {out['report_s_ratio']:.2f}x (target <= 2)")
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
