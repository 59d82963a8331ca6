"""The dump pipeline: run a teacher once over a dataset and commit its sparse targets as a cache.

::

    rows (inputs.iter_rows, this rank's slice) -> batches -> sparsify on the device
      -> bounded queue -> writer thread (encode, zstd, checksums, shards) -> commit / finalize

Order of work, and why: everything that can fail cheaply fails before anything slow. The output
is checked first (a committed cache needs ``overwrite``; a half-written one ``resume`` or
``overwrite``), then the data (exists, column known; its fingerprint reads every byte), then the
teacher is loaded and checked against the options (``seq_len`` within its context, ``k`` within
its vocabulary), the tokenizer against the data (text needs one, chat needs a template) and the
first row is produced (data empty after tokenisation). Only then does the device work start.

**What identifies a cache** (the header the writer fingerprints, so ``--resume`` refuses a changed
configuration and names the field): teacher name/revision/weights sha256, tokenizer fingerprint,
dataset fingerprint (input bytes + row recipe: seq_len, packing, format, column), seq_len, both
vocab sizes, targets (method, k or samples, temperatures), codec (value mode, levels), backend,
compression level, and ``extra.dump``: seed and ``sampling_rule`` (sampled; the rule is
recorded when it is ``tree``, the default; a cache without it drew by ``inverse-cdf``, and a
``--resume`` without ``--sampling-rule`` keeps the interrupted dump's rule), dtype and world size
(the number of writers). Batch size, device and chunk size are not part of it: a resume may
change them (after an out-of-memory, say). Nor is ``extra.dump.run`` (tensor-parallel degree,
data-parallel groups, processes, the teacher's parameter bytes on a rank): how the dump ran,
recorded for information.

**Tensor parallel** (``--tensor-parallel T`` under torchrun, :class:`ParallelLayout`): ``W`` ranks
are ``W/T`` data-parallel groups of ``T``; a group loads one teacher sharded by its TP plan
(:mod:`logitcache.dump.teacher`) and sparsifies without full logits
(:mod:`logitcache.dump.tp_sparsify`). Rows, parts, ``world_size`` in the header and the resume
point are those of the data-parallel index: a ``T=2`` dump on 2 processes writes the same cache
as one process (one writer, no parts), and may be resumed with another ``T``. Only the group's
tensor-parallel rank 0 opens a writer; it tells the others where a resume starts.

**Resume.** Each writer (one per rank) knows how many rows its committed shards hold. The dump
restarts at the start of the batch that row falls in and drops the already-written rows after
the forward, so every batch is the one an uninterrupted run computed: for a deterministic teacher
(same batch size) the shards are byte-identical, because shard cuts depend only on the rows.
When every row is already committed (killed between the last shard and the manifest), the last,
short batch is skipped without a forward and the resume only commits.

**Memory.** Host: one batch being computed, at most ``queue_depth`` waiting, one shard being
buffered (``shard_bytes``); nothing grows with the dataset. Device: the teacher, its activations
for one batch, and the chunked head (``chunk_bytes``; see :mod:`logitcache.dump.teacher`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Literal

from logitcache._distributed import (
    ParallelLayout,
    RankGroup,
    RankInfo,
    rank_info,
    resolve_device,
)
from logitcache.dump.inputs import (
    InputOptions,
    Row,
    dataset_fingerprint,
    iter_batches,
    iter_rows,
    special_tokens,
    tokenizer_fingerprint,
)
from logitcache.dump.pipeline import (
    BackgroundWriter,
    Progress,
    drop_leading_rows,
    part_name,
    rank_part,
    read_ahead,
)
from logitcache.dump.sparsify import SAMPLING_RULES, SamplingRule, SparsifyConfig, sparsify_batch
from logitcache.dump.teacher import Teacher, load_teacher
from logitcache.dump.tp_sparsify import sparsify_batch_tp
from logitcache.errors import ConfigError, WriterError
from logitcache.format import SampledCodec, TopKCodec
from logitcache.format.codec import TargetCodec
from logitcache.format.manifest import Backend, Manifest, SourceInfo, TargetsInfo
from logitcache.store import CacheHeader, CacheWriter, check_output, finalize_cache
from logitcache.store._fs import open_location
from logitcache.store.header import DEFAULT_COMPRESSION_LEVEL, DEFAULT_SHARD_BYTES, PROGRESS_DIR
from logitcache.store.tokenizer import tokenizer_files

__all__ = ["DumpConfig", "DumpResult", "finalize_dump", "run_dump"]

_DUMP_RECIPE = 1  # bump when the dump changes what it stores for the same options


@dataclass(frozen=True)
class DumpConfig:
    """Everything ``logitcache dump`` takes; see ``docs/dump.md`` for each option.

    ``teacher``: a Hugging Face model directory or ``module.path:factory``. ``data``: a path,
    directory, glob or fsspec URL. ``out``: the cache directory or URL.
    """

    teacher: str
    data: str
    out: str
    seq_len: int
    teacher_file: str | None = None
    tokenizer: str | None = None
    input_format: str | None = None
    column: str | None = None
    pack: bool = True
    add_special_tokens: Literal["auto", "yes", "no"] = "auto"
    method: Literal["topk", "sampled"] = "topk"
    k: int = 64
    samples: int = 64
    seed: int = 0
    sampling_rule: SamplingRule | None = None  # None: tree, or on --resume the cache's own
    temperatures: tuple[float, ...] = ()
    values: str = "sqrt"
    sample_logprobs: str = "uint8"
    backend: Backend = "zarr"
    batch_size: int = 8
    dtype: str = "auto"
    device: str = "auto"
    shard_bytes: int = DEFAULT_SHARD_BYTES
    compression_level: int = DEFAULT_COMPRESSION_LEVEL
    chunk_bytes: int = 1 << 30
    resume: bool = False
    overwrite: bool = False
    force_overwrite_non_cache: bool = False
    break_lock: bool = False
    storage_options: Mapping[str, Any] | None = None
    queue_depth: int = 4
    count_rows: bool = True
    quick_fingerprint: bool = False
    tensor_parallel: int = 1
    device_map: Literal["auto"] | None = None
    max_memory: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite exclude each other; pick one")
        if self.method == "sample":  # the spelling before 0.2 (the manifest always said sampled)
            warnings.warn(
                "method 'sample' is now spelled 'sampled' (as in the manifest)",
                DeprecationWarning,
                stacklevel=3,
            )
            object.__setattr__(self, "method", "sampled")
        if self.method not in ("topk", "sampled"):
            raise ConfigError(f"method must be 'topk' or 'sampled', got {self.method!r}")
        if self.sampling_rule is not None and self.sampling_rule not in SAMPLING_RULES:
            raise ConfigError(
                f"sampling_rule must be one of {SAMPLING_RULES}, got {self.sampling_rule!r}"
            )
        sizes = ("batch_size", "queue_depth", "k", "samples", "chunk_bytes", "shard_bytes")
        for name in (*sizes, "tensor_parallel"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.device_map is not None and self.tensor_parallel > 1:
            raise ConfigError(
                "--device-map and --tensor-parallel exclude each other: a device map spreads one "
                "process over several GPUs, tensor parallel one teacher over several processes"
            )
        parse_max_memory(self.max_memory)  # refuse a malformed one before any work
        if self.backend not in ("zarr", "arrow"):
            raise ConfigError(f"backend must be 'zarr' or 'arrow', got {self.backend!r}")

    def sparsify_config(self) -> SparsifyConfig:
        return SparsifyConfig(
            method=self.method,
            k=self.k,
            samples=self.samples,
            seed=self.seed,
            sampling_rule=self.sampling_rule or "tree",
            temperatures=tuple(float(t) for t in self.temperatures),
            sample_logprobs=self.sample_logprobs != "none",
            chunk_bytes=self.chunk_bytes,
        )

    def input_options(self) -> InputOptions:
        return InputOptions(
            seq_len=self.seq_len,
            input_format=self.input_format,
            column=self.column,
            pack=self.pack,
            add_special_tokens=self.add_special_tokens,
        )


@dataclass(frozen=True)
class DumpResult:
    """What one process of a dump did. ``manifest`` is the committed cache's manifest (None on
    ranks other than 0 of a multi-rank dump, or when the ranks could not meet to finalize)."""

    manifest: Manifest | None
    rank: int
    world_size: int
    rows: int  # rows this process computed in this run (resumed rows excluded)
    resumed_rows: int
    tokens: int  # rows x seq_len fed through the teacher
    seconds: float
    writer_busy_seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def summary(self) -> str:
        """A few human lines: what was written and how fast."""
        lines = [
            f"rank {self.rank}/{self.world_size}: {self.rows:,} rows, {self.tokens:,} tokens in "
            f"{self.seconds:.1f} s ({self.tokens_per_s:,.0f} tokens/s)"
            + (f"; {self.resumed_rows:,} rows resumed" if self.resumed_rows else "")
        ]
        m = self.manifest
        if m is not None:
            pos = max(m.num_positions, 1)
            mass = m.coverage.captured_mass
            nll = m.coverage.teacher_nll
            lines.append(
                f"cache: {m.num_rows:,} rows, {m.num_positions:,} target positions, "
                f"{m.num_bytes:,} bytes in {len(m.shards)} shards ({m.num_bytes / pos:.1f} "
                f"bytes/position)"
                + (f", mean captured mass {mass:.3f}" if mass is not None else "")
                + (
                    f", teacher NLL {nll:.3f} nats (perplexity {math.exp(min(nll, 700.0)):.1f})"
                    if nll is not None
                    else ""
                )
            )
        elif self.world_size > 1 and self.rank == 0:
            lines.append("parts written; join them with: logitcache finalize CACHE --world-size N")
        return "\n".join(lines)


def run_dump(config: DumpConfig) -> DumpResult:
    """Run the teacher over the data and write the cache (this rank's share under torchrun)."""
    info = rank_info()
    layout = ParallelLayout(info.rank, info.world_size, config.tensor_parallel)
    writers = layout.writer  # the rows' split: data-parallel index of data-parallel size
    if layout.writes:
        check_output(
            config.out,
            overwrite=config.overwrite,
            resume=config.resume,
            part=rank_part(writers),
            storage_options=config.storage_options,
            break_lock=config.break_lock,
            force_overwrite_non_cache=config.force_overwrite_non_cache,
        )
    options = config.input_options()
    data_fp = dataset_fingerprint(config.data, options, quick=config.quick_fingerprint)
    device = resolve_device(config.device)
    # under torchrun: a rendezvous, so every rank passed the checks above
    group = RankGroup(info, layout, device)
    try:
        config = _with_sampling_rule(config, writers, layout, group)
        if writers.world_size > 1 and config.overwrite and not group.active:
            raise ConfigError(
                "--overwrite with several ranks needs torchrun (rank 0 clears the output while "
                "the others wait); clear the output yourself, or launch with torchrun"
            )
        teacher = load_teacher(
            config.teacher,
            teacher_file=config.teacher_file,
            tokenizer=config.tokenizer,
            dtype=config.dtype,
            device=config.device,
            group=group,
            device_map=config.device_map,
            max_memory=parse_max_memory(config.max_memory),
        )
        _check_teacher(config, teacher)
        rows = _rank_rows(config, teacher, options, writers)
        total = _count_rows(config, teacher, options, writers) if config.count_rows else None
        header = _header(config, teacher, data_fp, writers, layout)
        if writers.world_size > 1 and config.overwrite:
            if info.rank == 0:
                check_output(
                    config.out,
                    overwrite=True,
                    clear=True,
                    storage_options=config.storage_options,
                    force_overwrite_non_cache=config.force_overwrite_non_cache,
                )
            group.barrier()  # nobody writes before rank 0 has cleared the old cache
        result = _run(config, teacher, header, rows, total, layout, group)
        manifest = result.manifest if writers.world_size == 1 else None
        if info.world_size > 1:
            group.barrier()
            if info.rank == 0 and group.active and writers.world_size > 1:
                manifest = finalize_dump(config.out, writers.world_size, config.storage_options)
        return DumpResult(
            manifest=manifest,
            rank=info.rank,
            world_size=info.world_size,
            rows=result.rows,
            resumed_rows=result.resumed_rows,
            tokens=result.rows * config.seq_len,
            seconds=result.seconds,
            writer_busy_seconds=result.writer_busy_seconds,
        )
    finally:
        group.close()


@dataclass(frozen=True)
class _RunResult:
    manifest: Manifest | None  # None on the ranks that do not write
    rows: int
    resumed_rows: int
    seconds: float
    writer_busy_seconds: float


def _run(
    config: DumpConfig,
    teacher: Teacher,
    header: CacheHeader,
    rows: Iterator[Row],
    total: int | None,
    layout: ParallelLayout,
    group: RankGroup,
) -> _RunResult:
    """The loop: forward + sparsify here, encode + write in the background thread."""
    writers = layout.writer
    writer = None
    if layout.writes:
        writer = CacheWriter(
            config.out,
            header,
            shard_bytes=config.shard_bytes,
            overwrite=config.overwrite and writers.world_size == 1,
            force_overwrite_non_cache=config.force_overwrite_non_cache,
            resume=config.resume,
            part=rank_part(writers),
            storage_options=config.storage_options,
            break_lock=config.break_lock,
            # format 1.3: the cache carries its tokenizer (tokenizer/, listed in the manifest)
            tokenizer_files=tokenizer_files(teacher.tokenizer),
        )
    sparsify = config.sparsify_config()
    sparsify_fn = sparsify_batch if teacher.sharded_head is None else sparsify_batch_tp
    with writer if writer is not None else nullcontext():
        # the group's writer knows the resume point; its tensor-parallel peers start there too
        done = group.broadcast_from_writer(writer.resumed_rows if writer is not None else 0)
        aligned = done - done % config.batch_size
        drop = done - aligned
        # done, not aligned: the redone rows of the first batch are dropped, never counted
        progress = Progress(
            total, config.seq_len, done=done, enabled=config.progress and layout.rank == 0
        )
        background = BackgroundWriter(writer, config.queue_depth) if writer is not None else None
        computed = 0
        start = time.perf_counter()
        source = iter_batches(itertools.islice(rows, aligned, None), config.batch_size)
        # on an accelerator the host is idle during the forward: tokenise the next batches then;
        # on a CPU teacher a reader thread would only compete with the forward for the cores
        batches = read_ahead(source) if teacher.device.type != "cpu" else (b for b in source)
        try:
            for batch in batches:
                if drop and drop == len(batch.row_ids):
                    # the stream's last, short batch is already in the committed shards: the
                    # run was killed between its last shard and the manifest; nothing to compute
                    drop = 0
                    continue
                sparse = sparsify_fn(
                    teacher, batch.input_ids, batch.loss_mask, batch.row_ids, sparsify
                )
                batch, sparse = drop_leading_rows(batch, sparse, drop)
                drop = 0
                if background is not None:
                    background.put(batch, sparse)
                computed += len(batch.row_ids)
                progress.update(len(batch.row_ids))
            if drop:
                raise WriterError(
                    f"cannot resume {config.out}: its committed shards hold {done} rows of this "
                    f"rank but the input gives fewer; the input data changed "
                    "since the interrupted run (rerun with the original data, or --overwrite)"
                )
            if background is not None:
                background.close()
        except BaseException:
            if background is not None:
                background.abandon()
            raise
        finally:
            batches.close()  # stops the reader thread, also when the loop failed
            progress.close()
        manifest = writer.commit() if writer is not None else None
    seconds = time.perf_counter() - start
    busy = background.busy_seconds if background is not None else 0.0
    return _RunResult(manifest, computed, done, seconds, busy)


def _check_teacher(config: DumpConfig, teacher: Teacher) -> None:
    """Options that the teacher makes impossible, before any forward pass."""
    if teacher.max_seq_len is not None and config.seq_len > teacher.max_seq_len:
        raise ConfigError(
            f"--seq-len {config.seq_len} exceeds the teacher's context of {teacher.max_seq_len} "
            "tokens (max_position_embeddings); use a shorter --seq-len"
        )
    if config.method == "topk" and config.k > teacher.real_vocab_size:
        raise ConfigError(
            f"--k {config.k} exceeds the teacher's vocabulary of {teacher.real_vocab_size} ids; "
            f"use --k <= {teacher.real_vocab_size}"
        )


def _rank_rows(
    config: DumpConfig, teacher: Teacher, options: InputOptions, info: RankInfo
) -> Iterator[Row]:
    """This rank's rows (``row_id % world_size == rank``), after checking the stream starts."""
    rows = iter_rows(config.data, teacher.tokenizer, options)
    first = next(rows)  # raises "empty after tokenisation" now, not after the first batch
    stream = itertools.chain([first], rows)
    if info.world_size == 1:
        return stream
    return (r for r in stream if r.row_id % info.world_size == info.rank)


def _count_rows(config: DumpConfig, teacher: Teacher, options: InputOptions, info: RankInfo) -> int:
    """Rows of this rank, for the ETA: a tokenisation pass without the teacher."""
    rows = iter_rows(config.data, teacher.tokenizer, options)
    return sum(1 for r in rows if r.row_id % info.world_size == info.rank)


def _codec(config: DumpConfig, vocab: int) -> tuple[TargetCodec, TargetsInfo]:
    temps = tuple(float(t) for t in config.temperatures)
    if config.method == "topk":
        codec: TargetCodec = TopKCodec(
            k=config.k, vocab_size=vocab, num_temperatures=len(temps), values=config.values
        )
        return codec, TargetsInfo("topk", k=config.k, tail="bucket", temperatures=temps)
    codec = SampledCodec(
        samples=config.samples,
        vocab_size=vocab,
        num_temperatures=len(temps),
        logprobs=config.sample_logprobs,
    )
    return codec, TargetsInfo("sampled", samples=config.samples, tail="none", temperatures=temps)


def _header(
    config: DumpConfig, teacher: Teacher, data_fp: str, info: RankInfo, layout: ParallelLayout
) -> CacheHeader:
    """The cache's header; ``info`` is the writers' split (data-parallel index and size)."""
    codec, targets = _codec(config, teacher.real_vocab_size)
    ident = teacher.identity
    tok = teacher.tokenizer
    dtype = next(teacher.model.parameters()).dtype
    options: dict[str, Any] = {
        "recipe": _DUMP_RECIPE,
        "dtype": str(dtype).removeprefix("torch."),
        "world_size": info.world_size,
        "rank_split": "row_id % world_size",
        "teacher_source": ident.source,
        "teacher_file": config.teacher_file,
        "input": config.input_options().to_dict(),
        # what add_special_tokens resolved to with this tokenizer (auto follows its convention)
        "special_tokens": dict(
            zip(("added", "bos_id"), special_tokens(tok, config.add_special_tokens), strict=True)
        ),
    }
    if config.method == "sampled":
        options["seed"] = config.seed
        if config.sampling_rule != "inverse-cdf":  # absent: inverse-cdf (caches before the tree)
            options["sampling_rule"] = config.sampling_rule or "tree"
    options["run"] = {  # information only: not part of the cache's identity (store/header.py)
        "tensor_parallel": layout.tensor_parallel,
        "data_parallel": layout.data_parallel,
        "processes": layout.world_size,
        "device_map": config.device_map,
        "teacher_parameter_bytes_per_rank": teacher.parameter_bytes(),
    }
    return CacheHeader(
        codec=codec,
        targets=targets,
        seq_len=config.seq_len,
        vocab_size=teacher.real_vocab_size,
        padded_vocab_size=teacher.padded_vocab_size,
        backend=config.backend,
        compression_level=config.compression_level,
        teacher=SourceInfo(ident.name, ident.revision, ident.weights_sha256),
        tokenizer=SourceInfo(
            _base_name(config.tokenizer) if config.tokenizer else ident.name,
            None,
            tokenizer_fingerprint(tok) if tok is not None else None,
        ),
        dataset=SourceInfo(_base_name(config.data), None, data_fp),
        extra={"dump": options},
    )


def _with_sampling_rule(
    config: DumpConfig, writers: RankInfo, layout: ParallelLayout, group: RankGroup
) -> DumpConfig:
    """``config`` with its sampling rule settled: the one asked for; on ``--resume`` the rule
    the interrupted dump recorded in its progress (none recorded: ``inverse-cdf``, the rule
    before ``tree``), so an old cache keeps drawing as it did; else ``tree``."""
    if config.method != "sampled" or config.sampling_rule is not None:
        return config
    rule: SamplingRule = "tree"
    if config.resume and layout.writes:
        loc = open_location(config.out, config.storage_options)
        parts = [part_name(r) for r in range(writers.world_size)] if writers.world_size > 1 else []
        for name in parts or ["main"]:
            if loc.exists(f"{PROGRESS_DIR}/{name}.json"):
                try:
                    record = json.loads(loc.read_bytes(f"{PROGRESS_DIR}/{name}.json"))
                    dump = (record.get("header", {}).get("extra") or {}).get("dump") or {}
                    rule = dump.get("sampling_rule", "inverse-cdf")
                except (ValueError, AttributeError):
                    pass  # unreadable: the writer refuses it, naming the record
                break
    # the writer read it (a rule it does not know: the writer's header check names it); its
    # tensor-parallel peers draw the same way
    code = group.broadcast_from_writer(SAMPLING_RULES.index(rule) if rule in SAMPLING_RULES else 0)
    return dataclasses.replace(config, sampling_rule=SAMPLING_RULES[code])


def parse_max_memory(text: str | None) -> dict[int | str, int | str] | None:
    """``"0=20GiB,cpu=60GiB"`` -> ``{0: "20GiB", "cpu": "60GiB"}`` (a bare number: bytes)."""
    if not text:
        return None
    out: dict[int | str, int | str] = {}
    for item in text.split(","):
        key, sep, amount = item.strip().partition("=")
        key = key.strip()
        if not sep or not amount.strip() or not (key.isdigit() or key in ("cpu", "disk")):
            raise ConfigError(
                f"--max-memory wants DEVICE=AMOUNT pairs like '0=20GiB,cpu=60GiB' (DEVICE a GPU "
                f"index, cpu or disk), got {item.strip()!r} in {text!r}"
            )
        size = amount.strip()
        out[int(key) if key.isdigit() else key] = int(size) if size.isdigit() else size  # bytes
    return out


def _base_name(path: str) -> str:
    """The last path component: moving a dataset or teacher does not change a cache's identity."""
    return os.path.basename(path.rstrip("/")) or path


def finalize_dump(
    out: str, world_size: int, storage_options: Mapping[str, Any] | None = None
) -> Manifest:
    """Join the parts of a ``world_size``-rank dump (rank order) into the cache's manifest."""
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    return finalize_cache(out, [part_name(r) for r in range(world_size)], storage_options)
