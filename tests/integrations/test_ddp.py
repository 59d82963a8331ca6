"""KDTrainer under torchrun (2 CPU ranks, gloo, real processes) equals one process.

Accelerate deals the Trainer's shuffled batches of 4 to the two ranks in turn, so a global step
holds the same 8 rows as one process's batch of 8; with the step's target positions counted over
both ranks and the loss scaled by the world size (DDP averages gradients), the step losses agree
to float32 rounding. (Accelerate runs FSDP on GPUs only: on CPU its ``fsdp`` arguments fall back
to this DDP path, so FSDP itself is not tested here; see docs/integrations.md.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from kd_cache import dump_tiny, teacher

HERE = Path(__file__).resolve().parent


def run(args: list[str], out: Path) -> list[float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    losses: list[float] = json.loads((out / "losses.json").read_text())
    return losses


@pytest.mark.dist
def test_two_ranks_equal_one_process(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    dump_tiny(teacher(), cache, rows=64, seed=0)
    worker = str(HERE / "ddp_worker.py")
    one = run([sys.executable, worker, str(cache), str(tmp_path / "one"), "8"], tmp_path / "one")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    two = run(
        [*torchrun, "--nproc-per-node", "2", worker, str(cache), str(tmp_path / "two"), "4"],
        tmp_path / "two",
    )
    assert len(one) == 6
    assert two == pytest.approx(one, rel=1e-5)
