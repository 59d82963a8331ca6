"""The manifest: the self-describing, versioned contract of a cache (``manifest.json``).

A cache is a directory or object-store prefix holding ``manifest.json`` and shards. The manifest
is written last and atomically, so its presence *is* the commit: a directory without one is an
incomplete dump and readers refuse it. Every field that changes what the numbers mean is here:
the values are teacher log-probs at temperature 1 (temperature is never pre-applied), how the
mass outside the stored ids is kept, the codec and its quantisation, both vocabulary sizes, and
fingerprints of the tokenizer, teacher and dataset so that a student's run can refuse a cache
that does not belong to it.

Versioning: ``format_version`` is ``"MAJOR.MINOR"``. A reader refuses an unknown MAJOR (the
meaning of fields changed); a newer MINOR only adds optional fields, which this reader ignores.
1.1 added ``content_digest``; 1.2 added per-shard coverage sums (``shards[].coverage``) and a
CRC-32C per file (``shards[].files[].crc32c``); 1.3 added the teacher tokenizer's own files,
stored under ``tokenizer/`` and listed with size and sha256 in ``tokenizer.files`` (inside a field
the content digest already covers, so a 1.2 reader computes the same digest and ignores them).

Content digest: a sha256 over the canonical JSON of a fixed list of top-level fields - what the
numbers mean and every shard file's path, size and sha256 - but not timestamps, coverage or
``extra``. It identifies a cache's content: copies have the same digest, and a consumer that was
told the digest out of band (``train --expect-digest``) refuses a cache whose shards were
altered even if whoever altered them also rewrote the per-file checksums. It is computed from the
raw JSON as read, never from re-serialised dataclasses, so fields a newer minor version adds
inside ``codec`` or ``targets`` do not make an older reader disagree with a newer writer. Caches
written as 1.0 have no stored digest; readers compute it the same way.

All classes are frozen dataclasses validated at construction, with ``to_dict``/``from_dict``.
Shard and file paths are relative POSIX paths inside the cache; anything absolute, with ``..``
or with a URL scheme is refused (a manifest must never make a reader touch files outside it).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from logitcache.errors import (
    FormatVersionError,
    ManifestCorruptError,
    ManifestError,
)
from logitcache.format.codec import TargetCodec, codec_from_dict
from logitcache.format.records import (
    Backend,
    Coverage,
    CoverageSums,
    FileRecord,
    Method,
    ShardRecord,
    SourceInfo,
    TargetsInfo,
    check_relative_path,
    need,
    require_key,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "TOKENIZER_DIR",
    "Backend",
    "Coverage",
    "CoverageSums",
    "FileRecord",
    "Manifest",
    "Method",
    "ShardRecord",
    "SourceInfo",
    "TargetsInfo",
    "check_relative_path",
    "content_digest",
    "first_difference",
    "shard_name",
]

FORMAT_NAME = "logitcache"
FORMAT_VERSION = "1.3"
TOKENIZER_DIR = "tokenizer"  # where a cache keeps its tokenizer's files (1.3)
# The top-level fields the content digest covers, in the order documented in docs/format.md.
DIGEST_FIELDS = (
    "format",
    "backend",
    "seq_len",
    "vocab_size",
    "padded_vocab_size",
    "targets",
    "codec",
    "compression",
    "teacher",
    "tokenizer",
    "dataset",
    "shards",
)
MANIFEST_NAME = "manifest.json"
# A manifest lists every shard file (~200 B each): 64 MiB is ~300k files, far past any real
# cache (a 1 TB cache of 128 MiB shards has ~8k shards); JSON objects nest 4 levels in ours and
# at most a few more in ``extra``. Bigger or deeper means damage or malice, never a cache.
MAX_MANIFEST_BYTES = 64 << 20
MAX_MANIFEST_DEPTH = 32
_MAX_VOCAB = 2**31 - 1  # input_ids are int32


def content_digest(d: Mapping[str, Any]) -> str:
    """``sha256:<hex>`` over the canonical JSON (sorted keys, no spaces, UTF-8) of the
    :data:`DIGEST_FIELDS` present in the manifest dict ``d``."""
    picked = {k: d[k] for k in DIGEST_FIELDS if k in d}
    text = json.dumps(
        picked, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def first_difference(old: Any, new: Any) -> tuple[str, Any, Any] | None:
    """The shallowest dotted path where two JSON-like values differ, with both values there.

    The one "which field changed" of the package (a resume against its progress record, the
    parts of a finalize, the sources of a merge). Shallowest first, so a changed ``seq_len`` is
    named as such rather than through the dataset fingerprint it also changes; among equally
    deep paths, the first in ``new``'s key order."""
    diffs: list[tuple[str, Any, Any]] = []

    def walk(a: Any, b: Any, where: str) -> None:
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            for key in [*b, *(k for k in a if k not in b)]:
                walk(a.get(key), b.get(key), f"{where}.{key}" if where else key)
        elif a != b:
            diffs.append((where or "(the whole value)", a, b))

    walk(old, new, "")
    return min(diffs, key=lambda d: d[0].count(".")) if diffs else None


