"""scripts/bench_fsdp.py's pieces: its synthetic cache is a valid cache of distinct top-k ids, and
a curve with a NaN is never "equal"."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from logitcache.data import make_loader

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_fsdp.py"


def _bench() -> Any:
    spec = importlib.util.spec_from_file_location("bench_fsdp", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_synthetic_cache_and_curve_diff(tmp_path: Path) -> None:
    bench = _bench()
    bench.write_cache(tmp_path / "c", rows=4, seq=8, vocab=64)
    loader = make_loader(str(tmp_path / "c"), 4, order="sequential", device="cpu")
    batch = next(iter(loader))
    loader.close()
    ids = batch["target_ids"].numpy()
    assert ids.shape == (4 * 7, bench.K)
    assert all(len(np.unique(row)) == bench.K for row in ids)
    assert bench.max_rel_diff([1.0, 2.0], [1.0, 2.0]) == 0.0
    assert bench.max_rel_diff([1.0, float("nan")], [1.0, 2.0]) == math.inf
    with pytest.raises(SystemExit, match="must be a power of two"):
        bench.write_cache(tmp_path / "d", rows=4, seq=8, vocab=100)


def test_bench_starts() -> None:
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and "--device" in r.stdout, r.stderr[-2000:]
