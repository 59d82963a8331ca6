"""Joining the parts of a multi-rank dump into one manifest.

Each rank's writer commits a completion marker ``_parts/<part>.json`` (its manifest and coverage
sums) instead of ``manifest.json``; :func:`finalize_cache` checks that every part completed and
that all agree on the header, then writes the one manifest, atomically, listing the parts'
shards in the order given.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from logitcache.errors import CacheIncompleteError, ConfigError, WriterError
from logitcache.format.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    CoverageSums,
    Manifest,
    first_difference,
)
from logitcache.store._fs import Location, open_location
from logitcache.store._lock import WriterLock
from logitcache.store.header import PARTS_DIR, WRITTEN_FIELDS, drop_run_info

__all__ = ["finalize_cache"]


def finalize_cache(
    url: str, parts: Sequence[str], storage_options: Mapping[str, Any] | None = None
) -> Manifest:
    """Join the completion markers of ``parts`` (in that order) into one manifest, atomically.

    Refuses when a part is missing (naming it) or when parts disagree on any header field. Holds
    the cache's ``main`` writer lock meanwhile: two finalizes (or a finalize and a single-writer
    dump) into one prefix cannot race.
    """
    loc = open_location(url, storage_options)
    lock = WriterLock(loc, "main")
    lock.acquire()
    try:
        return _finalize(loc, url, parts)
    finally:
        lock.release()


def _finalize(loc: Location, url: str, parts: Sequence[str]) -> Manifest:
    if loc.exists(MANIFEST_NAME):
        raise WriterError(f"{url} is already finalized (manifest.json exists)")
    manifests: list[Manifest] = []
    for p in parts:
        rel = f"{PARTS_DIR}/{p}.json"
        if not loc.exists(rel):
            raise CacheIncompleteError(
                f"cannot finalize {url}: part {p!r} has not completed ({rel} is missing); "
                "wait for it or resume that rank"
            )
        d = json.loads(loc.read_bytes(rel))
        manifests.append(Manifest.from_dict(d["manifest"]))
    if not manifests:
        raise ConfigError("finalize needs at least one part")
    # parts must also come from the same logitcache release, so created_by is compared
    skip = WRITTEN_FIELDS - {"created_by"}

    def header(m: Manifest) -> dict[str, Any]:
        return drop_run_info({k: v for k, v in m.to_dict().items() if k not in skip})

    for p, m in zip(parts[1:], manifests[1:], strict=True):
        changed = first_difference(header(manifests[0]), header(m))
        if changed is not None:
            where, ours, theirs = changed
            raise ConfigError(
                f"cannot finalize {url}: part {p!r} differs from part {parts[0]!r} in {where} "
                f"({parts[0]!r} has {ours!r}, {p!r} has {theirs!r}); every rank must run with "
                "the same settings: resume the odd part with them, or dump again"
            )
    shards = tuple(s for m in manifests for s in m.shards)
    total = CoverageSums.total(shards)
    if total is None:  # parts written before format 1.2: their shards carry no sums
        raise CacheIncompleteError(
            f"cannot finalize {url}: its parts were written by a logitcache older than format "
            f"{FORMAT_VERSION} (shards without coverage sums); finalize with that release"
        )
    manifest = manifests[0].derive(shards=shards, coverage=total.coverage())
    loc.write_atomic(MANIFEST_NAME, manifest.to_json().encode())
    return manifest
