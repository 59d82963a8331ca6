"""The manifest on its own: derived manifests never keep a stale digest, and fields that restate
the codec must agree with it."""

from __future__ import annotations

import dataclasses
import json

import pytest

from logitcache.errors import ManifestError
from logitcache.format import SampledCodec, TopKCodec
from logitcache.format.manifest import (
    Coverage,
    FileRecord,
    Manifest,
    ShardRecord,
    TargetsInfo,
    content_digest,
)


def shard(i: int, rows: int = 2) -> ShardRecord:
    path = f"shards/{i:05d}.arrow"
    return ShardRecord(path, rows, rows * 3, 0, (FileRecord(path, 10 + i, f"{i:064x}"),))


def manifest(**kw: object) -> Manifest:
    args: dict[str, object] = {
        "backend": "arrow",
        "seq_len": 4,
        "vocab_size": 50,
        "padded_vocab_size": 64,
        "targets": TargetsInfo("topk", k=4),
        "codec": TopKCodec(k=4, vocab_size=50),
        "shards": (shard(0), shard(1)),
    }
    args.update(kw)
    return Manifest(**args)  # type: ignore[arg-type]


def read_back(m: Manifest) -> Manifest:
    return Manifest.from_json(m.to_json())


def test_derive_computes_a_fresh_digest() -> None:
    m = read_back(manifest())
    assert m.read_digest is not None and m.stored_digest == m.read_digest
    d = m.derive(shards=(shard(0),), coverage=Coverage(positions=6))
    assert d.read_digest is None and d.stored_digest is None
    assert d.content_digest == content_digest(d.to_dict()) != m.content_digest
    # even a plain dataclasses.replace cannot carry the cached digest over
    r = dataclasses.replace(m, shards=(shard(0),))
    assert r.content_digest == d.content_digest


def test_derive_writes_the_current_format_version() -> None:
    d = json.loads(manifest().to_json())
    d["format_version"] = "1.0"
    d.pop("content_digest")
    old = Manifest.from_dict(d)
    assert old.derive().format_version == Manifest.__dataclass_fields__["format_version"].default


def test_digest_fields_are_not_arguments() -> None:
    with pytest.raises(TypeError):
        Manifest(read_digest="sha256:x", **manifest().__dict__)  # type: ignore[misc]
    with pytest.raises(ValueError, match="init=False"):
        dataclasses.replace(manifest(), read_digest="sha256:x")


@pytest.mark.parametrize(
    ("targets", "codec", "message"),
    [
        (
            TargetsInfo("topk", k=8),
            TopKCodec(k=4, vocab_size=50),
            r"targets\.k is 8 but codec\.k is 4",
        ),
        (
            TargetsInfo("topk", k=4, temperatures=(2.0,)),
            TopKCodec(k=4, vocab_size=50),
            r"targets\.temperatures holds 1 values but codec\.num_temperatures is 0",
        ),
        (
            TargetsInfo("sampled", samples=32, tail="none"),
            SampledCodec(samples=16, vocab_size=50),
            r"targets\.samples is 32 but codec\.samples is 16",
        ),
        (
            TargetsInfo("sampled", samples=16, tail="none"),
            TopKCodec(k=4, vocab_size=50),
            r"codec\.name: 'topk' does not match targets\.method 'sampled'",
        ),
    ],
)
def test_targets_must_agree_with_the_codec(
    targets: TargetsInfo, codec: object, message: str
) -> None:
    with pytest.raises(ManifestError, match=message):
        manifest(targets=targets, codec=codec)
    good = json.loads(manifest().to_json())
    good["targets"] = targets.to_dict()
    good["codec"] = codec.to_dict()  # type: ignore[attr-defined]
    with pytest.raises(ManifestError, match=message):
        Manifest.from_dict(good)
