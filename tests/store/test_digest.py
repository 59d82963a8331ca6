"""The manifest's content digest (format 1.1): stable across copies, computed for 1.0 caches,
and what catches shards altered together with their recorded checksums."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from test_store import header, make_batches, write_cache

from logitcache.errors import ManifestError
from logitcache.format.manifest import FORMAT_VERSION
from logitcache.report import verify_cache
from logitcache.store import CacheReader


def test_digest_is_stored_and_readers_of_1_0_caches_compute_the_same(tmp_path: Path) -> None:
    url = tmp_path / "c"
    write_cache(str(url), header("arrow"), make_batches(1, 3, 4, 8, 4, 50))
    d = json.loads((url / "manifest.json").read_text())
    assert d["format_version"] == FORMAT_VERSION and d["content_digest"].startswith("sha256:")
    digest = d["content_digest"]
    m = CacheReader(str(url)).manifest
    m.check_digest(digest)
    m.check_digest(digest.removeprefix("sha256:"))
    d.pop("content_digest")
    d["format_version"], d["created_at"] = "1.0", "2020-01-01T00:00:00+00:00"
    (url / "manifest.json").write_text(json.dumps(d))
    assert CacheReader(str(url)).manifest.content_digest == digest


def test_altered_shard_with_rewritten_checksums_fails_the_expected_digest(tmp_path: Path) -> None:
    url = tmp_path / "c"
    write_cache(str(url), header("arrow"), make_batches(1, 3, 4, 8, 4, 50))
    digest = CacheReader(str(url)).manifest.content_digest
    d = json.loads((url / "manifest.json").read_text())
    f = d["shards"][0]["files"][0]
    data = bytearray((url / f["path"]).read_bytes())
    data[-1] ^= 1
    (url / f["path"]).write_bytes(bytes(data))
    f["sha256"] = hashlib.sha256(bytes(data)).hexdigest()  # the tamperer fixes the checksum
    (url / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ManifestError, match="edited after it was committed"):
        verify_cache(str(url))
    d.pop("content_digest")  # ... and drops the stored digest: only the expected one catches it
    (url / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ManifestError, match=f"expected {digest}"):
        CacheReader(str(url)).manifest.check_digest(digest)
