"""A training run read back from what ``logitcache train`` writes under its ``--out``.

``metrics.jsonl`` holds two kinds of lines (see ``logitcache/train/run.py``): training lines
``{"step", "loss", "lr", "tokens", "steps_per_s"}`` every ``--log-every`` steps, and evaluation
lines ``{"step", "eval": {...}}`` (the last one with ``"final": true``). ``summary.json`` is
optional here (a run still in progress has none). Lines that do not parse (a line cut short by
a kill) are skipped, as the trainer's own resume does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from logitcache.errors import ConfigError

__all__ = ["RunLog", "is_run_dir", "read_run"]

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"


@dataclass(frozen=True)
class RunLog:
    """One run: its name (the directory's), training series, eval series and summary."""

    name: str
    path: str
    steps: tuple[int, ...]
    loss: tuple[float, ...]
    lr: tuple[float, ...]
    tokens: tuple[int, ...]
    steps_per_s: tuple[float, ...]
    eval_steps: tuple[int, ...]
    evals: tuple[dict[str, float], ...]
    summary: dict[str, Any] | None

    @property
    def tokens_per_s(self) -> tuple[float, ...]:
        """Throughput at each logged step: tokens per step so far times the steps/s so far."""
        out = []
        for s, t, r in zip(self.steps, self.tokens, self.steps_per_s, strict=True):
            out.append(t / s * r if s else 0.0)
        return tuple(out)

    def eval_series(self, metric: str) -> tuple[list[int], list[float]]:
        xs, ys = [], []
        for s, e in zip(self.eval_steps, self.evals, strict=True):
            v = e.get(metric)
            if isinstance(v, (int, float)):
                xs.append(s)
                ys.append(float(v))
        return xs, ys

    @property
    def eval_metrics(self) -> list[str]:
        seen: dict[str, None] = {}
        for e in self.evals:
            for k in e:
                if k != "positions":
                    seen.setdefault(k, None)
        return list(seen)


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / METRICS).is_file()


def read_run(path: str | Path, name: str | None = None) -> RunLog:
    """Read the run under ``path``; ``name`` labels it in plots (default: the directory name)."""
    p = Path(path)
    log = p / METRICS
    if not log.is_file():
        raise ConfigError(
            f"{p} is not a training run: it has no {METRICS} (expected the --out directory of "
            "`logitcache train`) and no manifest.json either (not a cache)"
        )
    train: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    for line in log.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("step"), int):
            continue
        if isinstance(entry.get("eval"), dict):
            evals.append(entry)
        elif isinstance(entry.get("loss"), (int, float)):
            train.append(entry)
    summary = None
    if (p / SUMMARY).is_file():
        try:
            summary = json.loads((p / SUMMARY).read_text())
        except ValueError:
            summary = None
    return RunLog(
        name=name or p.resolve().name,
        path=str(p),
        steps=tuple(int(e["step"]) for e in train),
        loss=tuple(float(e["loss"]) for e in train),
        lr=tuple(float(e.get("lr", float("nan"))) for e in train),
        tokens=tuple(int(e.get("tokens", 0)) for e in train),
        steps_per_s=tuple(float(e.get("steps_per_s", float("nan"))) for e in train),
        eval_steps=tuple(int(e["step"]) for e in evals),
        evals=tuple(
            {k: float(v) for k, v in e["eval"].items() if isinstance(v, (int, float))}
            for e in evals
        ),
        summary=summary if isinstance(summary, dict) else None,
    )
