"""Outputs and manifests that must be refused or bounded (issue 14 #8): shard sizes below one
byte, outputs that are files or someone else's directories, huge or absurdly nested manifests."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_store import header, make_batches, write_cache

from logitcache.errors import (
    CacheCorruptError,
    ConfigError,
    ManifestCorruptError,
    ManifestError,
    WriterError,
)
from logitcache.format.manifest import MAX_MANIFEST_BYTES
from logitcache.store import CacheReader, CacheWriter, check_output


@pytest.mark.parametrize("size", [0, -1, -(1 << 20), 2 << 30])
def test_shard_bytes_out_of_range_is_refused(tmp_path: Path, size: int) -> None:
    with pytest.raises(ConfigError, match=r"shard_bytes must be in \[1, 1073741824\]"):
        CacheWriter(str(tmp_path / "c"), header("zarr"), shard_bytes=size)
    with pytest.raises(ConfigError, match="shard_bytes must be in"):
        check_output(str(tmp_path / "c"), shard_bytes=size)
    assert not (tmp_path / "c").exists()


def test_a_regular_file_as_output_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.write_text("mine")
    for call in (lambda: check_output(str(out)), lambda: CacheWriter(str(out), header("zarr"))):
        with pytest.raises(WriterError, match="is a file, not a directory"):
            call()
    assert out.read_text() == "mine"


def test_a_directory_that_is_not_a_cache_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "project"
    (out / "shards").mkdir(parents=True)
    (out / "shards" / "mine.txt").write_text("my own file")
    (out / "notes.txt").write_text("notes")
    with pytest.raises(WriterError, match=r"not empty and is not a cache \(it holds notes\.txt\)"):
        CacheWriter(str(out), header("zarr"))
    for kw in ({"overwrite": True}, {}):
        with pytest.raises(WriterError, match="not a cache"):
            check_output(str(out), **kw)
    with pytest.raises(WriterError, match=r"refusing to overwrite .* force_overwrite_non_cache"):
        CacheWriter(str(out), header("zarr"), overwrite=True)
    assert (out / "shards" / "mine.txt").exists() and not (out / "_locks").exists()
    # shards/ alone, without a manifest or progress record, is not a cache either
    (out / "notes.txt").unlink()
    with pytest.raises(WriterError, match="has shards/ but no manifest or progress"):
        CacheWriter(str(out), header("zarr"), overwrite=True)
    # forced: allowed, and only the cache's own entries are replaced
    (out / "notes.txt").write_text("notes")
    write_cache(
        str(out),
        header("zarr"),
        make_batches(1, 1, 2, 8, 4, 50),
        overwrite=True,
        force_overwrite_non_cache=True,
    )
    assert CacheReader(str(out)).num_rows == 2 and (out / "notes.txt").exists()


def test_a_committed_cache_is_still_overwritten_without_force(tmp_path: Path) -> None:
    url = str(tmp_path / "c")
    write_cache(url, header("zarr"), make_batches(1, 2, 2, 8, 4, 50))
    write_cache(url, header("arrow"), make_batches(2, 1, 2, 8, 4, 50), overwrite=True)
    assert CacheReader(url).num_rows == 2


def test_an_oversized_manifest_is_refused_before_it_is_read(tmp_path: Path) -> None:
    url = tmp_path / "c"
    write_cache(str(url), header("zarr"), make_batches(1, 1, 2, 8, 4, 50))
    with open(url / "manifest.json", "r+b") as f:
        f.truncate(MAX_MANIFEST_BYTES + 1)  # sparse: costs no disk
    with pytest.raises(ManifestCorruptError, match="over the 64 MiB any manifest needs"):
        CacheReader(str(url))


@pytest.mark.parametrize("depth", [100_000, 40])
def test_a_deeply_nested_manifest_is_a_corrupt_cache(tmp_path: Path, depth: int) -> None:
    url = tmp_path / "c"
    write_cache(str(url), header("zarr"), make_batches(1, 1, 2, 8, 4, 50))
    (url / "manifest.json").write_text("[" * depth + "]" * depth)
    with pytest.raises(ManifestCorruptError, match="nests JSON deeper than 32 levels") as e:
        CacheReader(str(url))
    assert isinstance(e.value, CacheCorruptError) and isinstance(e.value, ManifestError)
