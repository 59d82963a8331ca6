"""``logitcache train --fsdp``: FSDP2 ranks (and DDP ranks) compute what one process computes on
the same rows, sharded (DCP) checkpoints resume on another world size and survive a SIGKILL
mid-save, the export loads with ``from_pretrained``, the gathered head weight is freed after the
step, and the refusals.

The cache holds 8 rows in 8 one-row shards, and a global batch is 8 rows: every step reads the
whole epoch at any world size (the loader deals whole shards to ranks, so with bigger caches the
global batches of 1 and 2 ranks hold different rows). Loss masks differ per row, so the ranks'
target counts differ and the global normalisation is exercised.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from logitcache.data import make_loader
from logitcache.errors import ConfigError
from logitcache.format import SourceInfo, TargetsInfo, TopKCodec, TopKTargets
from logitcache.store import CacheHeader, CacheWriter
from logitcache.train import TrainConfig, run_train
from logitcache.train.fsdp import shard_student
from logitcache.train.run import StepLoss
from logitcache.train.sharded_checkpoint import KILL_IN_SAVE_ENV

VOCAB, SEQ, K, ROWS = 128, 16, 8, 8


def llama(seed: int, hidden: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def write_cache(url: Path, rows: int, seed: int) -> None:
    """``rows`` rows of a peaked tiny teacher, one row per shard, 3..15 target positions a row."""
    teacher = llama(123, hidden=48)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(8.0)
    rng = np.random.default_rng(seed)
    hdr = CacheHeader(
        codec=TopKCodec(k=K, vocab_size=VOCAB),
        targets=TargetsInfo(method="topk", k=K),
        seq_len=SEQ,
        vocab_size=VOCAB,
        padded_vocab_size=VOCAB,
        teacher=SourceInfo(name="tiny-teacher"),
    )
    ids = rng.integers(0, VOCAB, (rows, SEQ))
    mask = np.arange(SEQ)[None, :] < rng.integers(3, SEQ, rows)[:, None]
    with torch.no_grad():
        lp = torch.log_softmax(teacher(torch.as_tensor(ids)).logits.double(), -1)
    lp = lp[torch.as_tensor(mask)]
    top, idx = lp.topk(K, dim=-1)
    rest = lp.scatter(1, idx, float("-inf")).logsumexp(-1)
    no_temps = np.zeros((len(top), 0), np.float32)
    targets = TopKTargets(idx.int().numpy(), top.float().numpy(), rest.float().numpy(), no_temps)
    with CacheWriter(str(url), hdr, shard_bytes=1) as w:  # one row per shard
        w.write(np.arange(rows), ids, mask, targets)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    url = tmp_path_factory.mktemp("fsdp") / "cache"
    write_cache(url, ROWS, seed=0)
    return url


@pytest.fixture(scope="module")
def eval_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """9 rows: at 2 ranks of batch 4, rank 0 reads 5 rows (2 batches) and rank 1 reads 4 and then
    a whole padding batch, whose forward FSDP still needs (it is collective)."""
    url = tmp_path_factory.mktemp("fsdp") / "eval"
    write_cache(url, 9, seed=1)
    return url


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("student") / "s"
    llama(7).save_pretrained(d)
    return d


def cfg(cache: Path, out: Path, student: Path, **kw: object) -> TrainConfig:
    base: dict[str, object] = dict(
        cache=str(cache),
        out=str(out),
        student=str(student),
        batch_size=ROWS,
        max_steps=10,
        lr=1e-2,
        progress=False,
        log_every=1,
        order="random",
    )
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def torchrun(
    nproc: int, cache: Path, student: Path, out: Path, *flags: str, fsdp: bool = True, **env: str
) -> Any:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--standalone", "-m", "logitcache", "train", "--fsdp" if fsdp else "--no-fsdp",
        "--cache", str(cache),
        "--student", str(student), "--out", str(out), "--batch-size", str(ROWS // nproc),
        "--max-steps", "10", "--lr", "0.01", "--order", "random", "--log-every", "1",
        "--no-progress", *flags,
    ]  # fmt: skip
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(cmd, capture_output=True, text=True, env=run_env, timeout=300)


def logged(out: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def logged_losses(out: Path) -> list[float]:
    return [x["loss"] for x in logged(out) if "loss" in x]


def logged_eval(out: Path, step: int) -> dict[str, float]:
    (found,) = [x["eval"] for x in logged(out) if "eval" in x and x["step"] == step]
    return dict(found)


@pytest.mark.dist
def test_two_ranks_equal_one_process_kill_mid_save_resume_on_one(
    cache: Path, eval_cache: Path, student_dir: Path, tmp_path: Path
) -> None:
    evals = dict(eval_cache=str(eval_cache), eval_every=5)
    one = run_train(cfg(cache, tmp_path / "one", student_dir, **evals))
    out = tmp_path / "two"
    flags = ("--save-every", "5", "--eval-cache", str(eval_cache), "--eval-every", "5")
    # 2 ranks, checkpoints at 5 and 10; rank 0 is SIGKILLed inside the save of step 10, after
    # the shard files are written
    r = torchrun(2, cache, student_dir, out, *flags, **{KILL_IN_SAVE_ENV: "10"})
    assert r.returncode != 0, r.stderr[-2000:]
    assert logged_losses(out) == pytest.approx(one["losses"], rel=1e-5, abs=0)
    assert logged_eval(out, 5) == pytest.approx(logged_eval(tmp_path / "one", 5), rel=1e-5)
    ckpts = out / "checkpoints"
    assert (ckpts / ".tmp-step-00000010" / "dcp" / ".metadata").is_file()  # half-written
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-00000005"]

    r = torchrun(1, cache, student_dir, out, *flags, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = json.loads((out / "summary.json").read_text())
    assert resumed["world_size"] == 1 and resumed["steps_run"] == 5  # from step 5, not 10
    assert resumed["losses"] == pytest.approx(one["losses"][5:], rel=1e-5, abs=0)
    assert resumed["eval"] == pytest.approx(one["eval"], rel=1e-5)
    assert not (ckpts / ".tmp-step-00000010").exists()  # replaced by the complete one
    exported = AutoModelForCausalLM.from_pretrained(out / "final")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "final")
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = exported(ids).logits, reference(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.dist
def test_ddp_two_ranks_equal_one_process(cache: Path, student_dir: Path, tmp_path: Path) -> None:
    """The rule FSDP keeps is DDP's: on the same rows, 2 ranks make one process's steps."""
    one = run_train(cfg(cache, tmp_path / "one", student_dir, max_steps=5))
    out = tmp_path / "ddp"
    r = torchrun(2, cache, student_dir, out, "--max-steps", "5", fsdp=False)
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.loads((out / "summary.json").read_text())
    assert two["world_size"] == 2 and not two["fsdp"]
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5, abs=0)


@pytest.mark.dist
def test_fused_one_rank_resumes_on_two(cache: Path, student_dir: Path, tmp_path: Path) -> None:
    one = run_train(cfg(cache, tmp_path / "one", student_dir, fused=True))
    out = tmp_path / "fsdp"
    r = torchrun(1, cache, student_dir, out, "--fused", "--stop-after", "5")
    assert r.returncode == 0, r.stderr[-3000:]
    assert logged_losses(out) == pytest.approx(one["losses"][:5], rel=1e-5, abs=0)
    r = torchrun(2, cache, student_dir, out, "--fused", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.loads((out / "summary.json").read_text())
    assert two["world_size"] == 2 and two["steps_run"] == 5
    assert two["losses"] == pytest.approx(one["losses"][5:], rel=1e-5, abs=0)
    # parameters + gradients + AdamW state held per rank: about half of one process's
    assert two["state_bytes_per_rank"] / one["state_bytes_per_rank"] <= 0.55


@pytest.fixture
def process_group(tmp_path: Path) -> Iterator[None]:
    """A one-process gloo group in this process (what torchrun --nproc-per-node 1 gives)."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.usefixtures("process_group")
