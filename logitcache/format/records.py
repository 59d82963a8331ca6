"""The records a manifest is made of: what the targets mean, where they came from, the shard
and file records with their checksums, and the coverage statistics.

Each is a frozen dataclass validated at construction (a field that does not fit is refused with
its path, ``manifest field shards[3].files[0].sha256: ...``), with ``to_dict``/``from_dict``;
unknown fields of a newer minor version are ignored by ``from_dict``. The manifest itself, its
versioning and its content digest are in :mod:`logitcache.format.manifest`, which re-exports
these names.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

import numpy as np

from logitcache.errors import ManifestError, UnsafePathError

__all__ = [
    "Backend",
    "Coverage",
    "CoverageSums",
    "FileRecord",
    "Method",
    "ShardRecord",
    "SourceInfo",
    "TargetsInfo",
    "check_relative_path",
    "known_fields",
    "need",
    "require_key",
]

Method = Literal["topk", "sampled"]
Backend = Literal["zarr", "arrow"]
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def need(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ManifestError(f"manifest field {where}: {msg}")


def require_key(d: Mapping[str, Any], key: str, where: str) -> Any:
    if not isinstance(d, Mapping):
        raise ManifestError(f"manifest field {where} must be an object, got {type(d).__name__}")
    if key not in d:
        raise ManifestError(f"manifest field {where}.{key} is missing")
    return d[key]


def known_fields(cls: type, d: Mapping[str, Any]) -> dict[str, Any]:
    """Keep the keys ``cls`` knows: newer minor versions may add fields, which we ignore."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


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
        need(self.method in ("topk", "sampled"), "targets.method", f"unknown {self.method!r}")
        if self.method == "topk":
            need(
                isinstance(self.k, int) and self.k >= 1, "targets.k", f"must be >= 1, got {self.k}"
            )
        else:
            need(
                isinstance(self.samples, int) and self.samples >= 1,
                "targets.samples",
                f"must be >= 1, got {self.samples}",
            )
        need(self.values == "logprob", "targets.values", f"must be 'logprob', got {self.values!r}")
        need(self.temperature == 1.0, "targets.temperature", "values are stored at T=1 only")
        need(self.tail in ("bucket", "none", "unknown"), "targets.tail", f"unknown {self.tail!r}")
        for t in self.temperatures:
            need(
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
        kw = known_fields(cls, d)
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
    # since format 1.3, the tokenizer only: its files stored in the cache (``tokenizer/...``,
    # what ``save_pretrained`` writes), so a cache decodes its own tokens; empty otherwise, and
    # then absent from the JSON (older caches keep their content digest)
    files: tuple[FileRecord, ...] = ()

    def __post_init__(self) -> None:
        for f in self.files:
            need(isinstance(f, FileRecord), "files", f"must hold file records, got {f!r}")
        paths = [f.path for f in self.files]
        need(len(set(paths)) == len(paths), "files", "a file is listed twice")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "revision": self.revision,
            "fingerprint": self.fingerprint,
        }
        if self.files:
            d["files"] = [f.to_dict() for f in self.files]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SourceInfo:
        kw = known_fields(cls, d)
        files = kw.pop("files", None) or []
        need(isinstance(files, list), "tokenizer.files", "must be a list")
        return cls(**kw, files=tuple(FileRecord.from_dict(f) for f in files))


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
        need(isinstance(self.bytes, int) and self.bytes >= 0, f"file {self.path}.bytes", "< 0")
        need(
            isinstance(self.sha256, str) and bool(_SHA256.match(self.sha256)),
            f"file {self.path}.sha256",
            "must be 64 lowercase hex digits",
        )
        if self.crc32c is not None:
            need(
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
            path=require_key(d, "path", "file"),
            bytes=require_key(d, "bytes", "file"),
            sha256=require_key(d, "sha256", "file"),
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
            need(isinstance(v, int) and v >= 0, f"coverage.{name}", f"bad value {v!r}")
        for name in ("mass", "entropy", "nll"):
            v = getattr(self, name)
            need(
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
        return cls(**known_fields(cls, d))

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
            need(isinstance(v, int) and v >= 0, f"shard {self.path}.{name}", f"bad value {v!r}")
        if self.coverage is not None:
            need(
                self.coverage.positions == self.positions,
                f"shard {self.path}.coverage.positions",
                f"is {self.coverage.positions} but the shard holds {self.positions} positions",
            )
        need(len(self.files) > 0, f"shard {self.path}.files", "lists no files")
        for f in self.files:
            need(
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
        files = require_key(d, "files", "shard")
        need(isinstance(files, list), "shards[].files", "must be a list")
        return cls(
            path=require_key(d, "path", "shard"),
            rows=require_key(d, "rows", "shard"),
            positions=require_key(d, "positions", "shard"),
            entries=require_key(d, "entries", "shard"),
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
        return cls(**known_fields(cls, d))