@dataclass(frozen=True)
class Manifest:
    """Everything a reader needs to interpret a cache. See ``docs/format.md``."""

    backend: Backend
    seq_len: int
    vocab_size: int
    padded_vocab_size: int
    targets: TargetsInfo
    codec: TargetCodec
    shards: tuple[ShardRecord, ...]
    compression: Mapping[str, Any] = field(default_factory=lambda: {"name": "zstd", "level": 3})
    teacher: SourceInfo = SourceInfo()
    tokenizer: SourceInfo = SourceInfo()
    dataset: SourceInfo = SourceInfo()
    coverage: Coverage = Coverage()
    created_by: str = ""
    created_at: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)
    format: str = FORMAT_NAME
    format_version: str = FORMAT_VERSION
    # set only by from_dict: the digest computed from the raw text, and the one it stores (None
    # for 1.0 caches). Not constructor arguments (init=False), so ``derive``/``replace`` can
    # never carry them over to a manifest with other content: a derived manifest computes its
    # digest afresh.
    read_digest: str | None = field(default=None, init=False, compare=False, repr=False)
    stored_digest: str | None = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        need(self.format == FORMAT_NAME, "format", f"expected {FORMAT_NAME!r}, got {self.format!r}")
        need(self.backend in ("zarr", "arrow"), "backend", f"unknown {self.backend!r}")
        need(isinstance(self.seq_len, int) and self.seq_len >= 1, "seq_len", "must be >= 1")
        need(
            isinstance(self.vocab_size, int) and self.vocab_size >= 1,
            "vocab_size",
            f"must be >= 1, got {self.vocab_size!r}",
        )
        need(
            isinstance(self.padded_vocab_size, int)
            and self.vocab_size <= self.padded_vocab_size <= _MAX_VOCAB,
            "padded_vocab_size",
            f"must lie in [vocab_size {self.vocab_size}, {_MAX_VOCAB}] (input_ids are int32), "
            f"got {self.padded_vocab_size!r}",
        )
        codec_vocab = getattr(self.codec, "vocab_size", self.vocab_size)
        need(
            codec_vocab == self.vocab_size,
            "codec.vocab_size",
            f"{codec_vocab} differs from vocab_size {self.vocab_size}",
        )
        _check_codec_agrees(self.targets, self.codec)
        for f in self.tokenizer.files:
            need(
                f.path.startswith(TOKENIZER_DIR + "/"),
                "tokenizer.files",
                f"file {f.path!r} lies outside {TOKENIZER_DIR}/",
            )
        for name in ("teacher", "dataset"):
            need(not getattr(self, name).files, f"{name}.files", "only the tokenizer has files")
        seen: set[str] = set()
        for s in self.shards:
            need(s.path not in seen, "shards", f"shard {s.path!r} listed twice")
            seen.add(s.path)
        _check_shard_order(self.shards)
        sums = CoverageSums.total(self.shards)
        if sums is not None and self.coverage != Coverage():
            need(
                self.coverage.positions == sums.positions,
                "coverage.positions",
                f"is {self.coverage.positions} but the shard records' coverage adds up to "
                f"{sums.positions} (a shard record was dropped or added)",
            )

    def derive(self, **changes: Any) -> Manifest:
        """A new manifest: this one with ``changes`` applied, validated like any other.

        The one way to make a manifest from another (finalize, merge, transforms). What belongs
        to the JSON this one was read from does not carry over: the derived manifest computes
        its content digest afresh and is written at the current ``format_version`` (unless
        ``changes`` names one)."""
        changes.setdefault("format_version", FORMAT_VERSION)
        return replace(self, **changes)

    @property
    def num_rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def num_positions(self) -> int:
        return sum(s.positions for s in self.shards)

    @property
    def num_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    @property
    def content_digest(self) -> str:
        """The cache's content digest (see the module docstring)."""
        return self.read_digest or content_digest(self._fields_dict())

    def check_digest(self, expected: str | None = None, where: str = "the cache") -> None:
        """Raise :class:`ManifestError` if the stored digest disagrees with the content (the
        manifest was edited after its commit), or if ``expected`` is given and differs."""
        actual = self.content_digest
        _refuse_stored_digest(self.stored_digest, actual, where)
        if expected is not None:
            want = expected if expected.startswith("sha256:") else f"sha256:{expected}"
            if want != actual:
                raise ManifestError(
                    f"{where} has content digest {actual}, expected {want}: it is not the cache "
                    "you were given (re-dumped, altered or a different one); get the right "
                    "cache, or drop --expect-digest if the change is intended"
                )

    def to_dict(self) -> dict[str, Any]:
        d = self._fields_dict()
        d["content_digest"] = self.read_digest or content_digest(d)
        return d

    def _fields_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "format_version": self.format_version,
            "created_by": self.created_by,
            "created_at": self.created_at,
            "backend": self.backend,
            "seq_len": self.seq_len,
            "vocab_size": self.vocab_size,
            "padded_vocab_size": self.padded_vocab_size,
            "targets": self.targets.to_dict(),
            "codec": self.codec.to_dict(),
            "compression": dict(self.compression),
            "teacher": self.teacher.to_dict(),
            "tokenizer": self.tokenizer.to_dict(),
            "dataset": self.dataset.to_dict(),
            "coverage": self.coverage.to_dict(),
            "num_rows": self.num_rows,
            "num_positions": self.num_positions,
            "num_bytes": self.num_bytes,
            "shards": [s.to_dict() for s in self.shards],
            "extra": dict(self.extra),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n"

    @classmethod
    def from_dict(
        cls, d: Mapping[str, Any], *, check_digest: bool = False, where: str = MANIFEST_NAME
    ) -> Manifest:
        """Validate and build; ``check_digest`` first refuses a stored content digest that
        differs from the content (before any other check, so an edited manifest is named as
        such rather than by whichever field the edit broke)."""
        if not isinstance(d, Mapping):
            raise ManifestError(f"manifest must be a JSON object, got {type(d).__name__}")
        digest = content_digest(d)
        if check_digest:
            _refuse_stored_digest(d.get("content_digest"), digest, where)
        fmt = d.get("format")
        if fmt != FORMAT_NAME:
            raise ManifestError(
                f"not a logitcache manifest: 'format' is {fmt!r}, expected 'logitcache'"
            )
        version = str(require_key(d, "format_version", "manifest"))
        major = version.split(".")[0]
        if major != FORMAT_VERSION.split(".")[0]:
            raise FormatVersionError(
                f"cache format version {version} is not readable by this logitcache, which reads "
                f"{FORMAT_VERSION.split('.')[0]}.x; install a logitcache release that supports "
                f"format {major}.x"
            )
        shards = require_key(d, "shards", "manifest")
        need(isinstance(shards, list), "shards", "must be a list")
        m = cls(
            backend=require_key(d, "backend", "manifest"),
            seq_len=require_key(d, "seq_len", "manifest"),
            vocab_size=require_key(d, "vocab_size", "manifest"),
            padded_vocab_size=require_key(d, "padded_vocab_size", "manifest"),
            targets=TargetsInfo.from_dict(require_key(d, "targets", "manifest")),
            codec=codec_from_dict(require_key(d, "codec", "manifest")),
            shards=tuple(ShardRecord.from_dict(s) for s in shards),
            compression=d.get("compression", {"name": "zstd", "level": 3}),
            teacher=SourceInfo.from_dict(d.get("teacher", {})),
            tokenizer=SourceInfo.from_dict(d.get("tokenizer", {})),
            dataset=SourceInfo.from_dict(d.get("dataset", {})),
            coverage=Coverage.from_dict(d.get("coverage", {})),
            created_by=d.get("created_by", ""),
            created_at=d.get("created_at", ""),
            extra=d.get("extra", {}),
            format_version=version,
        )
        object.__setattr__(m, "read_digest", digest)
        object.__setattr__(m, "stored_digest", d.get("content_digest"))
        for key in ("num_rows", "num_positions", "num_bytes"):
            if key in d:
                need(
                    d[key] == getattr(m, key),
                    key,
                    f"says {d[key]} but the shards add up to {getattr(m, key)}",
                )
        return m

    @classmethod
    def from_json(
        cls, text: str | bytes, where: str = MANIFEST_NAME, *, check_digest: bool = False
    ) -> Manifest:
        if len(text) > MAX_MANIFEST_BYTES:
            raise ManifestCorruptError(
                f"{where} is {len(text):,} bytes, over the {MAX_MANIFEST_BYTES >> 20} MiB any "
                "manifest needs; it is damaged or not a logitcache manifest: re-copy or re-dump"
            )
        try:
            d = json.loads(text)
        except RecursionError as e:
            raise ManifestCorruptError(_too_deep(where)) from e
        except (ValueError, UnicodeDecodeError) as e:
            raise ManifestCorruptError(
                f"{where} is not valid JSON ({e}); the cache is damaged: re-copy or re-dump it"
            ) from e
        if _depth(d) > MAX_MANIFEST_DEPTH:
            raise ManifestCorruptError(_too_deep(where))
        return cls.from_dict(d, check_digest=check_digest, where=where)


