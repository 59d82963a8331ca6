"""Entry point of the real processes in ``test_distributed.py`` (one rank, or one cache filler).

``python dist_main.py loader URL RANK WORLD OUT``: one epoch of ``make_loader`` with 2 workers;
writes the real row ids it was served to OUT (JSON).
``python dist_main.py fill URL CACHE_DIR OUT``: waits for ``OUT.go``, then reads every shard
twice through a reader with the node-local shard cache at CACHE_DIR, and hammers one entry of a
small second cache; writes what it read to OUT.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time

import countfs  # noqa: F401  (registers countfs://)

from logitcache.data import make_loader
from logitcache.store import CacheReader
from logitcache.store._localcache import LocalShardCache


def loader(url: str, rank: int, world: int, out: str) -> None:
    dl = make_loader(
        url, 2, seed=1, num_workers=2, rank=rank, world_size=world, device="cpu", timeout=120
    )
    rows = [r for b in dl for r in b["row_id"][~b["is_pad"]].tolist()]
    with open(out, "w") as f:
        json.dump(rows, f)


def fill(url: str, cache_dir: str, out: str) -> None:
    reader = CacheReader(url, local_cache=cache_dir, max_cached_shards=1)
    open(out + ".ready", "w").close()
    while not os.path.exists(out + ".go"):
        time.sleep(0.01)
    digests = []
    for _ in range(2):  # the first pass races the other process, the second hits the cache
        for s in range(reader.num_shards):
            files = reader.fetch_shard_files(s)  # verified against the manifest's sha256
            digests.append({k: hashlib.sha256(v).hexdigest() for k, v in files.items()})
    small = LocalShardCache(os.path.join(cache_dir, "small"), max_bytes=3000)
    data = [os.urandom(1000) for _ in range(3)]  # the other process writes the same digests
    rng = [int.from_bytes(hashlib.sha256(d).digest()[:1], "little") for d in data]
    bad = 0
    for i in range(300):
        d = data[(i + rng[i % 3]) % 3]
        key = hashlib.sha256(d).hexdigest()
        small.put(key, d)
        got = small.get(key, len(d))
        bad += got is not None and got != d
    with open(out, "w") as f:
        json.dump({"digests": digests, "bad": bad, "local_hits": reader.local_cache.hits}, f)


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "loader":
        loader(args[0], int(args[1]), int(args[2]), args[3])
    else:
        fill(*args)
