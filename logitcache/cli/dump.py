"""The ``logitcache dump`` command: options into a :class:`DumpConfig`, then ``run_dump``."""

from __future__ import annotations

from typing import Any

import click

from logitcache.cli._common import friendly_errors, parse_storage_options, storage_option

__all__ = ["dump"]


@click.command()
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
@friendly_errors
def dump(**opts: Any) -> None:
    """Run a teacher once over a dataset and write its sparse soft labels to a cache.

    Under torchrun (torchrun --nproc-per-node N -m logitcache dump ...) each rank takes the rows
    with row_id % N == rank and rank 0 writes the manifest when all are done.
    """
    from logitcache.dump import DumpConfig, run_dump

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
