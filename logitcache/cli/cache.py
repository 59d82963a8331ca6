"""Commands on caches that exist: ``info``, ``verify``, ``finalize``, ``cp``, ``merge``."""

from __future__ import annotations

import inspect
import json

import click

from logitcache.cli._common import (
    dst_storage_option,
    friendly_errors,
    parse_storage_options,
    storage_option,
)
from logitcache.store.share import copy_cache  # no torch: the cache tools start fast

__all__ = ["cp", "finalize", "info", "merge", "verify"]


@click.command()
@click.argument("cache")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@storage_option
@friendly_errors
def info(cache: str, as_json: bool, storage_options: tuple[str, ...]) -> None:
    """Summarise CACHE (a directory or fsspec URL): size, targets, codec, fingerprints."""
    from logitcache.report import cache_info, format_info

    summary = cache_info(cache, parse_storage_options(storage_options))
    click.echo(json.dumps(summary, indent=1) if as_json else format_info(summary))


@click.command()
@click.argument("cache")
@storage_option
@friendly_errors
def verify(cache: str, storage_options: tuple[str, ...]) -> None:
    """Check every shard of CACHE: sizes and sha256 checksums, every target decodes, ids inside
    the vocabulary, finite values. Every object is read from the store itself (no local cache).
    Exits non-zero naming the first bad shard."""
    from logitcache.report import verify_cache

    def progress(done: int, total: int) -> None:
        click.echo(f"\rverified {done}/{total} shards", nl=done == total, err=True)

    report = verify_cache(cache, parse_storage_options(storage_options), progress=progress)
    click.echo(
        f"ok: {report.shards} shards, {report.rows:,} rows, {report.positions:,} positions, "
        f"{report.bytes:,} bytes; all checksums match and every target decodes"
    )


@click.command()
@click.argument("cache")
@click.option(
    "--world-size",
    type=int,
    required=True,
    help="Number of ranks the dump ran with; their parts are joined in rank order.",
)
@storage_option
@friendly_errors
def finalize(cache: str, world_size: int, storage_options: tuple[str, ...]) -> None:
    """Write the manifest of a multi-rank dump of CACHE whose ranks could not do it themselves
    (launched without torchrun's rendezvous). Refuses while a rank's part is missing."""
    from logitcache.dump import finalize_dump

    m = finalize_dump(cache, world_size, parse_storage_options(storage_options))
    click.echo(f"finalized {cache}: {m.num_rows:,} rows in {len(m.shards)} shards")


@click.command("cp")
@click.argument("src")
@click.argument("dst")
@click.option("--expect-digest", help="Refuse SRC unless its content digest is this.")
@click.option(
    "--workers",
    type=int,
    default=inspect.signature(copy_cache).parameters["workers"].default,
    show_default=True,
    help="Parallel file copies.",
)
@click.option("--break-lock", is_flag=True, help="Remove a dead writer's lock at DST.")
@storage_option
@dst_storage_option
@friendly_errors
def cp(
    src: str,
    dst: str,
    expect_digest: str | None,
    workers: int,
    break_lock: bool,
    storage_options: tuple[str, ...],
    dst_storage_options: tuple[str, ...],
) -> None:
    """Copy the cache at SRC to DST (any two stores), verifying every file's sha256; rerun to
    resume: files already at DST intact are skipped, and the manifest is written last."""
    opts = parse_storage_options(storage_options)
    report = copy_cache(
        src,
        dst,
        src_options=opts,
        dst_options={**opts, **parse_storage_options(dst_storage_options)},
        expect_digest=expect_digest,
        workers=workers,
        break_lock=break_lock,
    )
    click.echo(
        f"copied {report.files_copied} files ({report.bytes_copied:,} bytes), skipped "
        f"{report.files_skipped} already there; content digest {report.content_digest}"
    )


@click.command()
@click.argument("out")
@click.argument("sources", nargs=-1, required=True)
@click.option("--break-lock", is_flag=True, help="Remove a dead writer's lock at OUT.")
@storage_option
@friendly_errors
def merge(
    out: str, sources: tuple[str, ...], break_lock: bool, storage_options: tuple[str, ...]
) -> None:
    """Join caches SOURCES, dumped separately over disjoint data with the same teacher,
    tokenizer, codec, seq_len and vocabulary, into one new cache OUT (shards are copied).

    The sources may have run differently (tensor-parallel degree, number of writers, device
    map, input files): what each recorded about its targets (dtype, sampling seed and rule)
    must agree. OUT keeps each source's run under extra.merged_from."""
    from logitcache.store.share import merge_caches

    m = merge_caches(
        out,
        list(sources),
        storage_options=parse_storage_options(storage_options),
        break_lock=break_lock,
    )
    click.echo(
        f"merged {len(sources)} caches into {out}: {m.num_rows:,} rows in {len(m.shards)} "
        f"shards; content digest {m.content_digest}"
    )
