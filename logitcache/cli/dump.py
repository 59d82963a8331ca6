"""The ``logitcache dump`` command: options into a :class:`DumpConfig`, then ``run_dump``.

Each flag is a :class:`DumpConfig` field (name, default, choices: see ``cli/_common.py``); the
help lines are here. Adding a dump option is a DumpConfig field plus one ``_HELP`` entry.
"""

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

__all__ = ["dump"]


_HELP = {
    "teacher": "Teacher: a local Hugging Face model directory, or module.path:factory returning "
    "(model, tokenizer_or_None).",
    "teacher_file": "A GGUF file inside the --teacher directory to load.",
    "tokenizer": "Load the tokenizer from here instead of the teacher.",
    "data": "Input data: file, directory, glob or fsspec URL (.txt, .jsonl, .parquet, .arrow, "
    ".npy, .bin).",
    "out": "Cache directory or fsspec URL to write.",
    "seq_len": "Tokens per row.",
    "pack": "Pack documents with EOS separators, or (--no-pack) one document per row, "
    "right-padded (longer ones continue in the next rows).",
    "add_special_tokens": "Add the tokenizer's special tokens (its BOS) to text: auto follows the "
    "tokenizer's own convention; rows that start mid-document then start with the BOS too.",
    "input_format": "Container format, overriding the file extension.",
    "column": "Column holding text, chat messages or input_ids (default: detected).",
    "method": "Keep the k most likely ids, or --samples draws from the teacher's distribution.",
    "k": "Ids kept per position (topk).",
    "samples": "Draws per position (sampled).",
    "seed": "Sampling seed (sampled; reproducible).",
    "sampling_rule": "How uniforms become sampled ids: tree (default; draws that do not move "
    "with the logits' rounding, e.g. across --tensor-parallel) or inverse-cdf (the rule of "
    "older caches). --resume keeps the cache's own rule.",
    "temperatures": "Also record the log-normaliser at this temperature, for exact losses at it "
    "(repeatable).",
    "values": "How top-k log-probs are stored: sqrt-quantised (~1e-3 nats/position) or floats.",
    "sample_logprobs": "Whether and how sampled ids' log-probs are stored (sampled).",
    "backend": "Shard format: Zarr v3 or Arrow IPC.",
    "batch_size": "Rows per teacher forward.",
    "dtype": "Teacher dtype: auto (bf16 on GPU, fp32 on CPU), bf16, fp16 or fp32.",
    "device": "auto (cuda:$LOCAL_RANK under torchrun, else cuda, else cpu) or a torch device.",
    "shard_bytes": "Raw shard size to cut at.",
    "compression_level": "zstd level of the shards (1-22).",
    "chunk_bytes": "Device memory for the chunked output head: full logits for the whole batch "
    "never exist.",
    "resume": "Continue an interrupted dump into --out.",
    "overwrite": "Replace the cache --out holds (committed or unfinished).",
    "force_overwrite_non_cache": "With --overwrite, also delete what --out holds when it is not "
    "a cache (refused otherwise: it would delete your own files).",
    "break_lock": "Remove the writer lock a dead dump (e.g. on another machine) left in --out.",
    "count_rows": "Count the rows first for an ETA in the progress line (--no-count skips the "
    "pass over the data).",
    "quick_fingerprint": "Fingerprint input files by path, size and mtime instead of hashing "
    "their bytes.",
    "tensor_parallel": "Shard one teacher over this many torchrun processes (its Hugging Face "
    "tensor-parallel plan; the output head by vocabulary). The processes form "
    "nproc/T data-parallel groups; see docs/dump.md.",
    "device_map": "auto: spread one teacher over the visible GPUs, then CPU RAM, then disk "
    "(Accelerate's big-model inference; slow where offloaded, exact).",
    "max_memory": "With --device-map auto: the memory each device may hold, e.g. "
    "'0=20GiB,1=20GiB,cpu=60GiB' (the rest goes to disk).",
}


def _options() -> list[Any]:
    """DumpConfig's fields as flags (see cli/_common.py); a new field is one entry in _HELP."""
    from logitcache.dump import DumpConfig
    from logitcache.format.sampled import _LOGPROB_MODES
    from logitcache.format.topk import _VALUE_MODES

    spelling: dict[str, dict[str, Any]] = {
        "temperatures": {"decls": ("--temperature",)},
        "values": {"type": click.Choice(_VALUE_MODES)},
        "sample_logprobs": {"type": click.Choice(_LOGPROB_MODES)},
        "shard_bytes": {"decls": ("--shard-mb",), "unit": ("MiB", MIB)},
        "chunk_bytes": {"decls": ("--chunk-mb",), "unit": ("MiB", MIB)},
        "count_rows": {"decls": ("--count/--no-count",)},
    }
    return config_options(DumpConfig, _HELP, spelling)


@click.command(cls=ConfigCommand, options=_options)
@storage_option
@friendly_errors
def dump(storage_options: tuple[str, ...], **fields: Any) -> None:
    """Run a teacher once over a dataset and write its sparse soft labels to a cache.

    Under torchrun (torchrun --nproc-per-node N -m logitcache dump ...) each rank takes the rows
    with row_id % N == rank and rank 0 writes the manifest when all are done. With
    --tensor-parallel T the N ranks are N/T groups of T sharing one teacher, and the rows are
    split over the groups.
    """
    from logitcache.dump import DumpConfig, run_dump

    config = DumpConfig(**fields, storage_options=parse_storage_options(storage_options))
    result = run_dump(config)
    if result.rank == 0:
        click.echo(result.summary())
