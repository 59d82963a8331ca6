"""``logitcache import``, ``export``, ``mix`` and ``align``: caches from and to other tools'
layouts, several teachers' caches into one, a cache in another tokenizer's vocabulary."""

from __future__ import annotations

from typing import Any

import click

from logitcache.cli._common import (
    MIB,
    ConfigCommand,
    config_options,
    friendly_errors,
    parse_storage_options,
    storage_option,
)
from logitcache.transform.align import ALIGN_COMPRESSION_LEVEL
from logitcache.transform.layouts import LAYOUTS, Layout

__all__ = ["align_command", "export_command", "import_command", "mix_command"]

_LAYOUT_HELP = "; ".join(f"{name}: {layout.description}" for name, layout in LAYOUTS.items())


_IMPORT_HELP = {
    "tokenizer": "The teacher's tokenizer (directory): vocabulary size + fingerprint, recorded; "
    "its files are stored in the cache.",
    "vocab_size": "Teacher vocabulary size (without --tokenizer, or to override its length).",
    "teacher": "Teacher name to record in the manifest.",
    "seq_len": "Tokens per row (default: the longest row of the first batch).",
    "k": "Entries kept per position (default: the widest position of the first batch).",
    "input_format": "Container format (parquet, arrow or jsonl), overriding the file extension.",
    "skip_bad_rows": "Count and skip rows that fail a check instead of stopping at the first.",
    "values": "How the cache stores the values: sqrt-quantised (~1e-3 nats/position) or floats.",
    "backend": "Shard format of the new cache.",
    "compression_level": "zstd level of the shards (1-22): an import is a conversion, so it "
    "writes fast by default; 15, a dump's, is ~5% smaller and ~5x slower (docs/interop.md).",
    "shard_bytes": "Raw shard size to cut at.",
    "resume": "Continue an interrupted import into --out.",
    "overwrite": "Replace the cache at --out.",
}


def _import_options() -> list[Any]:
    """ImportConfig's fields as flags (cli/_common.py), besides the layout's column flags."""
    from logitcache.format.topk import _VALUE_MODES
    from logitcache.transform.importer import ImportConfig

    spelling: dict[str, dict[str, Any]] = {
        "values": {"type": click.Choice(_VALUE_MODES)},
        "input_format": {"type": click.Choice(["parquet", "arrow", "jsonl"])},
        "shard_bytes": {"decls": ("--shard-mb",), "unit": ("MiB", MIB)},
        "skip_bad_rows": {"decls": ("--skip-bad-rows/--no-skip-bad-rows",)},
        "compression_level": {
            "decls": ("--zstd-level", "--compression-level"),
            "type": click.IntRange(1, 22),
        },
    }
    return config_options(ImportConfig, _IMPORT_HELP, spelling)


_COLUMN_FLAGS = (
    ("input_ids", "input_ids_column"),
    ("ids", "ids_column"),
    ("values", "values_column"),
    ("pairs", "pairs_column"),
    ("records", "records_column"),
    ("loss_mask", "loss_mask_column"),
    ("tail", "tail_column"),
    ("value_kind", "value_kind"),
    ("normalized", "normalized"),
)


@click.command("import", cls=ConfigCommand, options=_import_options)
@click.argument("source")
@click.option("--out", required=True, help="Cache directory or fsspec URL to write.")
@click.option(
    "--layout",
    type=click.Choice(sorted(LAYOUTS)),
    default="plain",
    show_default=True,
    help=f"Column preset. {_LAYOUT_HELP}.",
)
@click.option("--input-ids-column", help="Override the preset's input ids column.")
@click.option("--ids-column", help="Column of per-position top-k ids (with --values-column).")
@click.option("--values-column", help="Column of per-position top-k values.")
@click.option("--pairs-column", help="Column of per-position [ids, values] pairs.")
@click.option("--records-column", help="Column of per-position {token, logprob} records.")
@click.option("--loss-mask-column", help="Column of per-position 0/1 (or [k] 0/1) masks.")
@click.option("--tail-column", help="Column of per-position tail log-probs (exact tail).")
@click.option(
    "--values-are",
    "value_kind",
    type=click.Choice(["logprob", "prob", "logit"]),
    help="What the source's values are (overrides the preset).",
)
@click.option(
    "--normalized/--renormalized",
    default=None,
    help="Values normalised over the whole vocabulary (tail = 1 - sum; the preset's default), or "
    "renormalised over the stored ids (tail unknown).",
)
@storage_option
@friendly_errors
def import_command(source: str, out: str, layout: str, **opts: Any) -> None:
    """Import SOURCE (Parquet, Arrow IPC or JSONL files, a directory, or an fsspec URL) holding
    per-position top-k teacher ids and values into a new cache at --out (docs/interop.md)."""
    from dataclasses import replace

    from logitcache.transform.importer import ImportConfig, import_cache

    overrides = {field: opts.pop(flag) for field, flag in _COLUMN_FLAGS}
    changes = {k: v for k, v in overrides.items() if v is not None}
    base = LAYOUTS[layout]
    if any(k in changes for k in ("ids", "values", "pairs", "records")):
        base = replace(base, ids=None, values=None, pairs=None, records=None)
    if changes.get("value_kind") == "logit":
        changes.setdefault("normalized", False)
    chosen: str | Layout = replace(base, **changes) if changes else layout
    config = ImportConfig(
        source=source,
        out=out,
        layout=chosen,
        storage_options=parse_storage_options(opts.pop("storage_options")),
        **opts,
    )
    click.echo(import_cache(config).summary())