def _too_deep(where: str) -> str:
    return (
        f"{where} nests JSON deeper than {MAX_MANIFEST_DEPTH} levels, which no manifest does; "
        "it is damaged or not a logitcache manifest: re-copy or re-dump the cache"
    )


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON (iterative: no recursion on hostile input)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            children: Any = v.values()
        elif isinstance(v, list):
            children = v
        else:
            continue
        deepest = max(deepest, d)
        if deepest > MAX_MANIFEST_DEPTH:
            return deepest
        stack.extend((c, d + 1) for c in children)
    return deepest


def _refuse_stored_digest(stored: Any, actual: str, where: str) -> None:
    if stored is not None and stored != actual:
        raise ManifestError(
            f"{where}: manifest field content_digest says {stored} but the manifest's content "
            f"hashes to {actual}; the manifest was edited after it was committed: re-copy or "
            "re-dump the cache"
        )


_SHARD_NAME = re.compile(r"^(?P<prefix>.*?)(?P<index>\d{5,})\.(zarr|arrow)$")


def _check_shard_order(shards: tuple[ShardRecord, ...]) -> None:
    """Shards a writer named ``<prefix><index>`` (see :func:`shard_name`) must be listed in
    writing order: each prefix's shards together, numbered 0, 1, 2, ... So reordered records,
    and a record dropped from the middle of a writer's run, are refused even when whoever edited
    the manifest also rewrote its totals and digest. Paths of another form are not judged."""
    done: set[str] = set()
    prefix, expected = None, 0
    for s in shards:
        m = _SHARD_NAME.match(s.path)
        if m is None:
            prefix = None
            continue
        p, i = m.group("prefix"), int(m.group("index"))
        if p != prefix:
            need(
                p not in done,
                "shards",
                f"the shards of {p!r} are not listed together ({s.path!r} comes after others); "
                "records were reordered",
            )
            if prefix is not None:
                done.add(prefix)
            prefix, expected = p, 0
        need(
            i == expected,
            "shards",
            f"{s.path!r} is listed where shard number {expected} of {p!r} belongs: records were "
            "reordered or one was dropped; re-copy or re-dump the cache",
        )
        expected += 1


