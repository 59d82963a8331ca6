"""``logitcache mix``: the mixed cache against the exact mixture of full distributions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from synth import log_softmax

from logitcache.cli import cli
from logitcache.errors import ConfigError
from logitcache.format import SampledCodec, SourceInfo, TargetsInfo, TopKCodec
from logitcache.format.targets import SampledTargets, TopKTargets
from logitcache.store import CacheHeader, CacheReader, CacheWriter
from logitcache.transform.mix import mix_caches

VOCAB, SEQ, ROWS = 40, 6, 9


def _full(seed: int) -> np.ndarray:
    """Log-probs [ROWS * SEQ, VOCAB] of a peaked random teacher (every position is a target)."""
    rng = np.random.default_rng(seed)
    return log_softmax(rng.standard_normal((ROWS * SEQ, VOCAB)) * 3.0)


def _topk(lp: np.ndarray, k: int) -> TopKTargets:
    ids = np.argsort(-lp, axis=1)[:, :k]
    top = np.take_along_axis(lp, ids, axis=1)
    tail = np.log(np.clip(1 - np.exp(top).sum(axis=1), 1e-30, None))
    if k == VOCAB:
        tail = np.full(len(lp), -np.inf)
    return TopKTargets(
        ids.astype(np.int32),
        top.astype(np.float32),
        tail.astype(np.float32),
        np.zeros((len(lp), 0), np.float32),
    )


def _write(url: Path, lp: np.ndarray, k: int, order: np.ndarray | None = None, name: str = "t"):
    tokens = np.random.default_rng(7).integers(0, VOCAB, (ROWS, SEQ))
    order = np.arange(ROWS) if order is None else order
    pos = (order[:, None] * SEQ + np.arange(SEQ)).reshape(-1)
    header = CacheHeader(
        codec=TopKCodec(k=k, vocab_size=VOCAB, values="float32"),
        targets=TargetsInfo("topk", k=k),
        seq_len=SEQ,
        vocab_size=VOCAB,
        padded_vocab_size=VOCAB,
        teacher=SourceInfo(name=name),
    )
    with CacheWriter(str(url), header) as w:
        w.write(order, tokens[order], np.ones((ROWS, SEQ), np.uint8), _topk(lp[pos], k))


def _cache_probs(url: Path) -> tuple[np.ndarray, np.ndarray]:
    """Dense probabilities [P, VOCAB] of the cache's entries (rows by id) and the tails."""
    reader = CacheReader(str(url))
    dense = np.zeros((ROWS * SEQ, VOCAB))
    tails = np.zeros(ROWS * SEQ)
    for rows in reader.iter_rows():
        t = rows.targets
        assert isinstance(t, TopKTargets)
        pos = (rows.row_id[:, None] * SEQ + np.arange(SEQ)).reshape(-1)
        for i, p in enumerate(pos):
            dense[p, t.ids[i]] += np.exp(t.logprobs[i])
        tails[pos] = np.exp(t.tail_logprob)
    return dense, tails


def test_full_distributions_mix_exactly(tmp_path: Path) -> None:
    a, b = _full(1), _full(2)
    _write(tmp_path / "a", a, VOCAB, name="A")
    _write(tmp_path / "b", b, VOCAB, order=np.arange(ROWS)[::-1].copy(), name="B")  # other order
    res = mix_caches(str(tmp_path / "m"), [str(tmp_path / "a"), str(tmp_path / "b")], [0.7, 0.3])
    dense, tails = _cache_probs(tmp_path / "m")
    exact = 0.7 * np.exp(a) + 0.3 * np.exp(b)
    assert np.abs(dense - exact).max() < 1e-5 and np.abs(tails).max() < 1e-6
    assert res.manifest.teacher.name == "mix(A:0.7, B:0.3)"
    assert [s["content_digest"] for s in res.manifest.extra["mix"]["sources"]] == [
        CacheReader(str(tmp_path / u)).manifest.content_digest for u in ("a", "b")
    ]


