"""The example training configs: each opens with the command that runs it, and that exact command
(flags and config file merged by the CLI, as a user would type it) gives a valid TrainConfig."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import logitcache.train
from logitcache.cli import cli
from logitcache.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
RUN_CONFIGS = sorted(p for p in EXAMPLES.glob("train_*") if p.suffix in (".yaml", ".yml", ".json"))


def command_of(path: Path) -> list[str]:
    """The ``logitcache train`` arguments of the command on the config's first line."""
    first = path.read_text().splitlines()[0]
    if not first.startswith("# "):
        raise AssertionError(f"{path.name}: the first line must be '# <command that runs it>'")
    words = shlex.split(first[2:])
    if words[:2] == ["logitcache", "train"]:
        return words[2:]
    if words[0] == "torchrun" and "-m" in words:
        i = words.index("-m")
        if words[i + 1 : i + 3] == ["logitcache", "train"]:
            return words[i + 3 :]
    raise AssertionError(f"{path.name}: {first!r} does not run `logitcache train`")


def test_there_are_examples() -> None:
    assert {p.name for p in RUN_CONFIGS} >= {"train_small.yaml", "train_ddp.yaml"}


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_example_command_gives_valid_config(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[TrainConfig] = []

    def fake_train(cfg: TrainConfig) -> dict[str, Any]:
        seen.append(cfg)
        return {"steps": 0}

    monkeypatch.setattr(logitcache.train, "run_train", fake_train)
    monkeypatch.chdir(ROOT)  # the commands are written to run from the repository root
    args = command_of(path)
    assert f"examples/{path.name}" in args
    r = CliRunner().invoke(cli, ["train", *args])
    assert r.exit_code == 0, r.output
    (cfg,) = seen
    assert cfg.problems() == []
    assert cfg.cache and cfg.out and cfg.max_steps > 1
    if cfg.student_config is not None:
        student = json.loads((ROOT / cfg.student_config).read_text())
        from transformers import AutoConfig

        hf = AutoConfig.for_model(**student)
        assert hf.max_position_embeddings >= 1024


def test_cli_flag_beats_example_file(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[TrainConfig] = []
    monkeypatch.setattr(logitcache.train, "run_train", lambda cfg: seen.append(cfg) or {})
    monkeypatch.chdir(ROOT)
    args = ["train", "--config", "examples/train_small.yaml", "--max-steps", "5"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert seen[0].max_steps == 5 and seen[0].grad_accum == 4
