"""A tensor-parallel dump SIGKILLed mid-run, then resumed: the cache an uninterrupted dump writes.

A real T=2 dump (gloo, CPU, the tiny Llama teacher; 74 rows in batches of 7, shards of 10 rows)
is slowed to 0.25 s a batch by the test entry ``_tp_worker.py`` (which also records each rank's
pid). The test waits until the writer's progress record lists two committed shards, then
SIGKILLs one chosen process of the group: the non-writer (tensor-parallel rank 1) or the writer.
The survivor must not wait on its dead peer: gloo sees the closed connection (its collectives
fail at once, measured < 1.1 s after the kill), and under torchrun the agent stops the group
(measured 0.4 s); both launchers are tested, the by-hand one (ranks started with
``RANK``/``MASTER_ADDR``, no agent) showing the dump itself fails in bounded time.

The resume (``--resume``, T=2 under torchrun or T=1 in one process) gives what an uninterrupted
dump gives: with T=2 the manifest and every shard byte-identical to the uninterrupted T=2 dump;
with T=1 the committed shards kept as they were and every row's targets equal to the T=1 dump's
up to the TP rounding (``_compare_topk``). In every case ``verify`` passes, the coverage counts
exactly the T=1 dump's positions (its means within 1e-5), and progress ends where a T=1 dump's
does (``dump: 74/74 rows (100.0%)``: the resume's count starts at the committed rows, not at the
start of the batch it redoes, and the row-count pass counts the same rows).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from test_dump import _env, dump_args, manifest, run_cli, text_data
from test_tensor_parallel import _compare_topk

__all__ = ["text_data"]  # the fixture, shared with test_dump

WORKER = str(Path(__file__).with_name("_tp_worker.py"))
# shards of 10 rows, batches of 7: a resume point inside a batch (its first rows are redone)
OPTS = ("--batch-size", "7", "--shard-mb", "0.01", "--temperature", "2", "--device", "cpu")
ROWS = 74  # rows of text_data at --seq-len 32


def _torchrun(n: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            str(n), *args]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def full(
    tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path, text_data: Path
) -> dict[str, Any]:
    """Uninterrupted dumps of the same rows: T=1 in process (and its output) and T=2 under
    torchrun."""
    root = tmp_path_factory.mktemp("tp_full")
    one = run_cli(*dump_args(tiny_teacher_dir, text_data, root / "t1", *OPTS)).output
    args = dump_args(tiny_teacher_dir, text_data, root / "t2", *OPTS, "--tensor-parallel", "2")
    proc = subprocess.run(_torchrun(2, "-m", "logitcache", *args), env=_env(),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert manifest(root / "t1")["coverage"]["positions"] > 0
    return {"t1": root / "t1", "t2": root / "t2", "t1-output": one}


def _launch(
    out: Path, args: list[str], launcher: str, **extra: str
) -> list[subprocess.Popen[bytes]]:
    pids = out.parent / "pids"
    pids.mkdir()
    env = _env(LOGITCACHE_TEST_PID_DIR=str(pids), LOGITCACHE_TEST_DELAY="0.25", **extra)
    if launcher == "torchrun":
        cmds = [(_torchrun(2, WORKER, *args), env)]
    else:  # ranks started by hand: no agent stops the survivor, the dump must fail by itself
        where = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2"}
        cmds = [([sys.executable, WORKER, *args], {**env, **where, "RANK": r, "LOCAL_RANK": r})
                for r in ("0", "1")]  # fmt: skip
    logs = [open(out.parent / f"log{i}.txt", "wb") for i in range(len(cmds))]  # noqa: SIM115
    procs = [subprocess.Popen(c, env=e, stdout=f, stderr=subprocess.STDOUT)
             for (c, e), f in zip(cmds, logs, strict=True)]  # fmt: skip
    for f in logs:
        f.close()  # the children hold their own descriptors
    return procs


def _kill_mid_dump(
    out: Path, args: list[str], launcher: str, victim: int, hang: bool = False, **env: str
) -> int:
    """Start the slowed T=2 dump, SIGKILL rank ``victim`` once two shards are committed (with
    ``hang``: SIGSTOP it, wait for the other rank to give up, then SIGKILL it); return the
    committed rows. Every process of the run has exited (non-zero) when this returns."""
    procs = _launch(out, args, launcher, **env)
    record = out / "_writers" / "main.json"
    pid_file = out.parent / "pids" / f"rank{victim}.pid"
    try:
        deadline = time.monotonic() + 180
        while not (record.exists() and len(json.loads(record.read_text())["shards"]) >= 2):
            alive = all(p.poll() is None for p in procs)
            assert alive and time.monotonic() < deadline, "the dump ended before the kill"
            time.sleep(0.02)
        pid = int(pid_file.read_text())
        if hang:  # a peer that neither works nor dies: only a timeout can tell
            os.kill(pid, signal.SIGSTOP)
            procs[1 - victim].wait(timeout=120)
        os.kill(pid, signal.SIGKILL)
        # bounded: the survivor fails on its dead peer (or torchrun stops it), never waits
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(c != 0 for c in codes), codes
    if launcher == "by hand":
        assert codes[victim] == -signal.SIGKILL
        if victim == 1:  # the writer survived its peer: a clean abort, shards kept, lock released
            log = (out.parent / "log0.txt").read_text(errors="replace")
            assert "NOT committed" in log and "kept for --resume" in log, log[-3000:]
            assert not list((out / "_locks").glob("*.json"))
    assert not (out / "manifest.json").exists()
    committed = sum(s["rows"] for s in json.loads(record.read_text())["shards"])
    assert 0 < committed < ROWS
    assert committed % 7, "the resume point must fall inside a batch for this test"
    return committed


def _shard_files(url: Path) -> list[tuple[str, int, str]]:
    return [(f["path"], f["bytes"], f["sha256"])
            for s in manifest(url)["shards"] for f in s["files"]]  # fmt: skip


def _final_progress(output: str) -> str:
    lines = [ln for ln in output.splitlines() if ln.startswith("dump: ")]
    assert lines, output[-3000:]
    return lines[-1].split("  ")[0]  # without the rate and ETA


def _sans_time(url: Path) -> dict[str, Any]:
    m = manifest(url)
    m.pop("created_at")
    return m


@pytest.mark.dist
@pytest.mark.parametrize(
    ("launcher", "victim", "resume_t"),
    [("torchrun", 1, 2), ("torchrun", 0, 1), ("by hand", 1, 2), ("by hand", 0, 1)],
    ids=[
        "torchrun-kill-peer-resume-t2",
        "torchrun-kill-writer-resume-t1",
        "by-hand-kill-peer-resume-t2",
        "by-hand-kill-writer-resume-t1",
    ],
)
def test_a_rank_killed_mid_dump_resumes_to_the_uninterrupted_cache(
    tmp_path: Path,
    tiny_teacher_dir: Path,
    text_data: Path,
    full: dict[str, Any],
    launcher: str,
    victim: int,
    resume_t: int,
) -> None:
    out = tmp_path / "cut"
    args = dump_args(tiny_teacher_dir, text_data, out, *OPTS)
    committed = _kill_mid_dump(out, [*args, "--tensor-parallel", "2"], launcher, victim)
    kept = json.loads((out / "_writers" / "main.json").read_text())["shards"]
    if resume_t == 2:
        cmd = _torchrun(2, "-m", "logitcache", *args, "--tensor-parallel", "2", "--resume")
        proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        output = proc.stdout + proc.stderr
        # same T, same batches: the uninterrupted T=2 cache to the byte
        assert _sans_time(out) == _sans_time(full["t2"])
        assert _shard_files(out) == _shard_files(full["t2"])
    else:
        output = run_cli(*args, "--resume").output
        got = manifest(out)
        assert got["extra"]["dump"]["run"]["tensor_parallel"] == 1
        # the shards the killed T=2 run committed are kept to the byte, the rest is redone
        files = set(_shard_files(out))
        assert all((f["path"], f["bytes"], f["sha256"]) in files for s in kept for f in s["files"])
        _compare_topk(full["t1"], out)
    assert f"{committed:,} rows resumed" in output
    # progress and the row-count pass end where the uninterrupted T=1 dump's did
    want_progress = f"dump: {ROWS}/{ROWS} rows (100.0%)"
    assert _final_progress(output) == _final_progress(full["t1-output"]) == want_progress
    assert f"{ROWS} rows" in run_cli("verify", str(out)).output
    got, want = manifest(out), manifest(full["t1"])
    assert sum(s["rows"] for s in got["shards"]) == ROWS
    assert got["coverage"]["positions"] == want["coverage"]["positions"]
    for key in ("captured_mass", "entropy", "teacher_nll"):
        assert got["coverage"][key] == pytest.approx(want["coverage"][key], abs=1e-5)


@pytest.mark.dist
def test_a_hung_peer_fails_the_dump_after_the_collective_timeout(
    tmp_path: Path, tiny_teacher_dir: Path, text_data: Path, full: dict[str, Any]
) -> None:
    """The peer is stopped, not killed: its connection stays open, so only the process group's
    timeout (LOGITCACHE_COLLECTIVE_TIMEOUT, 3 s here; 30 min by default, it was the end barrier's
    24 h) ends the writer's wait. The writer aborts cleanly (checked in _kill_mid_dump) and one
    process resumes to the T=1 dump's rows."""
    out = tmp_path / "cut"
    args = dump_args(tiny_teacher_dir, text_data, out, *OPTS)
    tp = [*args, "--tensor-parallel", "2"]
    committed = _kill_mid_dump(out, tp, "by hand", 1, hang=True, LOGITCACHE_COLLECTIVE_TIMEOUT="3")
    assert "Timed out" in (out.parent / "log0.txt").read_text(errors="replace")
    output = run_cli(*args, "--resume").output
    assert f"{committed:,} rows resumed" in output
    _compare_topk(full["t1"], out)


def test_collective_timeout_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    from datetime import timedelta

    from logitcache._distributed import COLLECTIVE_TIMEOUT, collective_timeout
    from logitcache.errors import ConfigError

    assert collective_timeout() == COLLECTIVE_TIMEOUT == timedelta(minutes=30)
    monkeypatch.setenv("LOGITCACHE_COLLECTIVE_TIMEOUT", "2.5")
    assert collective_timeout() == timedelta(seconds=2.5)
    for bad in ("0", "-1", "ten", "nan", "inf"):
        monkeypatch.setenv("LOGITCACHE_COLLECTIVE_TIMEOUT", bad)
        with pytest.raises(ConfigError, match="LOGITCACHE_COLLECTIVE_TIMEOUT must be"):
            collective_timeout()
