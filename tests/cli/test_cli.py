"""The info/verify commands through the real click entry point."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from logitcache.cli import cli
from logitcache.format import TopKCodec
from logitcache.format.manifest import SourceInfo, TargetsInfo
from logitcache.format.targets import TopKTargets
from logitcache.store import CacheHeader, CacheWriter


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    url = tmp_path / "c"
    hdr = CacheHeader(
        codec=TopKCodec(k=4, vocab_size=40),
        targets=TargetsInfo(method="topk", k=4),
        seq_len=6,
        vocab_size=40,
        padded_vocab_size=48,
        teacher=SourceInfo(name="tiny-teacher", fingerprint="cd" * 32),
    )
    with CacheWriter(str(url), hdr, shard_bytes=300) as w:
        for b in range(3):
            mask = np.ones((2, 6), bool)
            p = 12
            lp = np.log(np.full((p, 4), 0.2, np.float32))
            ids = np.tile(np.arange(4, dtype=np.int32) * 3, (p, 1))
            t = TopKTargets(ids, lp, np.full(p, np.log(0.2), np.float32), np.zeros((p, 0)))
            w.write(np.arange(2) + 2 * b, rng.integers(0, 40, (2, 6)), mask, t)
    return url


def test_info_text_and_json(cache: Path) -> None:
    r = CliRunner().invoke(cli, ["info", str(cache)])
    assert r.exit_code == 0, r.output
    assert "top-4 + tail mass" in r.output and "tiny-teacher" in r.output
    assert "digest      sha256:" in r.output
    r = CliRunner().invoke(cli, ["info", "--json", str(cache)])
    d = json.loads(r.output)
    assert d["rows"] == 6 and d["tokens"] == 36 and d["shards"] >= 2
    assert d["bytes_per_token"] == pytest.approx(d["bytes"] / 36)


def test_verify_ok_and_damaged(cache: Path) -> None:
    r = CliRunner().invoke(cli, ["verify", str(cache)])
    assert r.exit_code == 0 and "ok: " in r.output
    m = json.loads((cache / "manifest.json").read_text())
    f = cache / max(m["shards"][1]["files"], key=lambda f: f["bytes"])["path"]
    data = bytearray(f.read_bytes())
    data[-5] ^= 1
    f.write_bytes(bytes(data))
    r = CliRunner().invoke(cli, ["verify", str(cache)])
    assert r.exit_code == 1
    assert "error: shard shards/00001.zarr" in r.output and "checksum" in r.output


def test_missing_cache_is_one_line_error(tmp_path: Path) -> None:
    r = CliRunner().invoke(cli, ["info", str(tmp_path / "nothing")])
    assert r.exit_code == 1
    assert r.output.startswith("error: no cache at") and "Traceback" not in r.output


def test_console_script_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "logitcache", "--help"], capture_output=True, text=True, check=True
    )
    assert "verify" in out.stdout and "info" in out.stdout


def test_cli_starts_without_torch() -> None:
    code = "import sys, logitcache.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("command", ["dump", "train", "demo"])
def test_flags_are_projections_of_the_config(command: str) -> None:
    """Every flag's default is its config field's default (unit flags converted), and shown."""
    import dataclasses

    import click

    from logitcache.cli import cli as group
    from logitcache.cli._common import MIB
    from logitcache.demo import DemoConfig
    from logitcache.dump import DumpConfig
    from logitcache.train import TrainConfig

    cmd = group.commands[command]
    config = {"dump": DumpConfig, "train": TrainConfig, "demo": DemoConfig}[command]
    defaults = {
        f.name: f.default
        for f in dataclasses.fields(config)
        if f.default is not dataclasses.MISSING
    }
    shared = {"storage_options"}  # one definition in cli/_common.py, parsed from KEY=VALUE
    params = [p for p in cmd.get_params(click.Context(cmd)) if p.name in set(defaults) - shared]
    assert len(params) >= len(defaults) - 3  # storage_options, queue_depth, progress (dump)
    for p in params:
        want = defaults[p.name]
        got = p.default * MIB if p.name.endswith("_bytes") else p.default
        assert got == (() if want == () else want), p.name
        assert p.help, p.name  # type: ignore[attr-defined]
        if want is not None and want != ():
            assert p.show_default, p.name  # type: ignore[attr-defined]


def test_unit_flags_refuse_nonpositive_values(tmp_path: Path) -> None:
    args = ["dump", "--teacher", "t", "--data", "d", "--out", str(tmp_path), "--seq-len", "8"]
    r = CliRunner().invoke(cli, [*args, "--shard-mb", "-1"])
    assert r.exit_code == 2 and "--shard-mb" in r.output and "must be > 0" in r.output
