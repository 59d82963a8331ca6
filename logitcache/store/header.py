"""What a cache is before it has shards: the header every writer of it shares.

``CacheHeader`` is the manifest minus what writing produces (shards, coverage, timestamps, the
content digest). Its :meth:`CacheHeader.fingerprint_dict` is what a resumed writer and every part
of a multi-rank dump must agree on, so a resume with other settings is refused naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from logitcache.errors import ConfigError
from logitcache.format.codec import TargetCodec
from logitcache.format.manifest import (
    Backend,
    Coverage,
    Manifest,
    ShardRecord,
    SourceInfo,
    TargetsInfo,
)

__all__ = [
    "DEFAULT_COMPRESSION_LEVEL",
    "DEFAULT_SHARD_BYTES",
    "PARTS_DIR",
    "PROGRESS_DIR",
    "WRITTEN_FIELDS",
    "CacheHeader",
]

PROGRESS_DIR = "_writers"
PARTS_DIR = "_parts"
DEFAULT_SHARD_BYTES = 128 << 20
# zstd 15 vs 3 on real top-64 targets: 1.56 vs 1.66 bytes/entry (-6%) for ~10 MB/s instead of
# ~100 MB/s of raw input per core, i.e. ~50k tokens/s per core at k=64, which the background
# writer hides behind a GPU teacher; decoding speed does not depend on the level.
# (scripts/bench_codec.py measures both.)
DEFAULT_COMPRESSION_LEVEL = 15


#: manifest fields that writing produces, as opposed to the header that writers of a cache share
WRITTEN_FIELDS = frozenset(
    {
        "created_at",
        "created_by",
        "shards",
        "coverage",
        "num_rows",
        "num_positions",
        "num_bytes",
        "content_digest",
    }
)


@dataclass(frozen=True)
class CacheHeader:
    """The manifest minus what writing produces (shards, coverage, timestamps)."""

    codec: TargetCodec
    targets: TargetsInfo
    seq_len: int
    vocab_size: int
    padded_vocab_size: int
    backend: Backend = "zarr"
    compression_level: int = DEFAULT_COMPRESSION_LEVEL
    teacher: SourceInfo = SourceInfo()
    tokenizer: SourceInfo = SourceInfo()
    dataset: SourceInfo = SourceInfo()
    extra: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.compression_level <= 22:
            raise ConfigError(
                f"compression_level must be a zstd level in [1, 22], got {self.compression_level}"
            )

    def manifest(self, shards: Sequence[ShardRecord], coverage: Coverage) -> Manifest:
        from logitcache import __version__

        return Manifest(
            backend=self.backend,
            seq_len=self.seq_len,
            vocab_size=self.vocab_size,
            padded_vocab_size=self.padded_vocab_size,
            targets=self.targets,
            codec=self.codec,
            shards=tuple(shards),
            compression={"name": "zstd", "level": self.compression_level},
            teacher=self.teacher,
            tokenizer=self.tokenizer,
            dataset=self.dataset,
            coverage=coverage,
            created_by=f"logitcache {__version__}",
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            extra=dict(self.extra or {}),
        )

    def fingerprint_dict(self) -> dict[str, Any]:
        """The fields two writers of one cache must agree on (timestamps excluded)."""
        d = self.manifest((), Coverage()).to_dict()
        for k in WRITTEN_FIELDS:
            d.pop(k, None)
        return drop_run_info(d)


def drop_run_info(d: dict[str, Any]) -> dict[str, Any]:
    """``d`` without ``extra.dump.run``: how a dump ran (ranks, tensor parallel), information
    only, so a cache resumed or finalized with another layout continues (its targets are the
    same)."""
    dump = (d.get("extra") or {}).get("dump")
    if isinstance(dump, dict) and "run" in dump:
        rest = {k: v for k, v in dump.items() if k != "run"}
        d = {**d, "extra": {**d["extra"], "dump": rest}}
    return d
