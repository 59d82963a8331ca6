"""The bytes-vs-quality figure of docs/experiments.md is drawn from exp_targets.py's JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from page import decode_png

from logitcache.report.experiments import targets_figure

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_figure_from_the_documented_results(tmp_path: Path) -> None:
    results = json.loads((DOCS / "img" / "exp_targets_results.json").read_text())
    assert {"hard", "sampled", "online-kd", "topk64-tail"} <= set(results)
    decode_png(targets_figure(results))
    out = tmp_path / "f.png"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "logitcache.report.experiments",
            str(DOCS / "img" / "exp_targets_results.json"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    decode_png(out.read_bytes())
    assert "img/exp_targets_bytes_vs_quality.png" in (DOCS / "experiments.md").read_text()
    decode_png((DOCS / "img" / "exp_targets_bytes_vs_quality.png").read_bytes())
