"""``cp`` and ``merge`` (``logitcache.store.share``), written once and run on every store.

Like zarr-python's ``src/zarr/testing/store.py``: :class:`ShareSuite` holds the tests and asks
for one fixture, ``store`` (a :class:`Store`: where caches go and the fsspec options to reach
them); each store subclasses it. Local directories and ``memory://`` always run; S3 runs on a
real S3-compatible server on loopback (moto, the dev extra) and skips, saying so, when moto or
s3fs is missing. A store-specific case (a network fault in the middle of a copy) lives in its
subclass. Every case runs on both backends, since a Zarr shard is many files and an Arrow shard
one.
"""

# ruff: noqa: F811  (pytest fixtures imported from s3_testing and requested by name)
from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
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
from synth import topk_targets
from test_store import header, make_batches, write_cache

from logitcache.cli import cli
from logitcache.errors import ConfigError, ManifestError, StorageError, WriterError
from logitcache.store import CacheReader, CacheWriter, copy_cache, merge_caches
from logitcache.store._fs import Location, open_location

BATCHES = make_batches(3, 6, 4, 8, 4, 50)  # 24 rows, ids 1000..1023
_names = itertools.count()


@dataclass
class Store:
    """A place to put caches: ``url(name)`` under ``root``, reached with ``options``."""

    root: str
    options: dict[str, Any] = field(default_factory=dict)

    def url(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}-{next(_names)}"

    def location(self, url: str) -> Location:
        return open_location(url, self.options)

    def cli_options(self, flag: str = "--storage-option") -> list[str]:
        return [f"{flag}={k}={json.dumps(v)}" for k, v in self.options.items()]


def rows_of(url: str, **kw: Any) -> dict[int, tuple[bytes, bytes]]:
    """Row id -> (input ids, target ids and log-probs) as bytes: what a copy must keep."""
    out = {}
    for rows in CacheReader(url, **kw).iter_rows():
        t, off = rows.targets, rows.position_offsets
        for i, rid in enumerate(rows.row_id.tolist()):
            out[rid] = (
                rows.input_ids[i].tobytes(),
                t.ids[off[i] : off[i + 1]].tobytes() + t.logprobs[off[i] : off[i + 1]].tobytes(),
            )
    return out


class _Interrupted(Exception):
    """Raised from a progress callback: a copy that dies after some files."""


def _stop_after(n: int) -> Any:
    def progress(done: int, total: int) -> None:
        if done >= n:
            raise _Interrupted(f"stopped after {done} of {total} files")

    return progress


