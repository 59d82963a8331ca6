"""Caches on a real S3-compatible server (moto on loopback), with faults injected by a proxy:
commit-safe writes, the writer lock, retries that never yield wrong bytes, the local cache,
and the CLI end to end (dump -> verify -> info -> train) against s3:// URLs. cp and merge run on
every store, S3 included, in ``test_share_suite.py``."""

# ruff: noqa: F811  (pytest fixtures imported from s3_testing and requested by name)
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from s3_testing import (  # noqa: F401 (fixtures are used by name)
    Fault,
    FaultProxy,
    MotoS3,
    bucket,
    fault_proxy,
    moto_s3,
    s3_options,
    s3_proxy,
)
from test_store import header, make_batches, write_cache

from logitcache.cli import cli
from logitcache.errors import (
    CacheLockedError,
    ChecksumMismatchError,
    StorageError,
)
from logitcache.store import CacheReader, CacheWriter
from logitcache.store.reader import LOCAL_CACHE_ENV

BATCHES = make_batches(3, 6, 4, 8, 4, 50)


def rows_of(url: str, **kw: Any) -> dict[int, tuple[bytes, bytes]]:
    out = {}
    for rows in CacheReader(url, **kw).iter_rows():
        t = rows.targets
        off = rows.position_offsets
        for i, rid in enumerate(rows.row_id.tolist()):
            out[rid] = (
                rows.input_ids[i].tobytes(),
                t.ids[off[i] : off[i + 1]].tobytes() + t.logprobs[off[i] : off[i + 1]].tobytes(),
            )
    return out


def cli_options(opts: dict[str, Any]) -> list[str]:
    return [f"--storage-option={k}={json.dumps(v)}" for k, v in opts.items()]


@pytest.fixture(scope="module")
def local_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = str(tmp_path_factory.mktemp("local") / "c")
    write_cache(url, header("zarr"), BATCHES)
    return url


def test_writer_survives_faults_and_commits_only_complete_caches(
    bucket: str, moto_s3: MotoS3, s3_proxy: FaultProxy, local_cache: str
) -> None:
    opts = s3_options(s3_proxy.endpoint)
    s3_proxy.add(
        Fault("PUT", "/shards/00000.zarr/", 503),
        Fault("PUT", "/shards/00001.zarr/", "drop"),
        Fault("PUT", "/shards/00002.zarr/", "drop_after"),  # written, answer lost: re-PUT
        Fault("PUT", "/_writers/", 500, skip=1),
        Fault("PUT", "/manifest.json", "drop"),
    )
    url = f"s3://{bucket}/c"
    write_cache(url, header("zarr"), BATCHES, storage_options=opts)
    assert all(f.fired == f.times for f in s3_proxy.faults)
    assert rows_of(url, storage_options=opts) == rows_of(local_cache)
    m = CacheReader(url, storage_options=opts).manifest
    assert m.content_digest == CacheReader(local_cache).manifest.content_digest
    keys = moto_s3.keys(bucket, "c/")
    assert not [k for k in keys if ".tmp-" in k or k.startswith("c/_locks/")], keys


def test_writer_that_keeps_failing_raises_clearly_and_commits_nothing(
    bucket: str, moto_s3: MotoS3, s3_proxy: FaultProxy
) -> None:
    opts = s3_options(s3_proxy.endpoint)
    s3_proxy.add(Fault("PUT", "/shards/00001", 503, times=1000))
    with pytest.raises(StorageError, match=r"writing .*shards/00001.* failed 6 times.*--resume"):
        write_cache(f"s3://{bucket}/c", header("zarr"), BATCHES, storage_options=opts)
    keys = moto_s3.keys(bucket, "c/")
    assert "c/manifest.json" not in keys and not [k for k in keys if "_locks" in k]
    s3_proxy.clear()  # the network heals: resume finishes the same cache
    write_cache(f"s3://{bucket}/c", header("zarr"), BATCHES, storage_options=opts, resume=True)
    assert len(rows_of(f"s3://{bucket}/c", storage_options=opts)) == 24


