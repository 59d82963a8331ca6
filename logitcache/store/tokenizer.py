"""The cache's own tokenizer (format 1.3): its files stored under ``tokenizer/``.

A cache holds token ids; to turn them back into text (``align``, reading a cache to check it,
bits per byte) one needs the exact tokenizer that made them. Since format 1.3 the writer stores
that tokenizer's files - what ``save_pretrained`` writes: ``tokenizer.json``,
``tokenizer_config.json``, ``special_tokens_map.json``, ... (2-4 MB for a 49k-152k vocabulary,
~0.1% of a small cache) - and lists each with size, sha256 and CRC-32C in the manifest's
``tokenizer.files``. They are written like everything else (each file atomically, all before the
manifest; on object stores one PUT each) and checked like shard files (``verify``, ``cp``, and
:func:`cache_tokenizer`, which refuses altered bytes before loading anything).

Older caches (format <= 1.2, or imported without ``--tokenizer``) have no files; a command that
needs the tokenizer then asks for it on the command line and checks it against the manifest's
tokenizer fingerprint.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Mapping
from typing import Any

from logitcache.errors import ChecksumMismatchError, ConfigError, ShardMissingError
from logitcache.format.fingerprint import tokenizer_fingerprint
from logitcache.format.manifest import TOKENIZER_DIR, FileRecord, Manifest, check_relative_path
from logitcache.store._fs import Location, crc32c

__all__ = [
    "TOKENIZER_DIR",
    "cache_tokenizer",
    "read_tokenizer_files",
    "tokenizer_file_records",
    "tokenizer_files",
]

log = logging.getLogger("logitcache")


def tokenizer_files(tok: Any) -> dict[str, bytes]:
    """What ``tok.save_pretrained`` writes, as ``{relative name: bytes}`` (empty for an object
    that cannot save itself, such as a factory teacher's custom tokenizer)."""
    save = getattr(tok, "save_pretrained", None)
    if tok is None or save is None:
        return {}
    with tempfile.TemporaryDirectory(prefix="logitcache-tok-") as tmp:
        save(tmp)
        out: dict[str, bytes] = {}
        for root, _, names in os.walk(tmp):
            for name in sorted(names):
                path = os.path.join(root, name)
                rel = os.path.relpath(path, tmp).replace(os.sep, "/")
                with open(path, "rb") as f:
                    out[rel] = f.read()
    return dict(sorted(out.items()))


def tokenizer_file_records(files: Mapping[str, bytes]) -> tuple[FileRecord, ...]:
    """The manifest records of ``files`` (``{name: bytes}``) stored under ``tokenizer/``."""
    return tuple(
        FileRecord(
            path=check_relative_path(f"{TOKENIZER_DIR}/{name}", "tokenizer file"),
            bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            crc32c=crc32c(data),
        )
        for name, data in files.items()
    )


def read_verified(loc: Location, f: FileRecord) -> bytes:
    """One listed file, checked against its size and sha256."""
    try:
        data = loc.read_bytes(f.path)
    except FileNotFoundError as e:
        raise ShardMissingError(
            f"{loc.url}: file {f.path} listed in the manifest is missing; the cache was copied "
            "incompletely: re-copy it"
        ) from e
    got = hashlib.sha256(data).hexdigest()
    if len(data) != f.bytes or got != f.sha256:
        raise ChecksumMismatchError(
            f"{loc.url}: file {f.path} is {len(data)} bytes with sha256 {got[:16]}..., the "
            f"manifest lists {f.bytes} bytes with sha256 {f.sha256[:16]}...; it was altered or "
            "damaged after the commit: re-copy the cache"
        )
    return data


def read_tokenizer_files(loc: Location, manifest: Manifest) -> dict[str, bytes]:
    """The cache's tokenizer files ``{name under tokenizer/: bytes}``, each verified (empty for
    a cache without them)."""
    cut = len(TOKENIZER_DIR) + 1
    return {f.path[cut:]: read_verified(loc, f) for f in manifest.tokenizer.files}


def cache_tokenizer(cache: Any, storage_options: Mapping[str, Any] | None = None) -> Any:
    """Load the tokenizer a cache stores (format 1.3), after checking every file's sha256.

    ``cache``: a URL or path, or an open :class:`~logitcache.store.CacheReader`. Refuses a cache
    without tokenizer files, naming the way out. A loaded tokenizer whose fingerprint is not the
    manifest's (another ``transformers`` may load the same files differently) is logged, not
    refused: the files are the ones the dump saved, byte for byte."""
    from logitcache.store.reader import CacheReader

    if isinstance(cache, CacheReader):
        reader = cache
    else:
        reader = CacheReader(cache, storage_options=storage_options)
    m = reader.manifest
    if not m.tokenizer.files:
        raise ConfigError(
            f"{reader.url} stores no tokenizer: it was dumped before format 1.3 (it is "
            f"{m.format_version}) or imported without --tokenizer; pass --teacher-tokenizer DIR "
            "(the tokenizer it was dumped with, checked against its fingerprint)"
        )
    files = read_tokenizer_files(reader.loc, m)
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="logitcache-tok-") as tmp:
        for name, data in files.items():
            path = os.path.join(tmp, *name.split("/"))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
        try:
            tok = AutoTokenizer.from_pretrained(tmp)
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"{reader.url}: its stored tokenizer does not load with this transformers ({e}); "
                "pass --teacher-tokenizer DIR instead"
            ) from e
    want = m.tokenizer.fingerprint
    got = tokenizer_fingerprint(tok) if want else None
    if want and got != want:
        log.warning(
            "%s: the stored tokenizer loads with fingerprint %s, the manifest records %s "
            "(another transformers release reads its files differently); its files are intact",
            reader.url,
            str(got)[:12],
            want[:12],
        )
    return tok
