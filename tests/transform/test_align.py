"""``logitcache align``: a cache re-expressed in another tokenizer's vocabulary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TINY_CORPUS, build_tiny_tokenizer
from synth import log_softmax

from logitcache.cli import cli
from logitcache.errors import ConfigError
from logitcache.format import SourceInfo, TargetsInfo, TopKCodec
from logitcache.format.fingerprint import tokenizer_fingerprint
from logitcache.format.targets import TopKTargets
from logitcache.store import CacheHeader, CacheReader, CacheWriter
from logitcache.transform._align_rows import project
from logitcache.transform._tokens import IdMap, token_bytes
from logitcache.transform.align import MAX_PARTS, align_cache

SEQ, K = 32, 12


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("toks")
    teacher, student = build_tiny_tokenizer(300), build_tiny_tokenizer(180)
    teacher.save_pretrained(root / "teacher")
    student.save_pretrained(root / "student")
    return {"teacher": teacher, "student": student, "root": root}


def _teacher_cache(url: Path, tok: Any, seed: int = 0) -> tuple[np.ndarray, TopKTargets]:
    """Rows of packed corpus text (EOS between documents), random peaked targets everywhere but
    the last position of a row."""
    ids: list[int] = []
    for doc in TINY_CORPUS * 3:
        ids += tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    rows = len(ids) // SEQ
    tokens = np.asarray(ids[: rows * SEQ]).reshape(rows, SEQ)
    mask = np.ones((rows, SEQ), np.uint8)
    mask[:, -1] = 0
    p = int(mask.sum())
    rng = np.random.default_rng(seed)
    lp = log_softmax(rng.standard_normal((p, len(tok))) * 3)
    top = np.argsort(-lp, axis=1)[:, :K]
    vals = np.take_along_axis(lp, top, axis=1)
    rest = np.log(1 - np.exp(vals).sum(axis=1))
    t = TopKTargets(top.astype(np.int32), vals.astype(np.float32), rest.astype(np.float32),
                    np.zeros((p, 0), np.float32))  # fmt: skip
    header = CacheHeader(
        codec=TopKCodec(k=K, vocab_size=len(tok), values="float32"),
        targets=TargetsInfo("topk", k=K),
        seq_len=SEQ,
        vocab_size=len(tok),
        padded_vocab_size=len(tok),
        tokenizer=SourceInfo("teacher", None, tokenizer_fingerprint(tok)),
    )
    with CacheWriter(str(url), header) as w:
        w.write(np.arange(rows), tokens, mask, t)
    return tokens, t


def test_token_bytes_rebuild_the_text(tokenizers: dict[str, Any]) -> None:
    tok = tokenizers["teacher"]
    table = token_bytes(tok)
    text = "Héllo wörld! def add(a, b): return a + b"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert b"".join(table[i] or b"" for i in ids).decode() == text
    assert table[tok.eos_token_id] is None


def test_identity_alignment_gives_back_the_targets(tmp_path: Path, tokenizers: dict) -> None:
    tok = tokenizers["teacher"]
    tokens, _ = _teacher_cache(tmp_path / "c", tok)
    d = str(tokenizers["root"] / "teacher")
    res = align_cache(str(tmp_path / "c"), str(tmp_path / "a"), student_tokenizer=d,
                      teacher_tokenizer=d)  # fmt: skip
    assert res.exact_id_fraction > 0.97  # all but the special tokens are strings of themselves
    assert res.positions_covered > 0.9  # re-tokenising the rows' text gives the same tokens
    assert res.projected_mass > 0.99
    src = CacheReader(str(tmp_path / "c"))
    out = CacheReader(str(tmp_path / "a"))
    assert out.manifest.extra["align"]["source_digest"] == src.manifest.content_digest
    same = 0
    for rows in out.iter_rows():
        for r in range(rows.num_rows):
            teacher_row = int(rows.row_id[r]) // MAX_PARTS
            if not np.array_equal(rows.input_ids[r], tokens[teacher_row]):
                continue  # a row whose text re-tokenised differently at its edges
            same += 1
            lo, hi = rows.position_offsets[r], rows.position_offsets[r + 1]
            got = rows.targets
            assert isinstance(got, TopKTargets)
            src_rows = src.read_rows(teacher_row, teacher_row + 1)
            want = src_rows.targets
            assert isinstance(want, TopKTargets)
            for j in range(hi - lo):
                g_order = np.argsort(got.ids[lo + j])
                w_order = np.argsort(want.ids[j])
                assert np.array_equal(got.ids[lo + j][g_order], want.ids[j][w_order])
                np.testing.assert_allclose(
                    got.logprobs[lo + j][g_order], want.logprobs[j][w_order], atol=1e-5
                )
    assert same >= 0.8 * len(tokens)


def test_other_tokenizer(tmp_path: Path, tokenizers: dict) -> None:
    _teacher_cache(tmp_path / "c", tokenizers["teacher"])
    res = align_cache(
        str(tmp_path / "c"),
        str(tmp_path / "a"),
        student_tokenizer=str(tokenizers["root"] / "student"),
        teacher_tokenizer=str(tokenizers["root"] / "teacher"),
    )
    m = CacheReader(str(tmp_path / "a")).manifest
    assert m.vocab_size == len(tokenizers["student"])
    assert m.tokenizer.fingerprint == tokenizer_fingerprint(tokenizers["student"])
    assert m.extra["align"]["positions_covered"] == res.positions_covered  # recorded
    assert 0.2 < res.positions_covered < 1.0  # a smaller vocabulary splits some words
    assert res.projected_mass > 0.9
    for rows in CacheReader(str(tmp_path / "a")).iter_rows():
        t = rows.targets
        assert isinstance(t, TopKTargets)
        total = np.exp(t.logprobs.astype(np.float64)).sum(axis=1) + np.exp(t.tail_logprob)
        np.testing.assert_allclose(total, 1.0, atol=1e-4)
        labels = np.where(rows.loss_mask[:, :-1], rows.input_ids[:, 1:], -1)
        hard = np.isclose(t.logprobs[:, :].max(axis=1), 0.0, atol=1e-6)
        # a hard-label-only position holds the true next token with probability 1
        flat = labels[rows.loss_mask[:, :-1].astype(bool)]
        assert np.all(t.ids[hard].max(axis=1) >= 0)
        assert np.all(np.isin(flat[hard], t.ids[hard]))


def test_projection_sums_equal_ids_and_sends_unmapped_mass_to_the_tail() -> None:
    to = np.array([0, 0, 1, -1])  # teacher ids 0 and 1 both start with student token 0
    ids = np.array([[0, 1, 2, 3]])
    lp = np.log(np.array([[0.4, 0.3, 0.1, 0.1]]))
    p_ids, p_lp, p_tail, mass = project(ids, lp, np.log(np.array([0.1])), to)
    got: dict[int, float] = {}
    for i, q in zip(p_ids[0].tolist(), np.exp(p_lp[0]).tolist(), strict=True):
        got[i] = got.get(i, 0.0) + q  # padding entries (id 0, zero mass) add nothing
    assert got[0] == pytest.approx(0.7) and got[1] == pytest.approx(0.1)
    assert np.exp(p_tail[0]) == pytest.approx(0.2) and mass[0] == pytest.approx(0.8)


def test_id_map_exact_and_first_token(tokenizers: dict) -> None:
    t, s = tokenizers["teacher"], tokenizers["student"]
    m = IdMap.build(t, s, token_bytes(t))
    s_bytes = token_bytes(s)
    t_bytes = token_bytes(t)
    for i in np.flatnonzero(m.exact)[:50]:
        if t_bytes[i] is not None:
            assert s_bytes[m.to_student[i]] == t_bytes[i]
    assert m.to_student[t.eos_token_id] == s.eos_token_id


def test_refusals_and_cli(tmp_path: Path, tokenizers: dict) -> None:
    _teacher_cache(tmp_path / "c", tokenizers["teacher"])
    with pytest.raises(ConfigError, match="is not the tokenizer cache"):
        align_cache(str(tmp_path / "c"), str(tmp_path / "x"),
                    student_tokenizer=str(tokenizers["root"] / "student"),
                    teacher_tokenizer=str(tokenizers["root"] / "student"))  # fmt: skip
    r = CliRunner().invoke(
        cli,
        ["align", str(tmp_path / "c"), "--student-tokenizer", str(tokenizers["root"] / "student"),
         "--teacher-tokenizer", str(tokenizers["root"] / "teacher"), "--out", str(tmp_path / "a")],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "hard label" in r.output