@click.command("export")
@click.argument("cache")
@click.option("--out", required=True, help="Local directory for the Parquet files.")
@click.option(
    "--layout",
    type=click.Choice(["plain", "axolotl"]),
    default="plain",
    show_default=True,
    help="plain: ragged per-position lists with the tail; axolotl: dense [S][k] + target_mask.",
)
@click.option("--overwrite", is_flag=True, help="Write into a non-empty --out.")
@storage_option
@friendly_errors
def export_command(
    cache: str, out: str, layout: str, overwrite: bool, storage_options: tuple[str, ...]
) -> None:
    """Export CACHE (top-k) as Parquet list columns other tools read (docs/interop.md)."""
    from logitcache.transform.exporter import export_cache

    res = export_cache(
        cache,
        out,
        layout=layout,  # type: ignore[arg-type]
        storage_options=parse_storage_options(storage_options),
        overwrite=overwrite,
    )
    click.echo(
        f"exported {res.rows:,} rows ({res.positions:,} target positions) to {res.files} "
        f"file(s) in {out}: {res.bytes:,} bytes ({res.bytes / max(res.positions, 1):.1f} "
        "bytes/token)"
    )


@click.command("mix")
@click.argument("out")
@click.argument("sources", nargs=-1, required=True)
@click.option(
    "--weights",
    help="Comma-separated weight per source (normalised to sum 1; default equal), e.g. 0.7,0.3.",
)
@click.option("--k", type=int, help="Ids kept per position (default: the largest source k).")
@click.option("--overwrite", is_flag=True, help="Replace the cache at OUT.")
@storage_option
@friendly_errors
def mix_command(
    out: str,
    sources: tuple[str, ...],
    weights: str | None,
    k: int | None,
    overwrite: bool,
    storage_options: tuple[str, ...],
) -> None:
    """Mix the top-k caches SOURCES of several teachers over the same rows into one cache OUT:
    the union of ids with the weighted probabilities, re-cut to k, the rest in the tail."""
    from logitcache.transform.mix import mix_caches

    try:
        parsed = [float(x) for x in weights.split(",")] if weights else None
    except ValueError as e:
        raise click.BadParameter(f"expected numbers separated by commas ({e})") from e
    result = mix_caches(
        out,
        list(sources),
        parsed,
        k=k,
        storage_options=parse_storage_options(storage_options),
        overwrite=overwrite,
    )
    click.echo(result.summary())


@click.command("align")
@click.argument("cache")
@click.option("--out", required=True, help="Cache directory or fsspec URL to write.")
@click.option("--student-tokenizer", required=True, help="The student's tokenizer (a directory).")
@click.option(
    "--teacher-tokenizer",
    help="Only for a cache that does not store its tokenizer (dumped before format 1.3, or "
    "imported without --tokenizer): the tokenizer it was dumped with, checked against the "
    "cache's tokenizer fingerprint. Default: the cache's own.",
)
@click.option("--seq-len", type=int, help="Student tokens per row (default: the cache's).")
@click.option(
    "--compression-level",
    type=click.IntRange(1, 22),
    default=ALIGN_COMPRESSION_LEVEL,
    show_default=True,
    help="zstd level of the aligned cache (a dump writes 15: measured 0.7% smaller, with align "
    "running ~1.7x slower; docs/derived-caches.md).",
)
@click.option("--overwrite", is_flag=True, help="Replace the cache at --out.")
@storage_option
@friendly_errors
def align_command(
    cache: str,
    out: str,
    student_tokenizer: str,
    teacher_tokenizer: str | None,
    seq_len: int | None,
    compression_level: int,
    overwrite: bool,
    storage_options: tuple[str, ...],
) -> None:
    """Re-express CACHE in the student tokenizer's vocabulary (docs/derived-caches.md): where
    both tokenisations share a boundary the teacher's distribution is projected onto student
    ids, elsewhere the position keeps its hard label. The aligned cache stores the student's
    tokenizer."""
    from logitcache.transform.align import align_cache

    result = align_cache(
        cache,
        out,
        student_tokenizer=student_tokenizer,
        teacher_tokenizer=teacher_tokenizer,
        seq_len=seq_len,
        compression_level=compression_level,
        storage_options=parse_storage_options(storage_options),
        overwrite=overwrite,
    )
    click.echo(result.summary())
