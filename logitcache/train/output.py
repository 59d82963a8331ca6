"""What a training run writes under ``OUT``, and the refusals that protect it.

``OUT`` holds one run: ``metrics.jsonl`` (one JSON line per logged step and evaluation),
``checkpoints/``, ``final/`` and ``summary.json``. Training into an ``OUT`` that already holds a
run without ``resume`` is refused (the dump refuses a committed cache the same way): appending
to its log and overwriting its checkpoints would mix two runs. A resumed run continues the log:
lines past the checkpoint it resumes from (written after it, then lost with the process) are
dropped before it logs them again, so each step appears once, and ``tokens`` continues from the
count saved in the checkpoint.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from logitcache.errors import ConfigError

__all__ = ["RUN_FILES", "MetricsLog", "check_out_dir", "check_previous_run"]

#: What a run leaves under OUT; any of them means OUT holds a run.
RUN_FILES = ("metrics.jsonl", "checkpoints", "final", "summary.json")


def check_out_dir(out: Path) -> None:
    """Create ``out`` and check that it is writable."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"output directory {out} is not writable ({e}); choose another --out"
        ) from e


def check_previous_run(out: Path, resume: bool) -> None:
    """Refuse to start a new run in an ``out`` that holds one (``resume`` continues it)."""
    if resume:
        return
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found:
        raise ConfigError(
            f"--out {out} holds a previous training run ({', '.join(found)}); pass --resume to "
            "continue it from its newest checkpoint, or choose a new --out (or delete this one) "
            "to start a new run"
        )


class MetricsLog:
    """JSON lines in OUT/metrics.jsonl and a one-line progress display (rank 0 only)."""

    def __init__(self, out: Path, active: bool, progress: bool) -> None:
        self.active = active
        self.show = progress and active
        self.path = out / "metrics.jsonl"
        self.tty = sys.stderr.isatty()

    def rewind(self, step: int) -> None:
        """Drop the lines a resumed run will write again: those past checkpoint ``step`` and the
        final evaluation (a line cut short by a kill is dropped too). Rewritten atomically."""
        if not self.active or not self.path.exists():
            return
        keep: list[str] = []
        for line in self.path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            at = entry.get("step") if isinstance(entry, dict) else None
            if isinstance(at, int) and (at < step or (at == step and not entry.get("final"))):
                keep.append(line)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(x + "\n" for x in keep))
        os.replace(tmp, self.path)

    def record(self, entry: dict[str, Any]) -> None:
        if not self.active:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(entry) + "\n")
        if self.show and "eval" in entry:
            ev = entry["eval"]
            msg = ", ".join(f"{k} {v:.4g}" for k, v in ev.items() if k != "positions")
            print(f"\n[step {entry['step']}] eval: {msg}", file=sys.stderr, flush=True)

    def progress(self, step: int, total: int, loss: float, rate: float) -> None:
        if not self.show:
            return
        eta = (total - step) / rate if rate else float("nan")
        line = f"step {step}/{total}  loss {loss:.4f}  {rate:.2f} steps/s  eta {eta:.0f}s"
        if self.tty:
            print("\r" + line, end="", file=sys.stderr, flush=True)
        elif step == total or step % max(1, total // 10) == 0:
            print(line, file=sys.stderr, flush=True)

    def table(self, summary: dict[str, Any]) -> None:
        if not self.show:
            return
        rows = [
            ("steps", summary["steps"]),
            ("final loss", summary["final_loss"]),
            ("steps/s", summary["steps_per_s"]),
            ("tokens/s", summary["tokens_per_s"]),
        ]
        for k, v in (summary["eval"] or {}).items():
            rows.append((f"eval {k}", v))
        print("", file=sys.stderr)
        for k, v in rows:
            val = f"{v:.4f}" if isinstance(v, float) else str(v)
            print(f"  {k:<22} {val}", file=sys.stderr)
