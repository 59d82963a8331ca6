"""What every command shares: the error wrapper and the storage options.

A :class:`LogitCacheError` becomes ``error: <message>`` on stderr and exit status 1; any other
exception keeps its traceback, because it is a bug in logitcache.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from logitcache.errors import LogitCacheError

__all__ = ["dst_storage_option", "friendly_errors", "parse_storage_options", "storage_option"]

F = TypeVar("F", bound=Callable[..., Any])


def friendly_errors(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LogitCacheError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


def parse_storage_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``--storage-option key=value`` pairs as a dict (values parsed as JSON when possible)."""
    out: dict[str, Any] = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key:
            raise click.BadParameter(
                f"expected key=value, got {p!r}", param_hint="--storage-option"
            )
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


storage_option = click.option(
    "--storage-option",
    "storage_options",
    multiple=True,
    metavar="KEY=VALUE",
    help="fsspec option for the cache's filesystem (repeatable); VALUE is parsed as JSON "
    "if it can be.",
)


dst_storage_option = click.option(
    "--dst-storage-option",
    "dst_storage_options",
    multiple=True,
    metavar="KEY=VALUE",
    help="fsspec option for the destination only (repeatable; overrides --storage-option).",
)
