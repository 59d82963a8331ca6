"""Edited manifests (issue 14 #5): each edit is refused when the cache is opened, both as a
plain edit (the stored digest no longer matches: refused naming both digests) and as a faulty
tool's edit that also rewrote the digest (the cross-field checks refuse it)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from test_store import _edit_manifest, header, make_batches, write_cache

from logitcache.errors import CacheCorruptError, ManifestError
from logitcache.report import cache_info, format_info
from logitcache.store import CacheReader


@pytest.fixture(params=["zarr", "arrow"])
def cache(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    url = tmp_path / "c"
    batches = make_batches(3, 6, 3, 8, 4, 50)
    for b in batches:
        b[1][:, 0] = 63  # a token id above the real vocabulary (50) but inside the padded one
    write_cache(str(url), header(request.param), batches, shard_bytes=600)
    assert len(json.loads((url / "manifest.json").read_text())["shards"]) >= 4
    return url


def _replace_digest(d: dict) -> None:
    d["content_digest"] = "sha256:" + "0" * 64


def _padded_vocab(d: dict) -> None:
    d["padded_vocab_size"] = d["vocab_size"]  # input_ids go up to 63


def _k(d: dict) -> None:
    d["targets"]["k"] = 8


def _reorder(d: dict) -> None:
    d["shards"][0], d["shards"][1] = d["shards"][1], d["shards"][0]


def _drop(d: dict) -> None:
    dropped = d["shards"].pop(1)  # ... and the totals made to agree
    for key, field in (("num_rows", "rows"), ("num_positions", "positions")):
        d[key] -= dropped[field]
    d["num_bytes"] -= sum(f["bytes"] for f in dropped["files"])
    d["coverage"]["positions"] -= dropped["positions"]


def _drop_last(d: dict) -> None:
    dropped = d["shards"].pop()
    for key, field in (("num_rows", "rows"), ("num_positions", "positions")):
        d[key] -= dropped[field]
    d["num_bytes"] -= sum(f["bytes"] for f in dropped["files"])


EDITS: dict[str, Callable[[dict], None]] = {
    "replaced digest": _replace_digest,
    "padded_vocab_size": _padded_vocab,
    "targets.k": _k,
    "reordered shards": _reorder,
    "dropped shard": _drop,
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_an_edited_manifest_is_refused_naming_both_digests(cache: Path, edit: str) -> None:
    want = CacheReader(str(cache)).manifest.content_digest
    _edit_manifest(cache, EDITS[edit])
    with pytest.raises(ManifestError, match=r"content_digest says sha256:\w+ but .* hashes to"):
        CacheReader(str(cache))
    if edit not in ("replaced digest", "padded_vocab_size"):
        return  # info refuses those too, naming the field the edit broke
    info = cache_info(str(cache))  # info opens a consistent one, and shows both digests
    if edit == "replaced digest":
        assert info["content_digest"] == want
    assert not info["digest_ok"] and info["stored_digest"] != info["content_digest"]
    assert "STORED DIGEST DIFFERS" in format_info(info)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("targets.k", r"targets\.k is 8 but codec\.k is 4"),
        ("reordered shards", r"is listed where shard number 0 .* belongs"),
        ("dropped shard", r"is listed where shard number 1 .* belongs"),
    ],
)
def test_an_edit_with_a_rewritten_digest_is_refused_at_open(
    cache: Path, edit: str, message: str
) -> None:
    _edit_manifest(cache, EDITS[edit], rehash=True)
    with pytest.raises(ManifestError, match=message):
        CacheReader(str(cache))


def test_a_dropped_last_shard_with_fixed_totals_and_digest_is_refused(cache: Path) -> None:
    _edit_manifest(cache, _drop_last, rehash=True)
    with pytest.raises(ManifestError, match=r"coverage\.positions: is \d+ but the shard records"):
        CacheReader(str(cache))


def test_a_smaller_padded_vocab_with_a_rewritten_digest_is_caught_on_read(cache: Path) -> None:
    _edit_manifest(cache, _padded_vocab, rehash=True)
    with pytest.raises(CacheCorruptError, match=r"input_ids lie in .* outside \[0, padded_vocab"):
        for i in range(CacheReader(str(cache)).num_shards):
            CacheReader(str(cache)).load_shard(i)


def test_an_untouched_cache_shows_one_digest(cache: Path) -> None:
    info = cache_info(str(cache))
    assert info["digest_ok"] and info["stored_digest"] == info["content_digest"]
    assert "DIFFERS" not in format_info(info)
