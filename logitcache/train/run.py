"""``logitcache train``: distil a student from a cache alone, on one device or under torchrun.

A flat, top-to-bottom trainer (it reads better long than split into callbacks):

1. validate the whole configuration at once and report every problem together;
2. open the cache (manifest only), load the student, refuse a student that does not fit it;
3. build the resumable loader (rows split by rank and worker; held-out rows excluded);
4. each optimizer step takes ``grad_accum`` batches per rank. The loss is normalised once per
   step by the number of target positions *across all micro-batches and ranks* (one all-reduce of
   a scalar), so a step's gradient is the mean over every position of the global batch whatever
   the world size, and DDP's own averaging (FSDP's reduce-scatter too) is undone by scaling
   with the world size. The student and its loss are one module (:class:`StepLoss`), wrapped by
   DDP, or sharded with FSDP2 under ``--fsdp`` (``train/fsdp.py``: checkpoints then go through
   ``train/sharded_checkpoint.py`` and the final model is gathered on rank 0);
5. evaluation on held-out rows every ``eval_every`` steps and at the end, logged as JSON lines in
   ``OUT/metrics.jsonl``; checkpoints every ``save_every`` steps and at the end (atomic, rotated);
   the final student is saved to ``OUT/final`` (``from_pretrained`` loads it).

``stop_after`` ends the run early at that step with a checkpoint (a time-limited job), without
changing the schedule, which depends on ``max_steps`` only. Resume (``resume=True``) restores
model, optimizer, scheduler, RNG and loader position from the newest checkpoint, so on CPU a
resumed run reproduces an uninterrupted run's losses bit for bit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import astuple
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from logitcache._distributed import init_process_group, resolve_device
from logitcache.data import make_loader
from logitcache.data.retokenize import retokenizer_for
from logitcache.data.targets import teacher_targets
from logitcache.errors import ConfigError
from logitcache.loss import fused_linear_kd_loss, kd_loss
from logitcache.store import CacheReader
from logitcache.store.reader import LOCAL_CACHE_ENV, LOCAL_CACHE_SIZE_ENV
from logitcache.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from logitcache.train.config import TrainConfig
from logitcache.train.evaluate import StudentOutput, evaluate
from logitcache.train.fsdp import (
    enable_activation_checkpointing,
    export_full_model,
    gathered,
    init_fsdp_group,
    local_state_bytes,
    shard_student,
)
from logitcache.train.output import MetricsLog, check_out_dir, check_previous_run
from logitcache.train.student import (
    CROSS_VOCAB_LOSSES,
    Student,
    check_compatible,
    check_loss_fits,
    decoder_and_head,
    load_student,
    quantisation_note,
    stored_teacher_tokenizer,
    student_output,
    target_logits,
)

__all__ = ["StepLoss", "TrainConfig", "run_train"]


# -- set-up ---------------------------------------------------------------------------------


def _schedule(cfg: TrainConfig) -> Any:
    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        t = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return factor


class StepLoss(nn.Module):
    """The student and its loss as one module: ``forward(batch)`` is the loss *sum* over the
    batch's target positions (float32).

    One module, so that DDP and FSDP wrap the whole computation: DDP syncs every gradient (the
    head's too under the fused loss), and FSDP's root (this module) gathers the embeddings, norm
    and ``lm_head`` in its pre-forward hook, so the fused loss sees the whole head weight while it
    runs and FSDP frees it afterwards (``train/fsdp.py``).
    """

    def __init__(
        self, lm: nn.Module, cfg: TrainConfig, autocast_bf16: bool, vocab_limit: int | None = None
    ) -> None:
        super().__init__()
        self.lm = lm
        self.cfg = cfg
        self.autocast_bf16 = autocast_bf16
        self.vocab_limit = vocab_limit  # a truncated student: teacher ids >= it join the tail

    def forward(self, batch: dict[str, Any]) -> Tensor:
        cfg = self.cfg
        teacher = teacher_targets(batch)
        if self.vocab_limit is not None:
            teacher = teacher.within_vocab(self.vocab_limit)
        labels = batch["target_labels"] if cfg.alpha > 0 else None
        kw: dict[str, Any] = dict(
            loss=cfg.loss, temperature=cfg.temperature, alpha=cfg.alpha, beta=cfg.beta
        )
        device_type = batch["input_ids"].device.type
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.autocast_bf16):
            if cfg.fused:
                base, head = decoder_and_head(self.lm)
                hidden = base(input_ids=batch["input_ids"]).last_hidden_state
                hidden = hidden.flatten(0, 1).index_select(0, batch["target_index"])
                total, _ = fused_linear_kd_loss(
                    hidden, head.weight, teacher, labels, bias=head.bias, **kw
                )
            else:
                total, _ = kd_loss(target_logits(self.lm, batch), teacher, labels, **kw)
        return total.float()


def _batches(loader: Any) -> Iterator[dict[str, Any]]:
    """Endless batches: the loader moves on to the next epoch by itself."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ConfigError("the training split of the cache yields no batches")


# -- the loop --------------------------------------------------------------------------------


def run_train(cfg: TrainConfig) -> dict[str, Any]:
    """Run training; returns the final summary (also written to ``OUT/summary.json``)."""
    problems = cfg.problems()
    if problems:
        raise ConfigError("invalid training config:\n  - " + "\n  - ".join(problems))
    device = resolve_device(cfg.device)
    rank, world = astuple(init_fsdp_group(device) if cfg.fsdp else init_process_group(device))
    out = Path(cfg.out)
    if rank == 0:
        check_out_dir(out)
    check_previous_run(out, cfg.resume)
    if cfg.local_cache:
        # through the environment, so DataLoader workers (any start method) use it too
        os.environ[LOCAL_CACHE_ENV] = cfg.local_cache
        if cfg.local_cache_size:
            os.environ[LOCAL_CACHE_SIZE_ENV] = str(cfg.local_cache_size)
    reader = CacheReader(cfg.cache, storage_options=cfg.storage_options)
    manifest = reader.manifest
    if cfg.expect_digest:
        manifest.check_digest(cfg.expect_digest, where=f"cache {cfg.cache}")
    manifest_digest = _manifest_digest(reader)
    student: Student = load_student(cfg.student, cfg.student_config, cfg.seed)
    if cfg.student_tokenizer:
        from logitcache.transform._tokens import load_tokenizer

        student.tokenizer = load_tokenizer(cfg.student_tokenizer, "--student-tokenizer")
    fit = check_compatible(
        student,
        manifest,
        allow_vocab_mismatch=cfg.allow_vocab_mismatch,
        cache_name=f"cache {cfg.cache}",
        teacher_tokenizer=stored_teacher_tokenizer(student, reader),
        allow_truncated=True,
        loss=cfg.loss,
    )
    if fit.note and rank == 0:
        print(f"note: {fit.note}", file=sys.stderr, flush=True)
    check_loss_fits(manifest, cfg.loss, cfg.alpha, f"cache {cfg.cache}")
    retokenize, pairing = None, None
    if cfg.loss in CROSS_VOCAB_LOSSES:  # another tokenizer: rows re-tokenised in the workers
        ctx = getattr(getattr(student.model, "config", None), "max_position_embeddings", None)
        retokenize = retokenizer_for(
            reader,
            student.tokenizer,
            teacher_tokenizer=cfg.teacher_tokenizer,
            seq_len=cfg.student_seq_len,
            context=ctx if isinstance(ctx, int) else None,
        )
    if retokenize is not None:
        if cfg.eval_fraction or cfg.eval_cache:
            raise ConfigError(
                f"--loss {cfg.loss} on a cache of another tokenizer: the held-out metrics (kl, "
                "top-1 agreement) compare ids, which differ; drop --eval-fraction/--eval-cache "
                "and evaluate the saved student on text (bits per byte)"
            )
        pairing = retokenize.measure(reader)
        if rank == 0:
            print(
                f"note: --loss {cfg.loss} with the student's tokenizer, not the cache's: rows are "
                f"re-tokenised on the fly (first {pairing.positions:,} student positions: "
                f"{pairing.summary()})",
                file=sys.stderr,
                flush=True,
            )
    if cfg.eval_cache:
        check_compatible(
            student,
            CacheReader(cfg.eval_cache, storage_options=cfg.storage_options).manifest,
            allow_vocab_mismatch=cfg.allow_vocab_mismatch,
            cache_name=f"eval cache {cfg.eval_cache}",
            allow_truncated=True,
            loss=cfg.loss,
        )
    torch.manual_seed(cfg.seed)
    model = student.model
    model.train()
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    use_bf16 = device.type == "cuda" if cfg.bf16 is None else cfg.bf16
    autocast_bf16 = use_bf16 and not cfg.fsdp  # FSDP casts parameters itself (mixed precision)
    net: nn.Module = StepLoss(model, cfg, autocast_bf16, fit.limit)
    if cfg.fsdp:  # fully_shard moves only this rank's shards to the device
        shard_student(net, model, device, bf16=use_bf16, cpu_offload=cfg.fsdp_cpu_offload)
    else:
        model.to(device)
        if cfg.compile:
            model.compile()
        if world > 1:
            net = nn.parallel.DistributedDataParallel(
                net, device_ids=[device.index] if device.type == "cuda" else None
            )

    loader_kw: dict[str, Any] = dict(
        seed=cfg.seed,
        num_workers=cfg.num_workers,
        rank=rank,
        world_size=world,
        device=device,
        top_k=cfg.top_k,
        storage_options=cfg.storage_options,
        readahead=cfg.readahead,
        temperature=cfg.temperature if cfg.temperature in manifest.targets.temperatures else None,
        student_vocab=fit.limit,
        transform=retokenize,
    )
    split = ("train", cfg.eval_fraction) if cfg.eval_fraction else None
    loader = make_loader(cfg.cache, cfg.batch_size, order=cfg.order, split=split, **loader_kw)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg))
    fingerprint = cfg.fingerprint(manifest_digest, world)

    step = tokens = 0
    ckpt_root = out / "checkpoints"
    if cfg.resume:
        ckpt = latest_checkpoint(ckpt_root)
        if ckpt is None:
            raise ConfigError(f"--resume: no checkpoint under {ckpt_root}; drop --resume to start")
        if cfg.fsdp:
            from logitcache.train.sharded_checkpoint import load_sharded_checkpoint

            state = load_sharded_checkpoint(ckpt, model, optimizer, scheduler, fingerprint)
        else:
            state = load_checkpoint(ckpt, model, optimizer, scheduler, fingerprint)
        step = int(state["step"])
        tokens = int(state.get("tokens", 0))
        loader.load_state_dict(state["loader"])

    def eval_targets(batch: dict[str, Any]) -> Any:
        teacher = teacher_targets(batch)
        return teacher if fit.limit is None else teacher.within_vocab(fit.limit)

    def eval_output(batch: dict[str, Any]) -> StudentOutput:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
            return student_output(model, batch)

    def run_eval() -> dict[str, float] | None:
        if not (cfg.eval_fraction or cfg.eval_cache):
            return None
        url = cfg.eval_cache or cfg.cache
        eval_split = ("eval", cfg.eval_fraction) if cfg.eval_fraction else None
        ev = make_loader(url, cfg.batch_size, order="sequential", split=eval_split, **loader_kw)
        model.eval()
        try:
            with gathered(net):  # FSDP: the root's embeddings and head, whole, until the end
                return evaluate(ev, eval_output, eval_targets, device, cfg.eval_batches)
        finally:
            model.train()
            ev.close()

    log = MetricsLog(out, rank == 0, cfg.progress)
    if cfg.resume:
        log.rewind(step)  # lines past the checkpoint are recomputed: no duplicates
    batches = _batches(loader)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0, start_tokens = time.perf_counter(), tokens
    losses: list[float] = []
    state_bytes: int | None = None
    start_step = step
    last = cfg.max_steps if cfg.stop_after is None else min(cfg.max_steps, cfg.stop_after)
    while step < last:
        micro = [next(batches) for _ in range(cfg.grad_accum)]
        count = torch.tensor(float(sum(b["target_index"].numel() for b in micro)), device=device)
        if world > 1:
            dist.all_reduce(count)
        scale = world / count.clamp(min=1.0)
        step_loss = torch.zeros((), device=device)
        for i, batch in enumerate(micro):
            sync = i == len(micro) - 1 or world == 1
            skip_sync = isinstance(net, nn.parallel.DistributedDataParallel) and not sync
            with net.no_sync() if skip_sync else contextlib.nullcontext():  # type: ignore[operator]
                total = net(batch)
                (total * scale).backward()
            step_loss += total.detach()
            tokens += batch["input_ids"].numel() * world
        if cfg.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        optimizer.step()
        scheduler.step()
        if state_bytes is None:  # once: parameters, gradients, optimizer state (local shards)
            state_bytes = local_state_bytes(model.parameters(), optimizer)
        optimizer.zero_grad(set_to_none=True)
        if world > 1:
            dist.all_reduce(step_loss)
        loss_value = float(step_loss / count.clamp(min=1.0))
        losses.append(loss_value)
        step += 1
        elapsed = time.perf_counter() - t0
        rate = (step - start_step) / elapsed if elapsed else 0.0
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            log.record(
                {
                    "step": step,
                    "loss": loss_value,
                    "lr": scheduler.get_last_lr()[0],
                    "tokens": tokens,
                    "steps_per_s": rate,
                }
            )
        log.progress(step, cfg.max_steps, loss_value, rate)
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
            metrics = run_eval()
            if metrics is not None:
                log.record({"step": step, "eval": metrics})
        if (cfg.save_every and step % cfg.save_every == 0) or step == last:
            saved = {"fingerprint": fingerprint, "loader": loader.state_dict(), "tokens": tokens}
            if cfg.fsdp:
                from logitcache.train.sharded_checkpoint import save_sharded_checkpoint

                save_sharded_checkpoint(
                    ckpt_root, step, model, optimizer, scheduler, saved, cfg.keep
                )
            elif rank == 0:
                save_checkpoint(ckpt_root, step, model, optimizer, scheduler, saved, cfg.keep)
            if world > 1 and not cfg.fsdp:
                dist.barrier()
    elapsed = time.perf_counter() - t0  # training only: the final evaluation is not a step
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    loader.close()
    final_metrics = run_eval()
    summary = {
        "steps": step,
        "steps_run": step - start_step,
        "final_loss": losses[-1] if losses else None,
        "losses": losses,
        "steps_per_s": (step - start_step) / elapsed if elapsed else None,
        "tokens_per_s": (tokens - start_tokens) / elapsed if elapsed else None,
        "eval": final_metrics,
        "world_size": world,
        "fsdp": cfg.fsdp,
        "state_bytes_per_rank": state_bytes,
        "peak_device_bytes": peak,
    }
    if pairing is not None:
        summary["pairing"] = pairing.to_dict()
    if fit.note:
        summary["notes"] = [fit.note]
    note = quantisation_note(manifest, losses[-1] if losses else None)
    if note is not None:
        summary["warnings"] = [note]
        if rank == 0:
            warnings.warn(note, stacklevel=2)
    final = out / "final"
    if cfg.fsdp:  # collective: the full state dict is gathered on rank 0's CPU
        export_full_model(model, final, rank, student.tokenizer)
    elif rank == 0:
        model.save_pretrained(final, safe_serialization=True)  # type: ignore[operator]
        if student.tokenizer is not None:
            student.tokenizer.save_pretrained(final)
    if rank == 0:
        if final_metrics is not None:
            log.record({"step": step, "eval": final_metrics, "final": True})
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        log.table(summary)
    return summary


def _manifest_digest(reader: CacheReader) -> str:
    return hashlib.sha256(reader.loc.read_bytes("manifest.json")).hexdigest()