def _check_codec_agrees(targets: TargetsInfo, codec: TargetCodec) -> None:
    """``targets`` restates a few of the codec's parameters for readers of the JSON; they must
    be the codec's (a manifest edited by hand or by a faulty tool is refused, naming both)."""
    need(
        codec.name == targets.method,
        "codec.name",
        f"{codec.name!r} does not match targets.method {targets.method!r}",
    )
    pairs: list[tuple[str, int | None, str]] = [
        ("targets.temperatures", len(targets.temperatures), "num_temperatures")
    ]
    if targets.method == "topk":
        pairs.append(("targets.k", targets.k, "k"))
    else:
        pairs.append(("targets.samples", targets.samples, "samples"))
    for where, ours, attr in pairs:
        theirs = getattr(codec, attr, None)
        if theirs is not None and ours != theirs:
            what = "holds" if where.endswith("temperatures") else "is"
            count = " values" if where.endswith("temperatures") else ""
            raise ManifestError(
                f"manifest field {where} {what} {ours}{count} but codec.{attr} is {theirs}; the "
                "two must agree (the manifest was edited or written by a faulty tool): re-copy "
                "or re-dump the cache"
            )


def shard_name(index: int, prefix: str, backend: Backend) -> str:
    """Relative path of a shard: ``shards/<prefix><index:05d>.zarr`` or ``.arrow``."""
    ext = "zarr" if backend == "zarr" else "arrow"
    return f"shards/{prefix}{index:05d}.{ext}"
