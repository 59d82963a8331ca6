"""Real processes: shards fetched once per epoch over 2 ranks x 2 workers; two processes filling
one node-local shard cache at once. Few and tiny on purpose (each starts Python and torch)."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from countfs import reads
from loader_cache import build_cache

from logitcache.store import CacheReader

HERE = Path(__file__).parent
pytestmark = pytest.mark.dist


def spawn(*args: str, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "COUNTFS_LOG": str(log), "PYTHONPATH": str(HERE)}
    env.pop("LOGITCACHE_LOCAL_CACHE", None)
    return subprocess.Popen(
        [sys.executable, str(HERE / "dist_main.py"), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def finish(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out.decode()[-3000:]


def test_each_shard_is_fetched_once_per_epoch_over_two_ranks_and_two_workers(
    tmp_path: Path,
) -> None:
    url = build_cache(tmp_path / "cache", rows=53)
    manifest = CacheReader(url).manifest
    log = tmp_path / "reads.log"
    outs = [tmp_path / f"rank{r}.json" for r in range(2)]
    finish(
        [spawn("loader", f"countfs://{url}", str(r), "2", str(outs[r]), log=log) for r in range(2)]
    )
    seen = [r for out in outs for r in json.loads(out.read_text())]
    assert sorted(seen) == list(range(1000, 1053))  # every row once over the ranks
    count = collections.Counter(path for path, _ in reads(str(log)))
    digests = collections.Counter(f.sha256 for s in manifest.shards for f in s.files)
    unique = [f for s in manifest.shards for f in s.files if digests[f.sha256] == 1]
    assert len(unique) >= 2 * len(manifest.shards)  # each shard has data chunks of its own
    # a shard's own bytes cross the "network" once per epoch, over 2 ranks x 2 workers (metadata
    # documents equal across shards are requested once per process, by digest)
    assert {f.path: count[os.path.join(url, f.path)] for f in unique} == {f.path: 1 for f in unique}
    shard_reads = [n for path, n in count.items() if "/shards/" in path]
    assert max(shard_reads) <= 4  # nothing read more than once per worker process


def test_two_processes_fill_one_local_shard_cache_at_once(tmp_path: Path) -> None:
    url = build_cache(tmp_path / "cache", rows=53)
    manifest = CacheReader(url).manifest
    cache = tmp_path / "node-cache"
    outs = [tmp_path / f"fill{i}.json" for i in range(2)]
    procs = [
        spawn("fill", f"countfs://{url}", str(cache), str(o), log=tmp_path / "l") for o in outs
    ]
    deadline = time.monotonic() + 120  # both readers open before either starts: a real race
    while not all(Path(f"{o}.ready").exists() for o in outs) and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), "a filler exited early"
        time.sleep(0.01)
    for o in outs:
        Path(str(o) + ".go").touch()
    finish(procs)
    want = [
        {f.path[len(s.path) + 1 :] if f.path != s.path else "": f.sha256 for f in s.files}
        for s in manifest.shards
    ]
    for o in outs:
        got = json.loads(o.read_text())
        assert got["digests"] == want * 2  # both processes got verified bytes, both passes
        assert got["bad"] == 0 and got["local_hits"] > 0
    entries = [p for p in cache.rglob("*") if p.is_file()]
    assert not [p for p in entries if p.name.startswith(".tmp-")]
    main = [p for p in entries if p.parent.parent == cache]
    assert {p.name for p in main} == {f.sha256 for s in manifest.shards for f in s.files}
    for p in entries:  # one good copy per digest, named by its content
        assert hashlib.sha256(p.read_bytes()).hexdigest() == p.name
