"""The CLI end to end against s3:// URLs on the loopback S3 server, configured only through the
usual AWS environment variables: dump -> verify -> info -> train (--expect-digest), and the
same dump on local disk has the same content digest."""

# ruff: noqa: F811  (pytest fixtures imported from s3_testing and requested by name)
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from s3_testing import (  # noqa: F401 (fixtures are used by name)
    MotoS3,
    bucket,
    moto_s3,
)

from logitcache.cli import cli

CORPUS = ["The quick brown fox jumps over the lazy dog. ", "Hello world! How are you? ",
          "Sparse targets keep the top k token ids. "]  # fmt: skip


def run(*args: str, ok: bool = True) -> str:
    r = CliRunner().invoke(cli, list(args))
    if ok:
        assert r.exit_code == 0, r.output
        return r.stdout
    assert r.exit_code == 1, r.output
    return r.output


def test_dump_verify_info_train_on_s3_with_env_credentials(
    moto_s3: MotoS3,
    bucket: str,
    tiny_teacher_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for k, v in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": moto_s3.endpoint,
    }.items():
        monkeypatch.setenv(k, v)
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": CORPUS[i % 3] * 3}) + "\n" for i in range(12)))
    common = ["--teacher", str(tiny_teacher_dir), "--data", str(data), "--seq-len", "16",
              "--k", "8", "--shard-mb", "0.002", "--no-count"]  # fmt: skip
    url = f"s3://{bucket}/cache"
    run("dump", *common, "--out", url)
    run("dump", *common, "--out", str(tmp_path / "local"))
    assert "all checksums match" in run("verify", url)
    info = json.loads(run("info", url, "--json"))
    local = json.loads(run("info", str(tmp_path / "local"), "--json"))
    assert info["content_digest"] == local["content_digest"]
    assert info["shards"] > 1
    train = ["train", "--cache", url, "--student", str(tiny_teacher_dir), "--max-steps", "2",
             "--batch-size", "2", "--device", "cpu",
             "--local-cache", str(tmp_path / "lc")]  # fmt: skip
    out = run(*train, "--out", str(tmp_path / "o"), "--expect-digest", info["content_digest"])
    assert json.loads(out.strip().splitlines()[-1])["steps"] == 2
    assert any((tmp_path / "lc").rglob("*"))  # shards were kept locally
    bad = run(*train, "--out", str(tmp_path / "o2"), "--expect-digest", "0" * 64, ok=False)
    assert "expected sha256:000" in bad
    assert "already holds a committed cache" in run("dump", *common, "--out", url, ok=False)
