"""Issue 14's attack, replayed against the installed CLI: one JSON summary on the last line.

    .venv/bin/python scripts/check_hardening.py [--keep DIR]

Runs ``.venv/bin/logitcache`` (``python -m logitcache`` where that is missing) in subprocesses, in
a temporary directory, with the tiny seeded teacher of ``tests/conftest.py`` built in process and
saved there. It measures whatever the code does today: a case that fails is counted as not ok and
named (with the last lines of what the CLI said); the script itself never stops on one. Runs in
about three minutes on two busy cores.

- ``resume_last_moment_ok``: a dump killed after its last shard and before its manifest, then
  ``dump --resume``, must exit 0 and the cache must pass ``verify``. The kill point is
  deterministic: the teacher factory ``tests/dump_factories.py:slow`` exits the process (like a
  SIGKILL) when ``$LOGITCACHE_TEST_EXIT_BEFORE_MANIFEST`` is set and the manifest is about to be
  written. Where that hook is missing, the dump is SIGKILLed once ``_writers/main.json`` records
  every row (a race, reported as such).
- ``coverage_exact_after_resume``: the ``coverage`` of the manifest after kill + resume equals the
  uninterrupted run's, both for the kill above and for a SIGKILL in the middle of the dump (after
  two shards, rows still buffered; timed, as ``tests/dump/test_dump.py`` does).
- ``tampered_refused`` (of 5): edits of a committed manifest that ``logitcache train`` (which opens
  the cache with the reader) must refuse: the content digest replaced, ``padded_vocab_size``
  changed, ``targets.k`` disagreeing with the codec, the shard records reordered, a shard record
  dropped with the totals fixed to match. The untampered cache must train (``baseline_train_ok``),
  or the count means nothing. ``tampered_resigned_refused`` (of 4): the last four edits again,
  with ``content_digest`` recomputed to match (a forger's edit): only cross-field checks catch
  those.
- ``bad_inputs_one_line`` (of 11): inputs that must be answered with exit != 0 and one line on
  stderr without a traceback. "One line": the non-empty lines of stderr, click's usage preamble
  (``Usage: ...`` and ``Try '... --help' for help.``) and progress bars (``NN%|...|``, such as
  Hugging Face's "Loading weights" as a model loads) aside, are exactly one. Each malicious
  pickle would create a marker file if it ever ran: ``pickles_executed`` must be 0.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
DUMP_OPTS = ["--seq-len", "16", "--k", "8", "--batch-size", "5", "--shard-mb", "0.01", "--no-count"]
HOOK = "LOGITCACHE_TEST_EXIT_BEFORE_MANIFEST"


def cli_command() -> list[str]:
    exe = ROOT / ".venv" / "bin" / "logitcache"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "logitcache"]


class Runner:
    """Runs the CLI with tests/ on the path (for the teacher factories) and a time limit."""

    def __init__(self, work: Path, teacher: Path) -> None:
        self.work = work
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])),
            "LOGITCACHE_TEST_TEACHER": str(teacher),
            "OMP_NUM_THREADS": "1",
        }

    def run(self, *args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                [*cli_command(), *args],
                env={**self.env, **env},
                cwd=self.work,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or ""
            return subprocess.CompletedProcess(e.cmd, 124, out, f"timed out after {timeout} s")

    def popen(self, *args: str, **env: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [*cli_command(), *args],
            env={**self.env, **env},
            cwd=self.work,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


def said(proc: subprocess.CompletedProcess[str], lines: int = 3) -> str:
    text = (proc.stderr or proc.stdout or "").strip().splitlines()
    return " | ".join(text[-lines:])[-400:]


# -- the tiny teacher and data -----------------------------------------------------------------


def build_teacher(path: Path) -> Path:
    sys.path.insert(0, str(TESTS))
    from conftest import TINY_CORPUS, build_tiny_llama, build_tiny_tokenizer

    build_tiny_llama().save_pretrained(path)
    build_tiny_tokenizer().save_pretrained(path)
    data = path.parent / "docs.jsonl"
    # 23 documents: the packed rows do not fill the last batch of 5 (the case of #14.1)
    docs = [TINY_CORPUS[i % len(TINY_CORPUS)] * (1 + i % 3) for i in range(23)]
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return data


def dump_args(data: Path, out: Path, *extra: str) -> list[str]:
    teacher = "dump_factories:slow"
    return [
        "dump",
        "--teacher",
        teacher,
        "--data",
        str(data),
        "--out",
        str(out),
        *DUMP_OPTS,
        *extra,
    ]


def manifest(url: Path) -> dict[str, Any]:
    return json.loads((url / "manifest.json").read_text())


def committed_rows(url: Path) -> int:
    try:
        progress = json.loads((url / "_writers" / "main.json").read_text())
    except (OSError, ValueError):
        return 0
    return sum(int(s["rows"]) for s in progress.get("shards", []))


# -- resume at the last moment, coverage -------------------------------------------------------


def kill_at_last_moment(r: Runner, data: Path, out: Path, total_rows: int) -> str:
    """Kill a dump after its last shard, before its manifest; returns how it was done."""
    hook_there = HOOK in (TESTS / "dump_factories.py").read_text()
    if hook_there:
        proc = r.run(*dump_args(data, out), **{HOOK: "all"})
        if proc.returncode == 9 and not (out / "manifest.json").exists():
            return "deterministic hook"
        raise RuntimeError(f"the kill hook did not fire (exit {proc.returncode}): {said(proc)}")
    p = r.popen(*dump_args(data, out), LOGITCACHE_TEST_DELAY="0.05")
    try:
        deadline = time.monotonic() + 120
        while committed_rows(out) < total_rows and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    if (out / "manifest.json").exists():
        raise RuntimeError("the dump committed its manifest before the SIGKILL (race lost)")
    return "SIGKILL after the last shard (timed)"


def kill_mid_run(r: Runner, data: Path, out: Path) -> None:
    p = r.popen(*dump_args(data, out), LOGITCACHE_TEST_DELAY="0.25")
    try:
        deadline = time.monotonic() + 120
        while p.poll() is None and time.monotonic() < deadline:
            try:
                shards = json.loads((out / "_writers" / "main.json").read_text())["shards"]
            except (OSError, ValueError, KeyError):
                shards = []
            if len(shards) >= 2:
                break
            time.sleep(0.05)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    if (out / "manifest.json").exists():
        raise RuntimeError("the dump finished before the SIGKILL")


def resume_cases(r: Runner, data: Path, work: Path, report: dict[str, Any]) -> None:
    full = work / "full"
    proc = r.run(*dump_args(data, full))
    if proc.returncode != 0:
        report["failures"]["resume"] = f"the uninterrupted dump failed: {said(proc)}"
        report["resume_last_moment_ok"] = report["coverage_exact_after_resume"] = False
        return
    want = manifest(full)
    report["rows"] = want["num_rows"]
    coverage_ok = []
    for name, kill in (
        ("last_moment", lambda out: kill_at_last_moment(r, data, out, want["num_rows"])),
        ("mid_run", lambda out: kill_mid_run(r, data, out)),
    ):
        out = work / name
        try:
            report[f"kill_{name}"] = kill(out) or "SIGKILL after two shards (timed)"
        except RuntimeError as e:
            report["failures"][f"kill_{name}"] = str(e)
            coverage_ok.append(False)
            continue
        resumed = r.run(*dump_args(data, out, "--resume"))
        verified = r.run("verify", str(out)) if resumed.returncode == 0 else resumed
        ok = resumed.returncode == 0 and verified.returncode == 0
        if name == "last_moment":
            report["resume_last_moment_ok"] = ok
        if not ok:
            report["failures"][f"resume_{name}"] = (
                f"resume exit {resumed.returncode}, verify exit {verified.returncode}: "
                + said(resumed if resumed.returncode else verified)
            )
            coverage_ok.append(False)
            continue
        got = manifest(out).get("coverage")
        if got != want.get("coverage"):
            report["failures"][f"coverage_{name}"] = (
                f"{got} vs uninterrupted {want.get('coverage')}"
            )
        coverage_ok.append(got == want.get("coverage"))
    report.setdefault("resume_last_moment_ok", False)
    report["coverage_exact_after_resume"] = all(coverage_ok) and len(coverage_ok) == 2


# -- tampered manifests --------------------------------------------------------------------------


def _drop_last_shard(m: dict[str, Any]) -> None:
    gone = m["shards"].pop()
    for total, per in (
        ("num_rows", "rows"),
        ("num_positions", "positions"),
        ("num_bytes", "bytes"),
    ):
        if total in m and per in gone:
            m[total] -= gone[per]
    if "num_bytes" in m and "bytes" not in gone:
        m["num_bytes"] -= sum(f["bytes"] for f in gone.get("files", []))
    if "positions" in gone and isinstance(m.get("coverage"), dict) and "positions" in m["coverage"]:
        m["coverage"]["positions"] -= gone["positions"]


def _swap_digest(m: dict[str, Any]) -> None:
    m["content_digest"] = "sha256:" + "0" * 64


def _bump_padded_vocab(m: dict[str, Any]) -> None:
    m["padded_vocab_size"] += 64


def _k_off_codec(m: dict[str, Any]) -> None:
    m["targets"]["k"] -= 1


def _reverse_shards(m: dict[str, Any]) -> None:
    m["shards"].reverse()


TAMPERS: dict[str, Callable[[dict[str, Any]], None]] = {
    "content_digest_replaced": _swap_digest,
    "padded_vocab_size_changed": _bump_padded_vocab,
    "targets_k_disagrees_with_codec": _k_off_codec,
    "shard_records_reordered": _reverse_shards,
    "shard_record_dropped_totals_fixed": _drop_last_shard,
}


def train_args(cache: Path, student: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--cache", str(cache), "--student", str(student), "--out", str(out),
            "--max-steps", "1", "--batch-size", "2", "--device", "cpu", "--eval-fraction", "0",
            "--no-progress", *extra]  # fmt: skip


def tamper_cases(r: Runner, work: Path, teacher: Path, report: dict[str, Any]) -> None:
    cache = work / "full"
    refused = 0
    if not (cache / "manifest.json").exists():
        report["failures"]["tampered"] = "no cache to tamper with (the dump failed)"
        report["tampered_refused"] = 0
        return
    report["tampered"] = {}
    base = r.run(*train_args(cache, teacher, work / "train-base"))
    report["baseline_train_ok"] = base.returncode == 0
    if base.returncode != 0:
        report["failures"]["baseline_train"] = said(base)
    for name, edit in TAMPERS.items():
        copy = work / f"tampered-{name}"
        shutil.copytree(cache, copy)
        m = manifest(copy)
        try:
            edit(m)
        except (KeyError, IndexError, TypeError) as e:
            report["failures"][f"tampered_{name}"] = f"could not apply the edit: {e!r}"
            continue
        (copy / "manifest.json").write_text(json.dumps(m, indent=1))
        proc = r.run(*train_args(copy, teacher, work / f"train-{name}"))
        report["tampered"][name] = f"exit {proc.returncode}: {said(proc, 1)}"
        if proc.returncode != 0 and "Traceback" not in proc.stderr:
            refused += 1
        elif proc.returncode != 0:
            report["failures"][f"tampered_{name}"] = "refused with a traceback: " + said(proc)
            refused += 1  # refused all the same; the traceback is a bad-input matter
        else:
            report["failures"][f"tampered_{name}"] = "trained with exit 0"
    report["tampered_refused"] = refused
    resigned_cases(r, work, teacher, report)


def resigned_cases(r: Runner, work: Path, teacher: Path, report: dict[str, Any]) -> None:
    """The same edits by a forger who also rewrites ``content_digest`` to match: only the
    cross-field checks (k vs codec, totals vs shards, shard order) can refuse these."""
    try:
        from logitcache.format.manifest import content_digest
    except ImportError as e:
        report["failures"]["tampered_resigned"] = f"cannot compute a digest: {e}"
        return
    refused = 0
    report["tampered_resigned"] = {}
    for name, edit in TAMPERS.items():
        if name == "content_digest_replaced":
            continue
        copy = work / f"resigned-{name}"
        shutil.copytree(work / "full", copy)
        m = manifest(copy)
        edit(m)
        m["content_digest"] = content_digest(m)
        (copy / "manifest.json").write_text(json.dumps(m, indent=1))
        proc = r.run(*train_args(copy, teacher, work / f"train-resigned-{name}"))
        report["tampered_resigned"][name] = f"exit {proc.returncode}: {said(proc, 1)}"
        refused += proc.returncode != 0
    report["tampered_resigned_refused"] = refused


# -- bad inputs ------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this runs ``touch <marker>``: a stand-in for a malicious pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def malicious_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(_Payload(marker), protocol=2))


_NOT_THE_ANSWER = re.compile(r"^(Usage: |Try '.*--help' for help|note: )|\d+%\|.*\|")


def one_line(proc: subprocess.CompletedProcess[str]) -> bool:
    """Exit != 0, no traceback, and one line of message: click's usage preamble, progress bars
    (Hugging Face's "Loading weights: 100%|...|" as the student loads) and the trainer's
    ``note:`` lines logged before the failure (a padded student vocabulary) aside."""
    if proc.returncode == 0 or "Traceback" in proc.stderr:
        return False
    lines = proc.stderr.replace("\r", "\n").splitlines()
    lines = [x for x in lines if x.strip() and not _NOT_THE_ANSWER.search(x)]
    return len(lines) == 1


def bad_input_cases(
    r: Runner, work: Path, data: Path, teacher: Path, report: dict[str, Any]
) -> None:
    bad = work / "bad"
    bad.mkdir()
    marker = bad / "PICKLE-RAN"
    cases: dict[str, list[str]] = {}

    def dump_of(
        path: Path, out: Path | None = None, who: Path = teacher, shard_mb: str = "0.01"
    ) -> list[str]:
        opts = [shard_mb if x == "0.01" else x for x in DUMP_OPTS]
        out = out or bad / f"out-{path.name}"
        return ["dump", "--teacher", str(who), "--data", str(path), "--out", str(out), *opts]

    (bad / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1") * 3)
    cases["invalid_utf8_txt"] = dump_of(bad / "latin1.txt")
    (bad / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    cases["invalid_utf8_jsonl"] = dump_of(bad / "latin1.jsonl")
    (bad / "notjson.jsonl").write_text('this is not json\n{"text": "ok"}\n')
    cases["jsonl_first_line_not_json"] = dump_of(bad / "notjson.jsonl")
    (bad / "number.jsonl").write_text('{"text": 12345}\n')
    cases["text_is_a_number"] = dump_of(bad / "number.jsonl")
    (bad / "a-file").write_text("not a directory\n")
    cases["out_is_a_regular_file"] = dump_of(data, out=bad / "a-file")
    deep = bad / "deep"
    deep.mkdir()
    depth = 100_000
    (deep / "manifest.json").write_text('{"a": ' * depth + "1" + "}" * depth)
    cases["manifest_nested_100k_deep"] = ["info", str(deep)]

    # a checkpoint whose optimizer state is a malicious pickle, then train --resume (the same
    # settings: a run stopped at step 1 of 2, resumed)
    run_dir = work / "train-pickle"
    same = ("--max-steps", "2", "--save-every", "1")
    first = r.run(*train_args(work / "full", teacher, run_dir, *same, "--stop-after", "1"))
    targets = sorted(run_dir.rglob("optimizer.pt"))
    if first.returncode == 0 and targets:
        malicious_pickle(targets[-1], marker)
        resume = train_args(work / "full", teacher, run_dir, *same, "--resume")
        cases["pickle_in_checkpoint"] = resume
    else:
        report["failures"]["pickle_in_checkpoint"] = (
            f"no checkpoint to poison (train exit {first.returncode}): {said(first)}"
        )
    for who in ("student", "teacher"):
        d = bad / f"pickled-{who}"
        shutil.copytree(teacher, d)
        for f in d.glob("*.safetensors"):
            f.unlink()
        malicious_pickle(d / "pytorch_model.bin", marker)
        if who == "student":
            cases["pickle_as_student_weights"] = train_args(work / "full", d, bad / "train-student")
        else:
            cases["pickle_as_teacher_weights"] = dump_of(data, out=bad / "out-teacher", who=d)
    (bad / "evil.yaml").write_text(
        "cache: !!python/object/apply:os.system ['touch " + str(marker) + "']\n"
    )
    cases["yaml_python_tag"] = ["train", "--config", str(bad / "evil.yaml")]
    cases["shard_mb_negative"] = dump_of(data, out=bad / "out-negative", shard_mb="-1")

    ok = 0
    report["bad_inputs"] = {}
    for name, args in cases.items():
        proc = r.run(*args, timeout=180)
        good = one_line(proc)
        ok += good
        report["bad_inputs"][name] = "ok" if good else f"exit {proc.returncode}: {said(proc, 2)}"
        if not good:
            report["failures"][f"bad_input_{name}"] = report["bad_inputs"][name]
    report["bad_inputs_one_line"] = ok
    report["bad_inputs_total"] = len(cases)
    report["pickles_executed"] = int(marker.exists())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep", help="work in this directory and keep it (default: a temp dir)")
    args = ap.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="check_hardening_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"failures": {}}
    t0 = time.monotonic()
    try:
        teacher = work / "teacher"
        data = build_teacher(teacher)
        r = Runner(work, teacher)
        for part in (
            lambda: resume_cases(r, data, work, report),
            lambda: tamper_cases(r, work, teacher, report),
            lambda: bad_input_cases(r, work, data, teacher, report),
        ):
            try:
                part()
            except Exception as e:  # a case that breaks the script is a failed case, not a stop
                report["failures"][f"script_error_{len(report['failures'])}"] = repr(e)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    for name, why in report["failures"].items():
        print(f"NOT OK {name}: {why}")
    for name, verdict in report.get("tampered", {}).items():
        print(f"tampered {name}: {verdict}")
    for name, verdict in report.get("tampered_resigned", {}).items():
        print(f"tampered and re-signed {name}: {verdict}")
    for name, verdict in report.get("bad_inputs", {}).items():
        print(f"bad input {name}: {verdict}")
    summary = {
        "resume_last_moment_ok": bool(report.get("resume_last_moment_ok", False)),
        "tampered_refused": int(report.get("tampered_refused", 0)),
        "tampered_total": len(TAMPERS),
        "bad_inputs_one_line": int(report.get("bad_inputs_one_line", 0)),
        "bad_inputs_total": int(report.get("bad_inputs_total", 11)),
        "tampered_resigned_refused": report.get("tampered_resigned_refused"),
        "tampered_resigned_total": len(TAMPERS) - 1,
        "coverage_exact_after_resume": bool(report.get("coverage_exact_after_resume", False)),
        "baseline_train_ok": bool(report.get("baseline_train_ok", False)),
        "pickles_executed": int(report.get("pickles_executed", 0)),
        "kill_last_moment": report.get("kill_last_moment"),
        "not_ok": sorted(report["failures"]),
        "seconds": round(time.monotonic() - t0, 1),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
