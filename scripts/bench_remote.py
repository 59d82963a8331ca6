"""Loader throughput from object storage vs local disk (issue 9). Run:
``python scripts/bench_remote.py``.

Builds the same top-64 cache as ``bench_loader.py`` (real SmolLM2 distributions made non-repeating,
~96 bytes per position like a real dump; rows of 2048 tokens; 64 MiB raw shards, ~30 MB stored)
on local disk, copies it with ``copy_cache`` into a real S3-compatible server (``moto_server``,
its own process) on loopback, then reads it with ``make_loader`` (batch 8, 0 workers, dequantised
batches on the CPU, streaming order: windows of 4 shards, ``readahead`` shards fetched ahead):

- ``local``: the cache on local disk;
- ``remote`` (cold): from the S3 server, every shard downloaded and sha256-verified;
- ``remote_warm``: from the S3 server with a local cache directory that a previous epoch filled
  (entries re-verified on every hit).

Two figures per source, over the same epochs: the **throughput** (positions/s after the first
batch, as ``bench_loader.py`` measures it: a real epoch has thousands of shards, so the start is
amortised) and the **time to the first batch** (a streaming order needs every shard of the first
window before it can shuffle across them: on a cold remote that is 4 shard downloads). The
whole-epoch rates, start included, are printed too: this benchmark's epochs are only ~10 shards.

Target (issue 9): remote throughput with read-ahead >= 0.7x local. moto is a Python server (on
these 2 cores it competes with the loader for CPU, and it spends a few ms per request); loopback
has no latency. The ratios, measured side by side, are the point. The last line is one JSON
object.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import boto3
from bench_loader import BATCH, build
from s3_testing import free_port

from logitcache.data import make_loader
from logitcache.store import copy_cache
from logitcache.store.reader import LOCAL_CACHE_ENV, CacheReader


def epoch_rates(url: str, epochs: int, readahead: int, **kw: object) -> tuple[float, float, float]:
    """(positions/s after the first batch, seconds to the first batch, whole-epoch positions/s),
    over ``epochs`` fresh loaders."""
    steady_pos, steady_s, first_s, total_pos = 0, 0.0, 0.0, 0
    for _ in range(epochs):
        loader = make_loader(url, BATCH, device="cpu", readahead=readahead, **kw)  # type: ignore[arg-type]
        t0 = time.perf_counter()
        it = iter(loader)
        total_pos += next(it)["target_ids"].shape[0]
        t1 = time.perf_counter()
        for batch in it:
            steady_pos += batch["target_ids"].shape[0]
        t2 = time.perf_counter()
        loader.close()
        first_s += t1 - t0
        steady_s += t2 - t1
    total_pos += steady_pos
    return steady_pos / steady_s, first_s / epochs, total_pos / (first_s + steady_s)


def start_server() -> tuple[subprocess.Popen[bytes], str]:
    """moto's S3 server in its own process (in-process it would share our GIL)."""
    port = free_port()
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen(
        [str(exe), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, f"http://127.0.0.1:{port}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1536)
    ap.add_argument("--shard-mb", type=float, default=64.0)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--readahead", type=int, default=4)
    args = ap.parse_args()

    proc, endpoint = start_server()
    opts = {
        "key": "testing",
        "secret": "testing",
        "endpoint_url": endpoint,
        "client_kwargs": {"region_name": "us-east-1"},
    }
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = f"{tmp}/cache"
            build(local, args.rows, shard_bytes=int(args.shard_mb * (1 << 20)))
            boto3.client(
                "s3",
                endpoint_url=endpoint,
                aws_access_key_id="testing",
                aws_secret_access_key="testing",
                region_name="us-east-1",
            ).create_bucket(Bucket="bench")
            copy_cache(local, "s3://bench/cache", dst_options=opts)
            remote = "s3://bench/cache"
            shards = len(CacheReader(local).manifest.shards)
            result: dict[str, object] = {
                "rows": args.rows,
                "shards": shards,
                "readahead": args.readahead,
            }
            local_r = epoch_rates(local, args.epochs, args.readahead)
            remote_r = epoch_rates(remote, args.epochs, args.readahead, storage_options=opts)
            os.environ[LOCAL_CACHE_ENV] = f"{tmp}/lc"
            epoch_rates(remote, 1, args.readahead, storage_options=opts)  # fills the local cache
            warm_r = epoch_rates(remote, args.epochs, args.readahead, storage_options=opts)
            del os.environ[LOCAL_CACHE_ENV]
            print(f"{shards} shards; throughput after the first batch, first batch, whole epoch:")
            for name, r in (("local disk", local_r), ("S3 cold", remote_r), ("S3 warm", warm_r)):
                print(
                    f"  {name:11s}: {r[0] / 1e6:6.3f} M positions/s, first batch {r[1]:6.3f} s, "
                    f"epoch {r[2] / 1e6:6.3f} M positions/s"
                )
            result.update(
                local_positions_per_s=round(local_r[0]),
                remote_positions_per_s=round(remote_r[0]),
                warm_cache_positions_per_s=round(warm_r[0]),
                remote_vs_local=round(remote_r[0] / local_r[0], 3),
                remote_warm_vs_local=round(warm_r[0] / local_r[0], 3),
                first_batch_s_local=round(local_r[1], 3),
                first_batch_s_remote=round(remote_r[1], 3),
                epoch_remote_vs_local=round(remote_r[2] / local_r[2], 3),
                target_remote_vs_local=0.7,
            )
            print(json.dumps(result))
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
