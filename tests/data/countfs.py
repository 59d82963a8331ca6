"""A filesystem that logs every file it serves: ``countfs:///abs/path`` reads local files.

It is *not* a ``LocalFileSystem`` subclass on purpose: the reader then treats it as remote
storage (every fetch verified, the node-local shard cache and the small-file memory in use), as
it would treat ``s3://``. Each ``cat_file`` appends ``path<TAB>bytes`` to the file named by
``$COUNTFS_LOG`` with one ``O_APPEND`` write, so processes (ranks, DataLoader workers) can share
one log. Importing this module registers the protocol; forked workers inherit it.
"""

from __future__ import annotations

import os
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

LOG_ENV = "COUNTFS_LOG"


class CountingFileSystem(fsspec.AbstractFileSystem):
    protocol = "countfs"
    root_marker = "/"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.local = LocalFileSystem()

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        path = str(path)
        return (
            "/" + path[len("countfs://") :].lstrip("/") if path.startswith("countfs://") else path
        )

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        return self.local.info(self._strip_protocol(path))

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> Any:
        return self.local.ls(self._strip_protocol(path), detail=detail)

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        if "r" not in mode:
            raise PermissionError("countfs is read-only")
        return self.local._open(self._strip_protocol(path), mode)

    def cat_file(self, path: str, start: Any = None, end: Any = None, **kwargs: Any) -> bytes:
        data = self.local.cat_file(self._strip_protocol(path), start, end)
        log = os.environ.get(LOG_ENV)
        if log:
            fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, f"{self._strip_protocol(path)}\t{len(data)}\n".encode())
            finally:
                os.close(fd)
        return bytes(data)


def reads(log: str) -> list[tuple[str, int]]:
    """(path, bytes) of every read logged so far."""
    if not os.path.exists(log):
        return []
    with open(log) as f:
        return [(p, int(n)) for p, n in (line.rstrip("\n").split("\t") for line in f)]


fsspec.register_implementation("countfs", CountingFileSystem, clobber=True)