def test_one_process_fsdp_equals_plain_with_checkpointing_offload_and_eval(
    cache: Path, student_dir: Path, tmp_path: Path
) -> None:
    kw = dict(fused=True, max_steps=4, eval_cache=str(cache), eval_every=2)
    plain = run_train(cfg(cache, tmp_path / "plain", student_dir, **kw))
    fsdp = run_train(
        cfg(
            cache,
            tmp_path / "fsdp",
            student_dir,
            fsdp=True,
            fsdp_cpu_offload=True,
            activation_checkpointing=True,
            **kw,
        )
    )
    assert fsdp["fsdp"] and fsdp["losses"] == pytest.approx(plain["losses"], rel=1e-5, abs=0)
    assert fsdp["eval"] == pytest.approx(plain["eval"], rel=1e-5)


@pytest.mark.usefixtures("process_group")
def test_fused_loss_frees_the_gathered_head(cache: Path, student_dir: Path) -> None:
    from torch.distributed.tensor import DTensor

    lm = AutoModelForCausalLM.from_pretrained(student_dir)
    lm.train()
    net = StepLoss(lm, cfg(cache, Path("unused"), student_dir, fused=True), autocast_bf16=False)
    shard_student(net, lm, torch.device("cpu"), bf16=False, cpu_offload=False)
    seen: list[torch.Tensor] = []
    net.register_forward_pre_hook(lambda m, args: seen.append(m.lm.lm_head.weight))
    optimizer = torch.optim.AdamW(lm.parameters())
    loader = make_loader(str(cache), ROWS, order="random", device="cpu")
    batch = next(iter(loader))
    loader.close()
    net(batch).backward()
    optimizer.step()
    (gathered,) = seen
    assert not isinstance(gathered, DTensor) and gathered.shape == (VOCAB, 32)
    assert gathered.untyped_storage().nbytes() == 0  # the whole weight was freed after backward
    assert isinstance(lm.lm_head.weight, DTensor)  # the module holds its shard again
    assert lm.lm_head.weight.grad is not None


