"""Loader throughput from object storage vs local disk (issue 9). Run:
``python scripts/bench_remote.py``.

Builds the same top-64 cache as ``bench_loader.py`` (real SmolLM2 distributions, rows of 2048
tokens) on local disk, copies it with ``copy_cache`` into a real S3-compatible server
(``moto_server``, its own process) on loopback, then measures loader positions/s (batch 8, 0
workers, dequantised batches on the CPU, ``readahead`` shards fetched ahead) over whole epochs,
first batch included:

- ``local``: the cache on local disk;
- ``remote`` (cold): from the S3 server, every shard downloaded and sha256-verified;
- ``remote_warm``: from the S3 server with a local cache directory that a previous epoch filled
  (entries re-verified on every hit).

Target (issue 9): remote with read-ahead >= 0.7x local. moto is a Python server, slower than
real S3 per request; loopback has no latency. The ratios, measured side by side, are the point.
The last line is one JSON object.
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
from logitcache.store.reader import LOCAL_CACHE_ENV


def epoch_rate(url: str, epochs: int, readahead: int, **kw: object) -> float:
    positions, elapsed = 0, 0.0
    for _ in range(epochs):
        loader = make_loader(url, BATCH, device="cpu", readahead=readahead, **kw)  # type: ignore[arg-type]
        t0 = time.perf_counter()
        for batch in loader:
            positions += batch["target_ids"].shape[0]
        elapsed += time.perf_counter() - t0
        loader.close()
    return positions / elapsed


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
    ap.add_argument("--rows", type=int, default=384)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--readahead", type=int, default=2)
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
            build(local, args.rows)
            boto3.client(
                "s3",
                endpoint_url=endpoint,
                aws_access_key_id="testing",
                aws_secret_access_key="testing",
                region_name="us-east-1",
            ).create_bucket(Bucket="bench")
            copy_cache(local, "s3://bench/cache", dst_options=opts)
            remote = "s3://bench/cache"
            result: dict[str, object] = {"rows": args.rows, "readahead": args.readahead}
            local_pps = epoch_rate(local, args.epochs, args.readahead)
            remote_pps = epoch_rate(remote, args.epochs, args.readahead, storage_options=opts)
            os.environ[LOCAL_CACHE_ENV] = f"{tmp}/lc"
            epoch_rate(remote, 1, args.readahead, storage_options=opts)  # fills the local cache
            warm_pps = epoch_rate(remote, args.epochs, args.readahead, storage_options=opts)
            del os.environ[LOCAL_CACHE_ENV]
            print(f"local disk            : {local_pps / 1e6:6.3f} M positions/s")
            print(f"S3 (moto), cold       : {remote_pps / 1e6:6.3f} M positions/s")
            print(f"S3 (moto), warm cache : {warm_pps / 1e6:6.3f} M positions/s")
            result.update(
                local_positions_per_s=round(local_pps),
                remote_positions_per_s=round(remote_pps),
                warm_cache_positions_per_s=round(warm_pps),
                remote_vs_local=round(remote_pps / local_pps, 3),
                remote_warm_vs_local=round(warm_pps / local_pps, 3),
                target_remote_vs_local=0.7,
            )
            print(json.dumps(result))
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
