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
CRC-32C per file (``shards[].files[].crc32c``).

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
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

import numpy as np

from logitcache.errors import (
    FormatVersionError,
    ManifestCorruptError,
    ManifestError,
    UnsafePathError,
)
from logitcache.format.codec import TargetCodec, codec_from_dict

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "Coverage",
    "CoverageSums",
    "FileRecord",
    "Manifest",
    "ShardRecord",
    "SourceInfo",
    "TargetsInfo",
    "check_relative_path",
    "content_digest",
    "first_difference",
    "shard_name",
]

FORMAT_NAME = "logitcache"
FORMAT_VERSION = "1.2"
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

Method = Literal["topk", "sampled"]
Backend = Literal["zarr", "arrow"]
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_MAX_VOCAB = 2**31 - 1


def _need(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ManifestError(f"manifest field {where}: {msg}")


def _get(d: Mapping[str, Any], key: str, where: str) -> Any:
    if not isinstance(d, Mapping):
        raise ManifestError(f"manifest field {where} must be an object, got {type(d).__name__}")
    if key not in d:
        raise ManifestError(f"manifest field {where}.{key} is missing")
    return d[key]


def _known(cls: type, d: Mapping[str, Any]) -> dict[str, Any]:
    """Keep the keys ``cls`` knows: newer minor versions may add fields, which we ignore."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


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


def check_relative_path(path: str, where: str) -> str:
    """Return ``path`` if it is a safe relative POSIX path inside the cache, else raise."""
    if not isinstance(path, str) or not path:
        raise UnsafePathError(f"{where}: path must be a non-empty string, got {path!r}")
    parts = path.split("/")
    if (
        path.startswith(("/", "\\"))
        or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", path)
        or "\\" in path
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise UnsafePathError(
            f"{where}: {path!r} is not a plain relative path inside the cache (absolute paths, "
            "'..', '.', empty parts, backslashes and URLs are refused); the manifest was edited "
            "or written by a faulty tool"
        )
    return path


@dataclass(frozen=True)
class TargetsInfo:
    """What the stored targets mean.

    method: "topk" (the k most likely ids) or "sampled" (ids drawn ``samples`` times, with
    counts). values: always "logprob": teacher log-probs normalised over the real vocabulary.
    temperature: the temperature the values were computed at; always 1.0 (never pre-applied).
    tail: "bucket" when the log mass outside the stored ids is stored per position (top-k);
    "none" for sampled targets; "unknown" for top-k values imported from a source that did not
    keep the tail (raw logits, renormalised values): stored renormalised over the k ids with a
    ``-inf`` tail, and refused by the tail-bucket losses. temperatures: extra temperatures whose
    per-position log-normaliser ``log sum_v p_v^(1/T)`` is stored, making losses at those T
    exact.
    """

    method: Method
    k: int | None = None
    samples: int | None = None
    values: Literal["logprob"] = "logprob"
    temperature: float = 1.0
    tail: Literal["bucket", "none", "unknown"] = "bucket"
    temperatures: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        _need(self.method in ("topk", "sampled"), "targets.method", f"unknown {self.method!r}")
        if self.method == "topk":
            _need(
                isinstance(self.k, int) and self.k >= 1, "targets.k", f"must be >= 1, got {self.k}"
            )
        else:
            _need(
                isinstance(self.samples, int) and self.samples >= 1,
                "targets.samples",
                f"must be >= 1, got {self.samples}",
            )
        _need(self.values == "logprob", "targets.values", f"must be 'logprob', got {self.values!r}")
        _need(self.temperature == 1.0, "targets.temperature", "values are stored at T=1 only")
        _need(self.tail in ("bucket", "none", "unknown"), "targets.tail", f"unknown {self.tail!r}")
        for t in self.temperatures:
            _need(
                isinstance(t, (int, float)) and math.isfinite(t) and t > 0,
                "targets.temperatures",
                f"each temperature must be a finite number > 0, got {t!r}",
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "k": self.k,
            "samples": self.samples,
            "values": self.values,
            "temperature": self.temperature,
            "tail": self.tail,
            "temperatures": list(self.temperatures),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TargetsInfo:
        kw = _known(cls, d)
        kw["temperatures"] = tuple(kw.get("temperatures", ()))
        return cls(**kw)


@dataclass(frozen=True)
class SourceInfo:
    """Identity of something a cache was made from (teacher, tokenizer or dataset).

    name: human-readable (model dir, dataset path); revision: a version label if known;
    fingerprint: a hash that changes whenever the content does (weights, vocab + merges +
    special tokens + chat template, input bytes + packing options).
    """

    name: str = ""
    revision: str | None = None
    fingerprint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "revision": self.revision, "fingerprint": self.fingerprint}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SourceInfo:
        return cls(**_known(cls, d))


@dataclass(frozen=True)
class FileRecord:
    """One file of a shard: relative path inside the cache, size in bytes, sha256 hex digest
    (bare hex, no ``sha256:`` prefix) and, since format 1.2, its CRC-32C (Castagnoli) as an
    unsigned integer.

    The CRC is what a reader checks when it skips the sha256 (``verify=False``, or a shard read
    again): at ~5-6 GB/s per core it added 1.6% (Zarr) and 2.3% (Arrow) to loading a shard
    (fetch from the page cache + decode; top-64, vocab 49k, 17 MB, min of 25 runs each way, same
    run), and because it is recorded per path, damaged bytes,
    a truncated file or two same-size files swapped (Zarr chunk objects of two shards) cannot
    decode into wrong numbers. It protects against accidents; the sha256 and the content digest
    are what protect against deliberate edits."""

    path: str
    bytes: int
    sha256: str
    crc32c: int | None = None

    def __post_init__(self) -> None:
        check_relative_path(self.path, "shards[].files[].path")
        _need(isinstance(self.bytes, int) and self.bytes >= 0, f"file {self.path}.bytes", "< 0")
        _need(
            isinstance(self.sha256, str) and bool(_SHA256.match(self.sha256)),
            f"file {self.path}.sha256",
            "must be 64 lowercase hex digits",
        )
        if self.crc32c is not None:
            _need(
                isinstance(self.crc32c, int) and 0 <= self.crc32c < 2**32,
                f"file {self.path}.crc32c",
                f"must be an unsigned 32-bit integer, got {self.crc32c!r}",
            )

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"path": self.path, "bytes": self.bytes, "sha256": self.sha256}
        if self.crc32c is not None:
            d["crc32c"] = self.crc32c
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FileRecord:
        return cls(
            path=_get(d, "path", "file"),
            bytes=_get(d, "bytes", "file"),
            sha256=_get(d, "sha256", "file"),
            crc32c=d.get("crc32c"),
        )


@dataclass(frozen=True)
class CoverageSums:
    """The sums behind :class:`Coverage`'s means, over some positions (one shard's, since 1.2).

    Kept per shard so that they add up exactly whatever path the rows took: a resumed dump
    counts each committed shard once (rows that were buffered when it was killed are counted
    when they land in a shard, not when they were first seen), parts and merges add their
    shards' sums, and ``verify`` checks the manifest's coverage against them. ``mass_n`` and
    ``entropy_n`` count the positions that had each statistic.
    """

    positions: int = 0
    mass: float = 0.0
    mass_n: int = 0
    entropy: float = 0.0
    entropy_n: int = 0
    nll: float = 0.0  # the teacher's NLL of the true next token (since 1.2, optional)
    nll_n: int = 0

    def __post_init__(self) -> None:
        for name in ("positions", "mass_n", "entropy_n", "nll_n"):
            v = getattr(self, name)
            _need(isinstance(v, int) and v >= 0, f"coverage.{name}", f"bad value {v!r}")
        for name in ("mass", "entropy", "nll"):
            v = getattr(self, name)
            _need(
                isinstance(v, (int, float)) and math.isfinite(v),
                f"coverage.{name}",
                f"must be a finite number, got {v!r}",
            )

    @classmethod
    def of(
        cls, positions: int, mass: Any = None, entropy: Any = None, nll: Any = None
    ) -> CoverageSums:
        """Sums over ``positions`` positions with per-position statistics (arrays, or None;
        NaN in ``nll`` marks a position without a next token, not counted)."""

        def total(v: Any) -> tuple[float, int]:
            if v is None:
                return 0.0, 0
            arr = np.asarray(v)
            return float(np.sum(arr, dtype=np.float64)), int(arr.size)

        m, mn = total(mass)
        e, en = total(entropy)
        lv, ln = total(None if nll is None else np.asarray(nll)[~np.isnan(nll)])
        return cls(positions, m, mn, e, en, lv, ln)

    def __add__(self, other: CoverageSums) -> CoverageSums:
        return CoverageSums(
            self.positions + other.positions,
            self.mass + other.mass,
            self.mass_n + other.mass_n,
            self.entropy + other.entropy,
            self.entropy_n + other.entropy_n,
            self.nll + other.nll,
            self.nll_n + other.nll_n,
        )

    def coverage(self) -> Coverage:
        return Coverage(
            positions=self.positions,
            captured_mass=self.mass / self.mass_n if self.mass_n else None,
            entropy=self.entropy / self.entropy_n if self.entropy_n else None,
            teacher_nll=self.nll / self.nll_n if self.nll_n else None,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "positions": self.positions,
            "mass": self.mass,
            "mass_n": self.mass_n,
            "entropy": self.entropy,
            "entropy_n": self.entropy_n,
            **({"nll": self.nll, "nll_n": self.nll_n} if self.nll_n else {}),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CoverageSums:
        if not isinstance(d, Mapping):
            raise ManifestError(f"manifest field coverage sums must be an object, got {d!r}")
        return cls(**_known(cls, d))

    @staticmethod
    def total(shards: Any) -> CoverageSums | None:
        """The sums over ``shards`` (shard records), or None if one of them has none (a shard
        written before format 1.2)."""
        out = CoverageSums()
        for s in shards:
            if s.coverage is None:
                return None
            out = out + s.coverage
        return out


@dataclass(frozen=True)
class ShardRecord:
    """One shard: its path (a ``.zarr`` directory or an ``.arrow`` file), its row, position and
    entry counts, and every file it consists of with size and checksum."""

    path: str
    rows: int
    positions: int
    entries: int
    files: tuple[FileRecord, ...]
    coverage: CoverageSums | None = None

    def __post_init__(self) -> None:
        check_relative_path(self.path, "shards[].path")
        for name in ("rows", "positions", "entries"):
            v = getattr(self, name)
            _need(isinstance(v, int) and v >= 0, f"shard {self.path}.{name}", f"bad value {v!r}")
        if self.coverage is not None:
            _need(
                self.coverage.positions == self.positions,
                f"shard {self.path}.coverage.positions",
                f"is {self.coverage.positions} but the shard holds {self.positions} positions",
            )
        _need(len(self.files) > 0, f"shard {self.path}.files", "lists no files")
        for f in self.files:
            _need(
                f.path == self.path or f.path.startswith(self.path + "/"),
                f"shard {self.path}.files",
                f"file {f.path!r} lies outside the shard",
            )

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "rows": self.rows,
            "positions": self.positions,
            "entries": self.entries,
            "files": [f.to_dict() for f in self.files],
            **({"coverage": self.coverage.to_dict()} if self.coverage is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ShardRecord:
        files = _get(d, "files", "shard")
        _need(isinstance(files, list), "shards[].files", "must be a list")
        return cls(
            path=_get(d, "path", "shard"),
            rows=_get(d, "rows", "shard"),
            positions=_get(d, "positions", "shard"),
            entries=_get(d, "entries", "shard"),
            files=tuple(FileRecord.from_dict(f) for f in files),
            coverage=CoverageSums.from_dict(d["coverage"]) if "coverage" in d else None,
        )


@dataclass(frozen=True)
class Coverage:
    """How much of the teacher distribution the targets capture, averaged over stored positions.

    captured_mass: mean probability mass of the stored ids (top-k) or of the distinct sampled ids;
    entropy: mean teacher entropy in nats over the real vocabulary; teacher_nll: the teacher's
    mean NLL (nats) of the true next token at those positions (exp of it is its perplexity on
    the dumped tokens; optional, absent in older caches).
    """

    positions: int = 0
    captured_mass: float | None = None
    entropy: float | None = None
    teacher_nll: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "positions": self.positions,
            "captured_mass": self.captured_mass,
            "entropy": self.entropy,
            **({"teacher_nll": self.teacher_nll} if self.teacher_nll is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Coverage:
        return cls(**_known(cls, d))


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
        _need(
            self.format == FORMAT_NAME, "format", f"expected {FORMAT_NAME!r}, got {self.format!r}"
        )
        _need(self.backend in ("zarr", "arrow"), "backend", f"unknown {self.backend!r}")
        _need(isinstance(self.seq_len, int) and self.seq_len >= 1, "seq_len", "must be >= 1")
        _need(
            isinstance(self.vocab_size, int) and self.vocab_size >= 1,
            "vocab_size",
            f"must be >= 1, got {self.vocab_size!r}",
        )
        _need(
            isinstance(self.padded_vocab_size, int)
            and self.vocab_size <= self.padded_vocab_size <= _MAX_VOCAB,
            "padded_vocab_size",
            f"must lie in [vocab_size {self.vocab_size}, {_MAX_VOCAB}] (input_ids are int32), "
            f"got {self.padded_vocab_size!r}",
        )
        codec_vocab = getattr(self.codec, "vocab_size", self.vocab_size)
        _need(
            codec_vocab == self.vocab_size,
            "codec.vocab_size",
            f"{codec_vocab} differs from vocab_size {self.vocab_size}",
        )
        _check_codec_agrees(self.targets, self.codec)
        seen: set[str] = set()
        for s in self.shards:
            _need(s.path not in seen, "shards", f"shard {s.path!r} listed twice")
            seen.add(s.path)
        _check_shard_order(self.shards)
        sums = CoverageSums.total(self.shards)
        if sums is not None and self.coverage != Coverage():
            _need(
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
        version = str(_get(d, "format_version", "manifest"))
        major = version.split(".")[0]
        if major != FORMAT_VERSION.split(".")[0]:
            raise FormatVersionError(
                f"cache format version {version} is not readable by this logitcache, which reads "
                f"{FORMAT_VERSION.split('.')[0]}.x; install a logitcache release that supports "
                f"format {major}.x"
            )
        shards = _get(d, "shards", "manifest")
        _need(isinstance(shards, list), "shards", "must be a list")
        m = cls(
            backend=_get(d, "backend", "manifest"),
            seq_len=_get(d, "seq_len", "manifest"),
            vocab_size=_get(d, "vocab_size", "manifest"),
            padded_vocab_size=_get(d, "padded_vocab_size", "manifest"),
            targets=TargetsInfo.from_dict(_get(d, "targets", "manifest")),
            codec=codec_from_dict(_get(d, "codec", "manifest")),
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
                _need(
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
            _need(
                p not in done,
                "shards",
                f"the shards of {p!r} are not listed together ({s.path!r} comes after others); "
                "records were reordered",
            )
            if prefix is not None:
                done.add(prefix)
            prefix, expected = p, 0
        _need(
            i == expected,
            "shards",
            f"{s.path!r} is listed where shard number {expected} of {p!r} belongs: records were "
            "reordered or one was dropped; re-copy or re-dump the cache",
        )
        expected += 1


def _check_codec_agrees(targets: TargetsInfo, codec: TargetCodec) -> None:
    """``targets`` restates a few of the codec's parameters for readers of the JSON; they must
    be the codec's (a manifest edited by hand or by a faulty tool is refused, naming both)."""
    _need(
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
