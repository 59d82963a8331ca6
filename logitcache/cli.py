"""The ``logitcache`` command line. Thin: each command parses options and calls one function.

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

from logitcache import __version__
from logitcache.errors import LogitCacheError

F = TypeVar("F", bound=Callable[..., Any])


def _friendly_errors(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LogitCacheError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


def _storage_options(pairs: tuple[str, ...]) -> dict[str, Any]:
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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="logitcache")
def cli() -> None:
    """Offline knowledge distillation: cache a teacher's sparse soft labels once, train many
    students from them."""


@cli.command()
@click.argument("cache")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@storage_option
@_friendly_errors
def info(cache: str, as_json: bool, storage_options: tuple[str, ...]) -> None:
    """Summarise CACHE (a directory or fsspec URL): size, targets, codec, fingerprints."""
    from logitcache.report import cache_info, format_info

    summary = cache_info(cache, _storage_options(storage_options))
    click.echo(json.dumps(summary, indent=1) if as_json else format_info(summary))


@cli.command()
@click.argument("cache")
@storage_option
@_friendly_errors
def verify(cache: str, storage_options: tuple[str, ...]) -> None:
    """Check every shard of CACHE: sizes and sha256 checksums, every target decodes, ids inside
    the vocabulary, finite values. Exits non-zero naming the first bad shard."""
    from logitcache.report import verify_cache

    def progress(done: int, total: int) -> None:
        click.echo(f"\rverified {done}/{total} shards", nl=done == total, err=True)

    report = verify_cache(cache, _storage_options(storage_options), progress=progress)
    click.echo(
        f"ok: {report.shards} shards, {report.rows:,} rows, {report.positions:,} positions, "
        f"{report.bytes:,} bytes; all checksums match and every target decodes"
    )


def main() -> None:
    cli()