@pytest.fixture(scope="module", params=["zarr", "arrow"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def local_source(tmp_path_factory: pytest.TempPathFactory, backend: str) -> str:
    url = str(tmp_path_factory.mktemp("src") / "c")
    write_cache(url, header(backend), BATCHES)
    return url


class ShareSuite:
    """The cases every store passes. Subclasses provide the ``store`` fixture."""

    @pytest.fixture
    def store(self) -> Store:
        raise NotImplementedError("a store's subclass provides this fixture")

    def test_cp_verifies_resumes_and_keeps_the_digest(
        self, store: Store, local_source: str, tmp_path: Path
    ) -> None:
        dst = store.url("copy")
        opts = store.options
        digest = CacheReader(local_source).manifest.content_digest
        with pytest.raises(ManifestError, match="expected sha256:00"):
            copy_cache(local_source, dst, dst_options=opts, expect_digest="00" * 32)
        # a copy that dies part way leaves some files and no manifest: it reads as incomplete
        files = [f.path for s in CacheReader(local_source).manifest.shards for f in s.files]
        stop = _stop_after(len(files) // 2)
        with pytest.raises(_Interrupted):
            copy_cache(local_source, dst, dst_options=opts, workers=1, progress=stop)
        loc = store.location(dst)
        assert not loc.exists("manifest.json")
        there = [f for f in files if loc.exists(f)]
        assert there  # it got somewhere before it died
        # how far a worker thread got past the stop is a race (a fast store finishes them all):
        # what an earlier death leaves is the first half, so make that the state to resume
        for f in files[max(1, len(files) // 2) :]:
            if loc.exists(f):
                loc.remove(f)
        there = [f for f in files if loc.exists(f)]
        assert 0 < len(there) < len(files)
        # one of them damaged at the destination (same size): the resume reads every file back,
        # re-copies that one and the missing ones, and skips the rest
        damaged = bytearray(loc.read_bytes(there[0]))
        damaged[len(damaged) // 2] ^= 0xFF
        loc.write_atomic(there[0], bytes(damaged))
        report = copy_cache(local_source, dst, dst_options=opts, expect_digest=digest)
        assert report.files_skipped == len(there) - 1
        assert report.files_copied == len(files) - len(there) + 1
        assert report.content_digest == digest
        assert rows_of(dst, storage_options=opts) == rows_of(local_source)
        assert copy_cache(local_source, dst, dst_options=opts).files_copied == 0
        other = store.url("other")
        write_cache(other, header("arrow"), BATCHES[:1], storage_options=opts)
        with pytest.raises(WriterError, match="already holds a committed cache"):
            copy_cache(local_source, other, dst_options=opts)
        back = str(tmp_path / "back")  # and back down, through the CLI
        args = ["cp", dst, back, "--expect-digest", digest, *store.cli_options()]
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 0, r.output
        assert CacheReader(back).manifest.content_digest == digest

    def test_merge_joins_disjoint_caches_and_refuses_mismatches(
        self, store: Store, local_source: str, backend: str, tmp_path: Path
    ) -> None:
        opts = store.options
        a, b = store.url("a"), store.url("b")
        write_cache(a, header(backend), BATCHES[:3], storage_options=opts)
        write_cache(b, header(backend), BATCHES[3:], storage_options=opts)
        out = store.url("merged")
        m = merge_caches(out, [a, b], storage_options=opts)
        assert m.num_rows == 24
        assert rows_of(out, storage_options=opts) == rows_of(local_source)
        assert [d["content_digest"] for d in m.extra["merged_from"]] == [
            CacheReader(u, storage_options=opts).manifest.content_digest for u in (a, b)
        ]
        with pytest.raises(WriterError, match="already holds a committed cache"):
            merge_caches(out, [a, b], storage_options=opts)
        with pytest.raises(ConfigError, match=r"row id 1000 is in both"):
            merge_caches(store.url("m2"), [a, local_source], storage_options=opts)
        with pytest.raises(ConfigError, match="at least two"):
            merge_caches(store.url("m3"), [a], storage_options=opts)
        other = str(tmp_path / "k5")
        rng = np.random.default_rng(0)
        with CacheWriter(other, header(backend, k=5)) as w:
            mask = np.ones((2, 8), bool)
            w.write(np.arange(2) + 5000, np.zeros((2, 8), int), mask, topk_targets(rng, 16, 5, 50))
        with pytest.raises(ConfigError, match=r"differ in targets.k \(4 vs 5\)"):
            merge_caches(store.url("m4"), [a, other], storage_options=opts)
        via_cli = store.url("merged-cli")
        r = CliRunner().invoke(cli, ["merge", via_cli, a, b, *store.cli_options()])
        assert r.exit_code == 0, r.output
        assert "24 rows" in r.output
        assert rows_of(via_cli, storage_options=opts) == rows_of(out, storage_options=opts)


class TestLocal(ShareSuite):
    @pytest.fixture
    def store(self, tmp_path: Path) -> Store:
        return Store(str(tmp_path / "store"))


class TestMemory(ShareSuite):
    @pytest.fixture
    def store(self) -> Iterator[Store]:
        import fsspec

        root = f"memory://share-suite-{uuid.uuid4().hex}"
        yield Store(root)
        fs = fsspec.filesystem("memory")
        if fs.exists(root):
            fs.rm(root, recursive=True)


class TestS3(ShareSuite):
    @pytest.fixture
    def store(self, moto_s3: MotoS3, bucket: str) -> Store:
        return Store(f"s3://{bucket}", s3_options(moto_s3.endpoint))

    def test_cp_that_keeps_failing_on_the_network_commits_nothing(
        self, bucket: str, moto_s3: MotoS3, s3_proxy: FaultProxy, local_source: str
    ) -> None:
        opts = s3_options(s3_proxy.endpoint)
        dst = f"s3://{bucket}/copy"
        files = [f.path for s in CacheReader(local_source).manifest.shards for f in s.files]
        s3_proxy.add(Fault("PUT", f"/copy/{files[1]}", 503, times=1000))
        with pytest.raises(StorageError):
            copy_cache(local_source, dst, dst_options=opts, workers=2)
        assert "copy/manifest.json" not in moto_s3.keys(bucket, "copy/")
        s3_proxy.clear()
        report = copy_cache(local_source, dst, dst_options=opts)
        assert report.files_skipped > 0 and report.files_copied > 0
        assert rows_of(dst, storage_options=opts) == rows_of(local_source)