@pytest.mark.parametrize("action", [503, 500, "drop", "truncate", "corrupt"])
def test_reader_retries_transient_faults_into_correct_rows(
    bucket: str, s3_proxy: FaultProxy, local_cache: str, action: int | str
) -> None:
    opts = s3_options(s3_proxy.endpoint)
    url = f"s3://{bucket}/c"
    write_cache(url, header("zarr"), BATCHES, storage_options=opts)
    s3_proxy.add(Fault("GET", "/shards/", action, times=2, skip=1))
    # verify=False still checks remote bytes: a flaky network never yields wrong targets
    assert rows_of(url, storage_options=opts, verify=False) == rows_of(local_cache)
    assert s3_proxy.faults[0].fired == 2


def test_shared_small_files_are_requested_once_and_verify_reads_every_object(
    bucket: str, s3_proxy: FaultProxy, local_cache: str
) -> None:
    opts = s3_options(s3_proxy.endpoint)
    url = f"s3://{bucket}/c"
    write_cache(url, header("zarr"), BATCHES, storage_options=opts)
    shards = CacheReader(url, storage_options=opts).manifest.shards
    meta = [f for s in shards for f in s.files if f.path.endswith("zarr.json")]
    distinct = {f.sha256 for f in meta}
    assert len(shards) > 2 and len(distinct) < len(meta)  # e.g. every targets/zarr.json
    s3_proxy.clear()
    assert rows_of(url, storage_options=opts) == rows_of(local_cache)
    assert s3_proxy.count("GET", "zarr.json") == len(distinct)
    # a damaged object whose digest another shard shares: readers never read it (they hold the
    # verified bytes), `verify` reads every object and names it
    shared = f"{shards[1].path}/targets/zarr.json"
    s3_proxy.add(Fault("GET", shared, "corrupt", times=1000))
    assert rows_of(url, storage_options=opts) == rows_of(local_cache)
    result = CliRunner().invoke(cli, ["verify", url, *cli_options(opts)])
    assert result.exit_code != 0 and "targets/zarr.json" in result.output


def test_s3_clients_skip_their_own_response_checksum_unless_asked(bucket: str) -> None:
    """Every fetched file is sha256-checked against the manifest; botocore's CRC32 of each
    response body would only repeat that, so it is off by default, and a user's choice wins."""
    from logitcache.store._fs import open_location

    assert _s3_config(open_location(f"s3://{bucket}/c", {"anon": True})) == "when_required"
    mine = {"config_kwargs": {"response_checksum_validation": "when_supported"}}
    assert _s3_config(open_location(f"s3://{bucket}/c", mine)) == "when_supported"


def _s3_config(loc: Any) -> str:
    return str(loc.fs.config_kwargs["response_checksum_validation"])


def test_reader_refuses_persistently_bad_bytes(bucket: str, s3_proxy: FaultProxy) -> None:
    opts = s3_options(s3_proxy.endpoint)
    url = f"s3://{bucket}/c"
    write_cache(url, header("arrow"), BATCHES, storage_options=opts)
    s3_proxy.add(Fault("GET", "/shards/00001", "corrupt", times=1000))
    r = CacheReader(url, storage_options=opts, verify=False)
    r.read_rows(0, 1)
    with pytest.raises(ChecksumMismatchError, match=r"shards/00001.arrow.*fails its checksum"):
        r.load_shard(1)
    s3_proxy.clear()
    s3_proxy.add(Fault("GET", "/shards/00002", 503, times=1000))
    with pytest.raises(StorageError, match=r"reading shards/00002.arrow at s3://.*failed"):
        r.load_shard(2)


