"""``align`` with the cache's own tokenizer (format 1.3), and its batched rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from test_align import _teacher_cache, tokenizers  # noqa: F401 (a fixture)

from logitcache.cli import cli
from logitcache.errors import ConfigError
from logitcache.format.fingerprint import tokenizer_fingerprint
from logitcache.format.targets import TopKTargets
from logitcache.store import CacheReader
from logitcache.store.tokenizer import cache_tokenizer, tokenizer_files
from logitcache.transform._align_rows import RowAligner, Stats
from logitcache.transform._tokens import IdMap, token_bytes
from logitcache.transform.align import ALIGN_COMPRESSION_LEVEL, align_cache


def _with_tokenizer(url: Path, tok: Any) -> None:
    """Give a cache written without its tokenizer the files a 1.3 dump stores (the writer's
    own commit path, so the manifest lists them exactly as a dump does)."""
    from logitcache.store import CacheHeader, CacheWriter

    src = CacheReader(str(url))
    m = src.manifest
    header = CacheHeader(
        codec=m.codec, targets=m.targets, seq_len=m.seq_len, vocab_size=m.vocab_size,
        padded_vocab_size=m.padded_vocab_size, tokenizer=m.tokenizer,
    )  # fmt: skip
    rows = src.read_rows(0, src.num_rows)
    with CacheWriter(str(url) + "-1.3", header, tokenizer_files=tokenizer_files(tok)) as w:
        w.write(rows.row_id, rows.input_ids, rows.loss_mask, rows.targets)


def test_align_uses_the_cache_tokenizer(tmp_path: Path, tokenizers: dict) -> None:  # noqa: F811
    teacher, student = tokenizers["teacher"], tokenizers["student"]
    _teacher_cache(tmp_path / "c", teacher)
    _with_tokenizer(tmp_path / "c", teacher)
    s_dir = str(tokenizers["root"] / "student")
    given = align_cache(str(tmp_path / "c"), str(tmp_path / "a"), student_tokenizer=s_dir,
                        teacher_tokenizer=str(tokenizers["root"] / "teacher"))  # fmt: skip
    r = CliRunner().invoke(
        cli, ["align", str(tmp_path / "c-1.3"), "--student-tokenizer", s_dir, "--out",
              str(tmp_path / "b")],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    a, b = CacheReader(str(tmp_path / "a")), CacheReader(str(tmp_path / "b"))
    assert a.manifest.content_digest == b.manifest.content_digest  # the same aligned cache
    assert b.manifest.compression["level"] == ALIGN_COMPRESSION_LEVEL
    assert given.manifest.extra["align"]["positions_covered"] > 0.2
    # the aligned cache stores the student's tokenizer, so it is self-describing too
    assert tokenizer_fingerprint(cache_tokenizer(str(tmp_path / "b"))) == tokenizer_fingerprint(
        student
    )
    # --teacher-tokenizer on a cache that has one is still checked against its fingerprint
    with pytest.raises(ConfigError, match="leave the option out"):
        align_cache(str(tmp_path / "c-1.3"), str(tmp_path / "x"), student_tokenizer=s_dir,
                    teacher_tokenizer=s_dir)  # fmt: skip


def test_old_cache_asks_for_the_teacher_tokenizer(tmp_path: Path, tokenizers: dict) -> None:  # noqa: F811
    _teacher_cache(tmp_path / "c", tokenizers["teacher"])  # written without tokenizer files
    assert "files" not in json.loads((tmp_path / "c" / "manifest.json").read_text())["tokenizer"]
    s_dir = str(tokenizers["root"] / "student")
    with pytest.raises(ConfigError, match=r"stores no tokenizer.*--teacher-tokenizer"):
        align_cache(str(tmp_path / "c"), str(tmp_path / "a"), student_tokenizer=s_dir)
    r = CliRunner().invoke(
        cli, ["align", str(tmp_path / "c"), "--student-tokenizer", s_dir, "--out",
              str(tmp_path / "a")],
    )  # fmt: skip
    assert r.exit_code == 1 and "--teacher-tokenizer" in r.output


def test_batched_rows_equal_row_by_row(tmp_path: Path, tokenizers: dict) -> None:  # noqa: F811
    teacher, student = tokenizers["teacher"], tokenizers["student"]
    _teacher_cache(tmp_path / "c", teacher)
    reader = CacheReader(str(tmp_path / "c"))
    t_bytes = token_bytes(teacher)
    idmap = IdMap.build(teacher, student, t_bytes)

    def run(batches: list[tuple[int, int]]) -> tuple[np.ndarray, ...]:
        aligner = RowAligner(student, t_bytes, idmap, 24, 12, Stats())
        outs = [aligner.rows(reader.read_rows(lo, hi)) for lo, hi in batches]
        t = [o[3] for o in outs if o is not None]
        assert all(isinstance(x, TopKTargets) for x in t)
        return (
            *(np.concatenate([o[i] for o in outs if o is not None]) for i in range(3)),
            np.concatenate([x.ids for x in t]),
            np.concatenate([x.logprobs for x in t]),
            np.concatenate([x.tail_logprob for x in t]),
        )

    n = reader.num_rows
    whole = run([(0, n)])
    one_by_one = run([(i, i + 1) for i in range(n)])
    for x, y in zip(whole, one_by_one, strict=True):
        np.testing.assert_array_equal(x, y)
    assert len(np.unique(whole[0])) > n  # seq_len 24 < 32: rows continue in a second part
