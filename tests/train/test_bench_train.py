"""scripts/bench_train.py's self-check: float noise passes, a different loop does not."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_train.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_self_check_tolerates_float_noise_not_another_loop() -> None:
    bench = _bench()
    trainer = [5.7, 5.66, 5.624981403]
    # the case that stopped the bench: one thread vs the default, step 3
    diff = bench.self_check([5.7, 5.66, 5.624981880, 5.5], trainer)
    assert 0 < diff < 1e-7
    assert bench.self_check(trainer, trainer) == 0.0
    with pytest.raises(SystemExit, match=r"not the trainer's.*max relative difference 0\.00177"):
        bench.self_check([5.7, 5.67, 5.624981403], trainer)
    with pytest.raises(SystemExit, match="not the trainer's"):
        bench.self_check([5.7, float("nan"), 5.6], trainer)
    with pytest.raises(SystemExit, match="needs 3 losses"):
        bench.self_check([5.7], trainer)


def test_bench_starts() -> None:
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and "--steps" in r.stdout, r.stderr[-2000:]