def test_second_writer_is_refused_and_stale_locks_need_break_lock(
    bucket: str, moto_s3: MotoS3
) -> None:
    opts = s3_options(moto_s3.endpoint)
    url = f"s3://{bucket}/c"
    hdr = header("zarr")
    results: list[str] = []

    def race() -> None:
        try:
            w = CacheWriter(url, hdr, storage_options=opts)
            results.append("won")
            barrier.wait()
            w.abort()
        except CacheLockedError:
            results.append("refused")
            barrier.wait()

    barrier = threading.Barrier(4)
    threads = [threading.Thread(target=race) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["refused"] * 3 + ["won"]  # the conditional PUT decides

    w = CacheWriter(url, hdr, storage_options=opts)
    with pytest.raises(CacheLockedError, match=r"being written by another dump.*--break-lock"):
        CacheWriter(url, hdr, storage_options=opts, resume=True)
    w.abort()
    # a dead writer on another machine left its lock: refused until --break-lock
    import s3fs

    fs = s3fs.S3FileSystem(**{k: v for k, v in opts.items() if not k.startswith("logitcache")})
    record = {"owner": "x", "host": "elsewhere", "pid": 7, "created_at": "2026-01-01T00:00:00"}
    fs.pipe_file(f"{bucket}/c/_locks/main.json", json.dumps(record).encode())
    with pytest.raises(CacheLockedError, match="host elsewhere, pid 7"):
        CacheWriter(url, hdr, storage_options=opts, resume=True)
    write_cache(url, hdr, BATCHES, storage_options=opts, resume=True, break_lock=True)
    assert len(rows_of(url, storage_options=opts)) == 24


def test_local_cache_serves_verified_entries_within_its_bound(
    bucket: str,
    s3_proxy: FaultProxy,
    tmp_path: Path,
    local_cache: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    opts = s3_options(s3_proxy.endpoint)
    url = f"s3://{bucket}/c"
    write_cache(url, header("arrow"), BATCHES, storage_options=opts)
    lc = tmp_path / "lc"
    expected = rows_of(local_cache)
    assert rows_of(url, storage_options=opts, local_cache=lc) == expected
    first = s3_proxy.count("GET", "/shards/")
    assert first > 0
    assert rows_of(url, storage_options=opts, local_cache=lc) == expected
    assert s3_proxy.count("GET", "/shards/") == first  # all hits
    victim = next(p for p in lc.rglob("*") if p.is_file())
    victim.write_bytes(b"x" + victim.read_bytes()[1:])  # a damaged entry is refetched
    assert rows_of(url, storage_options=opts, local_cache=lc) == expected
    assert s3_proxy.count("GET", "/shards/") == first + 1
    m = CacheReader(url, storage_options=opts).manifest
    bound = 2 * max(s.bytes for s in m.shards)
    small = {"local_cache": tmp_path / "small", "local_cache_size": bound}
    assert rows_of(url, storage_options=opts, **small) == expected
    r = CacheReader(url, storage_options=opts, **small)
    assert r.local_cache is not None and 0 < r.local_cache.total_bytes() <= bound
    # verify checks the store, not the local copies: a damaged object fails it even when the
    # local cache holds good bytes for it
    s3_proxy.add(Fault("GET", "/shards/00001", "corrupt", times=1000))
    assert rows_of(url, storage_options=opts, local_cache=lc) == expected
    monkeypatch.setenv(LOCAL_CACHE_ENV, str(lc))
    result = CliRunner().invoke(cli, ["verify", url, *cli_options(opts)])
    assert result.exit_code != 0 and "shards/00001" in result.output


def test_loader_workers_read_an_s3_cache(bucket: str, moto_s3: MotoS3, local_cache: str) -> None:
    """DataLoader worker processes (forked) must open their own S3 filesystem: fsspec's async
    filesystems are not fork-safe, so a reader inherited from the parent cannot be reused."""
    from logitcache.data import make_loader

    opts = s3_options(moto_s3.endpoint)
    url = f"s3://{bucket}/workers"
    write_cache(url, header("zarr"), BATCHES, storage_options=opts)
    seen: list[int] = []
    loader = make_loader(url, 4, num_workers=1, device="cpu", storage_options=opts, timeout=60)
    for batch in loader:
        seen += batch["row_id"][~batch["is_pad"]].tolist()
    loader.close()
    assert sorted(seen) == sorted(rows_of(local_cache))
