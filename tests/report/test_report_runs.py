"""``logitcache report RUN_DIR RUN_DIR``: two real training runs (distilled, hard labels) of a
tiny student on a tiny cache, overlaid on one page."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from page import decode_png, read_page

from logitcache.report import report
from logitcache.report.runs import read_run
from logitcache.train import TrainConfig, run_train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations"))
from kd_cache import dump_tiny, llama, teacher


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("runs")
    dump_tiny(teacher(), root / "cache", rows=64, seed=0)
    llama(7).save_pretrained(root / "student")
    out = []
    for name, kw in (("distilled", {"loss": "kl"}), ("hard", {"alpha": 1.0})):
        cfg = TrainConfig(
            cache=str(root / "cache"),
            out=str(root / name),
            student=str(root / "student"),
            batch_size=4,
            max_steps=6,
            lr=3e-3,
            log_every=1,
            eval_every=3,
            eval_fraction=0.2,
            progress=False,
            device="cpu",
            **kw,  # type: ignore[arg-type]
        )
        run_train(cfg)
        out.append(root / name)
    return out


def test_two_runs_are_overlaid(runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "runs.html"
    res = report([str(p) for p in runs], out)
    assert res.kind == "runs" and res.html == out
    page = read_page(out)
    assert page.scripts == 0 and page.external == []
    assert set(page.images) == {"fig-loss", "fig-eval", "fig-throughput"}
    for data in page.images.values():
        decode_png(data)
    for png in res.images:
        decode_png(png.read_bytes())
    text = page.all_text
    assert "2 training run(s), curves overlaid: distilled" in text and "hard (" in text
    for p in runs:  # the table's final loss and eval KL are each run's own
        summary = json.loads((p / "summary.json").read_text())
        log = read_run(p)
        assert log.steps == tuple(range(1, 7)) and log.loss[-1] == summary["final_loss"]
        assert log.eval_steps[-1] == 6 and log.evals[-1]["kl"] == summary["eval"]["kl"]
    for p in runs:  # the table's row of each run holds its own final loss and eval KL
        s = json.loads((p / "summary.json").read_text())
        assert float(page.cells[(p.name, "final-loss")]) == s["final_loss"]
        assert float(page.cells[(p.name, "eval-kl")]) == s["eval"]["kl"]
        assert float(page.cells[(p.name, "tokens-per-s")]) == s["tokens_per_s"]


def test_every_panel_overlays_both_runs(runs: list[Path]) -> None:
    from logitcache.report.plots import draw_run_figures

    logs = [read_run(p) for p in runs]
    assert logs[0].loss != logs[1].loss  # distilled and hard-label runs differ
    figures = draw_run_figures(logs)
    panels = [ax for fig in figures.values() for ax in fig.axes if ax.get_lines()]
    assert len(panels) >= 2 + 3 + 1  # loss, lr; kl, ce, top-1, ece; throughput
    for ax in panels:
        assert [line.get_label() for line in ax.get_lines()] == ["distilled", "hard"]