def test_topk_mix_is_close_to_the_exact_mixture(tmp_path: Path) -> None:
    a, b = _full(1), _full(2)
    k = 12
    _write(tmp_path / "a", a, k)
    _write(tmp_path / "b", b, k)
    res = mix_caches(str(tmp_path / "m"), [str(tmp_path / "a"), str(tmp_path / "b")])
    dense, tails = _cache_probs(tmp_path / "m")
    exact = 0.5 * np.exp(a) + 0.5 * np.exp(b)
    # the tail-bucket KL a student sees: the exact mixture coarsened onto the stored ids + bucket
    stored = dense > 0
    p_in = np.where(stored, exact, 0.0)
    p_tail = 1 - p_in.sum(axis=1)
    kl = (np.where(stored, p_in * np.log(np.where(stored, p_in / np.where(stored, dense, 1), 1)), 0)
          .sum(axis=1) + p_tail * np.log(p_tail / tails))  # fmt: skip
    assert np.allclose(dense.sum(axis=1) + tails, 1.0, atol=1e-5)
    assert kl.mean() < 0.05  # ids missing from one source are its tail, not exact
    assert res.moved_mass > 0  # the union (up to 24 ids) was re-cut to 12


def test_refusals(tmp_path: Path) -> None:
    a = _full(1)
    _write(tmp_path / "a", a, 8)
    _write(tmp_path / "b", a, 8)
    with pytest.raises(ConfigError, match="--weights has 1 values for 2 caches"):
        mix_caches(str(tmp_path / "m"), [str(tmp_path / "a"), str(tmp_path / "b")], [1.0])
    # other tokens in one source: refused naming the row
    header = CacheHeader(
        codec=TopKCodec(k=8, vocab_size=VOCAB, values="float32"),
        targets=TargetsInfo("topk", k=8),
        seq_len=SEQ,
        vocab_size=VOCAB,
        padded_vocab_size=VOCAB,
    )
    with CacheWriter(str(tmp_path / "c"), header) as w:
        w.write(np.arange(ROWS), np.zeros((ROWS, SEQ), int), np.ones((ROWS, SEQ), np.uint8),
                _topk(a, 8))  # fmt: skip
    with pytest.raises(ConfigError, match="row 0 has other tokens"):
        mix_caches(str(tmp_path / "m"), [str(tmp_path / "a"), str(tmp_path / "c")])
    sampled = CacheHeader(
        codec=SampledCodec(samples=4, vocab_size=VOCAB),
        targets=TargetsInfo("sampled", samples=4, tail="none"),
        seq_len=SEQ,
        vocab_size=VOCAB,
        padded_vocab_size=VOCAB,
    )
    p = ROWS * SEQ
    with CacheWriter(str(tmp_path / "s"), sampled) as w:
        one = np.ones(p, np.int32)
        t = SampledTargets(one, 0 * one, 4 * one, None, np.zeros((p, 0), np.float32))
        w.write(np.arange(ROWS), np.zeros((ROWS, SEQ), int), np.ones((ROWS, SEQ), np.uint8), t)
    with pytest.raises(ConfigError, match="sampled targets"):
        mix_caches(str(tmp_path / "m"), [str(tmp_path / "a"), str(tmp_path / "s")])


def test_cli_mix(tmp_path: Path) -> None:
    _write(tmp_path / "a", _full(1), 8)
    _write(tmp_path / "b", _full(2), 8)
    out = tmp_path / "m"
    r = CliRunner().invoke(
        cli, ["mix", str(out), str(tmp_path / "a"), str(tmp_path / "b"), "--weights", "0.7,0.3"]
    )
    assert r.exit_code == 0, r.output
    assert "mixed 2 caches" in r.output and CacheReader(str(out)).manifest.targets.k == 8
    r = CliRunner().invoke(cli, ["mix", str(tmp_path / "x"), str(tmp_path / "a")])
    assert r.exit_code == 1 and "at least two caches" in r.output
