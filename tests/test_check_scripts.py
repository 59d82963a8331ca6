"""The house's measuring scripts judge what they claim to: the pieces of
``scripts/check_hardening.py`` that decide a verdict, and ``scripts/gpu_check.sh``'s syntax (the
GPU run itself needs a lent GPU; ``GPU_CHECK_DEVICE=cpu`` dry-runs it, too slow for the suite)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"scripts/{name}.py not found")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


hardening = _load("check_hardening")


def _proc(rc: int, err: str) -> subprocess.CompletedProcess[str]:
    return subprocess.CompletedProcess([], rc, "", err)


@pytest.mark.parametrize(
    ("rc", "stderr", "one"),
    [
        (1, "error: cache /x is damaged; re-dump it\n", True),
        (
            2,
            "Usage: logitcache dump [OPTIONS]\nTry 'logitcache dump --help' for help.\n\n"
            "Error: Invalid value for '--shard-mb': -1.0 is not > 0.\n",
            True,
        ),
        (1, "Loading weights: 100%|#####| 21/21 [00:00<00:00, 2.1it/s]\nerror: refused\n", True),
        (0, "", False),  # accepted: not an answer to a bad input
        (1, "Traceback (most recent call last):\n  ...\nValueError: x\n", False),
        (1, "error: first\nsecond line of an error\n", False),
    ],
)
def test_one_line_verdict(rc: int, stderr: str, one: bool) -> None:
    assert hardening.one_line(_proc(rc, stderr)) is one


def _manifest() -> dict[str, Any]:
    shards = [
        {"path": f"s{i}", "rows": 2 + i, "positions": 5, "files": [{"bytes": 10 * (i + 1)}]}
        for i in range(3)
    ]
    return {
        "content_digest": "sha256:" + "ab" * 32,
        "padded_vocab_size": 320,
        "targets": {"k": 8},
        "num_rows": 9,
        "num_positions": 15,
        "num_bytes": 60,
        "coverage": {"positions": 15, "entropy": 1.0},
        "shards": shards,
    }


def test_tampers_change_what_they_name() -> None:
    for name, edit in hardening.TAMPERS.items():
        m = _manifest()
        edit(m)
        assert m != _manifest(), name
    m = _manifest()
    hardening._drop_last_shard(m)
    totals = (m["num_rows"], m["num_positions"], m["num_bytes"], m["coverage"]["positions"])
    assert len(m["shards"]) == 2 and totals == (5, 10, 30, 10)


def test_malicious_pickle_would_run_a_command(tmp_path: Path) -> None:
    """The planted file really is a payload (so a refusal of it means something): plain pickle
    runs it, here on purpose, in a throwaway file."""
    import pickle

    marker = tmp_path / "ran"
    hardening.malicious_pickle(tmp_path / "p.bin", marker)
    pickle.loads((tmp_path / "p.bin").read_bytes())  # the point of the test
    assert marker.exists()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_parses() -> None:
    subprocess.run(["bash", "-n", str(ROOT / "scripts/gpu_check.sh")], check=True)