def test_refusals(cache: Path, student_dir: Path, tmp_path: Path, monkeypatch: Any) -> None:
    for var in ("WORLD_SIZE", "MASTER_ADDR", "RANK"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError, match=r"not started by torchrun .*torchrun --nproc-per-node N"):
        run_train(cfg(cache, tmp_path / "o", student_dir, fsdp=True))
    with pytest.raises(ConfigError) as e:
        run_train(cfg(cache, tmp_path / "o", student_dir, fsdp_cpu_offload=True, compile=True))
    assert "fsdp_cpu_offload needs fsdp" in str(e.value)
    with pytest.raises(ConfigError, match="compile with fsdp is not supported"):
        run_train(cfg(cache, tmp_path / "o", student_dir, fsdp=True, compile=True))


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, ...]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.usefixtures("process_group")
def test_checkpoint_kinds_and_tampered_metadata_are_refused(
    cache: Path, student_dir: Path, tmp_path: Path
) -> None:
    run_train(cfg(cache, tmp_path / "ddp", student_dir, max_steps=2))
    with pytest.raises(ConfigError, match=r"is a DDP checkpoint .*resume it without --fsdp"):
        run_train(cfg(cache, tmp_path / "ddp", student_dir, max_steps=2, fsdp=True, resume=True))
    run_train(cfg(cache, tmp_path / "sh", student_dir, max_steps=2, fsdp=True))
    with pytest.raises(ConfigError, match=r"sharded \(DCP\) checkpoint .*resume it with --fsdp"):
        run_train(cfg(cache, tmp_path / "sh", student_dir, max_steps=2, resume=True))
    marker = tmp_path / "pwned"
    metadata = tmp_path / "sh" / "checkpoints" / "step-00000002" / "dcp" / ".metadata"
    metadata.write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(ConfigError, match=r"refused to load: it references posix\.system"):
        run_train(cfg(cache, tmp_path / "sh", student_dir, max_steps=2, fsdp=True, resume=True))
    assert not marker.exists()
