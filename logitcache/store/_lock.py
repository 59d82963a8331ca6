"""Writer locks: one writer per cache (per part), even on object storage.

Two dumps into one prefix would interleave shards and progress records and commit a manifest
that mixes them. So a writer first creates ``_locks/<name>.json`` (``main`` for a single writer,
the part name for one rank of a multi-rank dump) *exclusively*: ``O_EXCL`` on a local disk, a
conditional PUT (``If-None-Match: *``) on S3, which the server refuses if the key exists. On
filesystems with neither (memory://, some fsspec backends) the check is "exists, then write",
which is only advisory. The lock records who holds it (owner id, host, pid, start time).

Stale locks: a writer releases its lock when it commits or aborts; a killed one cannot. A lock
whose holder ran on *this* host and whose pid is gone is stale and taken over automatically
(this is what lets ``--resume`` follow a crash on the same machine). A lock from another host
cannot be judged from here: the error shows its record and the fix, ``--break-lock``, which
deletes it. A lock file that is empty or not a JSON record (a kill between creating and writing
it) and older than :data:`UNREADABLE_GRACE_S` seconds is stale too: no live writer leaves its lock
unwritten that long. The writer re-reads its lock after every shard and before writing the
manifest, so a writer whose lock was broken (taken over by another) stops instead of committing.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import uuid
import weakref
from datetime import datetime, timezone
from typing import Any

from logitcache.errors import CacheLockedError
from logitcache.store._fs import Location

__all__ = ["LOCKS_DIR", "WriterLock"]

LOCKS_DIR = "_locks"
# an unreadable lock younger than this may be one being written right now (create, then write)
UNREADABLE_GRACE_S = 10.0
log = logging.getLogger("logitcache")
# Locks held by writer objects alive in this process: a lock of this pid whose writer object was
# garbage-collected unclosed is as stale as one of a dead process.
_LIVE: weakref.WeakValueDictionary[str, WriterLock] = weakref.WeakValueDictionary()


class WriterLock:
    """The lock object ``_locks/<name>.json`` of a cache location."""

    def __init__(self, loc: Location, name: str = "main") -> None:
        self.loc = loc
        self.name = name
        self.rel = f"{LOCKS_DIR}/{name}.json"
        self.owner = uuid.uuid4().hex
        self.held = False

    def _record(self) -> dict[str, Any]:
        return {
            "owner": self.owner,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    def read(self) -> dict[str, Any] | None:
        """The current lock record, or None when there is no lock."""
        try:
            data = self.loc.read_bytes(self.rel)
        except FileNotFoundError:
            return None
        try:
            record = json.loads(data)
        except ValueError:
            record = None
        if isinstance(record, dict):
            return record
        return {"owner": "?", "host": "?", "pid": None, "created_at": "?", "unreadable": True}

    def ensure_free(self, break_lock: bool = False) -> None:
        """Raise :class:`CacheLockedError` if a live writer holds the lock (no lock is taken);
        remove a stale or (with ``break_lock``) any lock."""
        record = self.read()
        if record is None:
            return
        unreadable = bool(record.get("unreadable"))
        if break_lock or _is_stale(record) or (unreadable and self._age() > UNREADABLE_GRACE_S):
            if break_lock:
                why = "as asked (--break-lock)"
            elif unreadable:
                why = f"it is empty or unreadable and older than {UNREADABLE_GRACE_S:g} s"
            else:
                why = "its process is gone"
            log.warning("removing the lock of %s held by %s: %s", self.loc.url, _who(record), why)
            self.loc.remove(self.rel)
            return
        raise CacheLockedError(
            f"{self.loc.url} is being written by another dump ({_who(record)}; lock object "
            f"{self.rel}); two writers must never share a cache. Wait for it, or write "
            "elsewhere; if that dump is dead (crashed on another machine), rerun with "
            "--break-lock (with --resume to keep its committed shards)"
        )

    def _age(self) -> float:
        """Seconds since the lock object was last written (0 if that cannot be told)."""
        try:
            modified = self.loc.modified(self.rel)
        except (FileNotFoundError, NotImplementedError):
            return 0.0
        return (datetime.now(timezone.utc) - modified).total_seconds()

    def acquire(self, break_lock: bool = False) -> None:
        """Take the lock, or raise :class:`CacheLockedError` naming its holder."""
        data = json.dumps(self._record()).encode()
        if self.loc.write_exclusive(self.rel, data):
            self._hold()
            return
        self.ensure_free(break_lock)  # raises unless the old lock was stale or broken
        if not self.loc.write_exclusive(self.rel, data):
            raise CacheLockedError(
                f"{self.loc.url}: another dump took the lock {self.rel} at the same moment "
                f"({_who(self.read() or {})}); two writers must never share a cache"
            )
        self._hold()

    def _hold(self) -> None:
        self.held = True
        _LIVE[self.owner] = self

    def check(self) -> None:
        """Raise if the lock is no longer ours (it was broken and taken by another writer)."""
        if not self.held:
            return
        record = self.read()
        if record is None or record.get("owner") != self.owner:
            self.held = False
            holder = _who(record) if record else "nobody"
            raise CacheLockedError(
                f"{self.loc.url}: this dump lost its lock {self.rel} (now held by {holder}); "
                "another writer broke it with --break-lock. Nothing was committed by this dump"
            )

    def release(self) -> None:
        """Delete the lock if it is still ours (a lock taken over by another stays)."""
        if not self.held:
            return
        self.held = False
        record = self.read()
        if record is not None and record.get("owner") == self.owner:
            self.loc.remove(self.rel)


def _who(record: dict[str, Any]) -> str:
    return (
        f"host {record.get('host', '?')}, pid {record.get('pid', '?')}, "
        f"since {record.get('created_at', '?')}"
    )


def _is_stale(record: dict[str, Any]) -> bool:
    """A lock taken on this host by a process that no longer exists."""
    pid = record.get("pid")
    if record.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return False
    if pid == os.getpid():
        return record.get("owner") not in _LIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
