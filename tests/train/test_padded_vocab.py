"""A student whose vocabulary is the teacher's padded or truncated trains directly (issue 18);
one whose tokens differ is refused with the suggestion to run `align`.

The losses are checked against dense references: padding columns are part of the student's
softmax (their mass is student mass outside the teacher's ids), and teacher ids a truncated
student lacks move their mass to the tail bucket, at T=1 and at a recorded temperature.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import build_tiny_llama, build_tiny_tokenizer

from logitcache.errors import ConfigError
from logitcache.format import SourceInfo, TargetsInfo, TopKCodec, TopKTargets
from logitcache.format.fingerprint import tokenizer_fingerprint
from logitcache.format.manifest import Coverage, Manifest
from logitcache.loss import SampledTeacher, TopKTeacher, fused_linear_kd_loss, kd_loss
from logitcache.store import CacheHeader, CacheWriter
from logitcache.train import TrainConfig, run_train
from logitcache.train.student import Student, check_compatible

VOCAB, SEQ, K = 96, 16, 16


def _dense_kl(p: torch.Tensor, logq: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """KL of p [n, Vp] and q = softmax [n, Vq] coarsened to ``ids`` + everything else; p is zero
    beyond Vp, q beyond Vq (the dense reference of the tail-bucket loss)."""
    n, v = p.shape[0], max(p.shape[1], logq.shape[1])
    pf = torch.zeros(n, v, dtype=p.dtype).index_copy(1, torch.arange(p.shape[1]), p)
    qf = torch.zeros(n, v, dtype=logq.dtype).index_copy(1, torch.arange(logq.shape[1]), logq.exp())
    sup = torch.zeros(n, v, dtype=torch.bool).scatter(1, ids, True)  # duplicates count once
    inside = torch.where(sup, torch.xlogy(pf, pf) - torch.xlogy(pf, qf), 0.0).sum(1)
    p_t, q_t = (pf * ~sup).sum(1), (qf * ~sup).sum(1)
    return inside + p_t * (p_t.log() - q_t.log())


def _teacher(n: int, vocab: int, k: int, seed: int) -> tuple[torch.Tensor, TopKTeacher]:
    g = torch.Generator().manual_seed(seed)
    lp = torch.log_softmax(torch.randn(n, vocab, generator=g, dtype=torch.float64) * 3, -1)
    top, ids = lp.topk(k, -1)
    tail = lp.scatter(1, ids, float("-inf")).logsumexp(-1)
    return lp, TopKTeacher(ids, top, tail)


def test_padding_columns_are_in_the_student_normaliser() -> None:
    n, pad = 7, 5
    lp, teacher = _teacher(n, VOCAB, K, 0)
    z = torch.randn(n, VOCAB + pad, dtype=torch.float64)
    z[:, VOCAB:] += 3.0  # the padding columns hold a visible share of the student's mass
    z.requires_grad_(True)
    total, count = kd_loss(z, teacher)
    ref = _dense_kl(lp.exp(), torch.log_softmax(z, -1), teacher.ids).sum()
    assert int(count) == n and float(total.detach()) == pytest.approx(float(ref.detach()), rel=1e-9)
    (g,) = torch.autograd.grad(total, z)
    (g_ref,) = torch.autograd.grad(ref, z)
    torch.testing.assert_close(g, g_ref)
    assert bool((g[:, VOCAB:] > 0).all())  # mass on padding is pushed down, not ignored
    # the fused path over a padded head gives the same sum
    h = torch.randn(n, 8, dtype=torch.float64)
    w = torch.randn(VOCAB + pad, 8, dtype=torch.float64)
    fused, _ = fused_linear_kd_loss(h, w, teacher, chunk_size=3)
    plain, _ = kd_loss(h @ w.T, teacher)
    assert float(fused) == pytest.approx(float(plain), rel=1e-9)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_truncated_student_moves_missing_ids_to_the_tail(temperature: float) -> None:
    n, small = 9, 80
    lp, t = _teacher(n, VOCAB, K, 1)
    assert bool((t.ids >= small).any())  # some stored ids are missing from the student
    lognorm = torch.logsumexp(lp / temperature, -1)
    teacher = TopKTeacher(t.ids, t.logprobs, t.tail_logprob, lognorm)
    folded = teacher.within_vocab(small)
    assert int(folded.ids.max()) < small
    z = torch.randn(n, small, dtype=torch.float64, requires_grad=True)
    total, _ = kd_loss(z, folded, temperature=temperature)
    p_t = torch.softmax(lp / temperature, -1)  # the teacher at T over the full vocabulary
    valid = folded.logprobs.isfinite()  # padding entries point at a kept id: no new support
    first = folded.ids.gather(1, valid.long().argmax(1, keepdim=True))
    kept = torch.where(valid, folded.ids, first)
    ref = _dense_kl(p_t, torch.log_softmax(z / temperature, -1), kept).sum()
    assert float(total.detach()) == pytest.approx(temperature**2 * float(ref.detach()), rel=1e-6)
    # without a stored tail the derived tail holds the folded mass too
    no_tail = TopKTeacher(t.ids, t.logprobs).within_vocab(small)
    torch.testing.assert_close(no_tail.tail_logprob, folded.tail_logprob)


def test_sampled_draws_of_missing_ids_weigh_nothing() -> None:
    ids = torch.tensor([[3, 90, 95], [1, 2, 85]])
    counts = torch.tensor([[2, 1, 1], [1, 1, 2]])
    s = SampledTeacher(ids, counts, num_draws=4).within_vocab(80)
    assert s.weights(1.0).tolist() == [[0.5, 0.0, 0.0], [0.25, 0.25, 0.0]]


# -- the compatibility check ------------------------------------------------------------------


def _manifest(vocab: int, tokenizer: Any = None, seq_len: int = SEQ) -> Manifest:
    fp = tokenizer_fingerprint(tokenizer) if tokenizer is not None else None
    header = CacheHeader(
        codec=TopKCodec(k=4, vocab_size=vocab),
        targets=TargetsInfo("topk", k=4),
        seq_len=seq_len,
        vocab_size=vocab,
        padded_vocab_size=vocab,
        tokenizer=SourceInfo("tiny", None, fp),
    )
    return header.manifest((), Coverage())


def _student(vocab: int, tokenizer: Any = None) -> Student:
    return Student(build_tiny_llama(vocab, hidden_size=8, intermediate_size=8), tokenizer, "s")


def test_padded_fit_and_its_note() -> None:
    fit = check_compatible(_student(49_280), _manifest(49_152))
    assert (fit.how, fit.limit) == ("padded", None)
    assert fit.note is not None
    assert fit.note.startswith("student vocab 49,280 = teacher 49,152 + 128 padding: trained")
    same = check_compatible(_student(VOCAB), _manifest(VOCAB))
    assert (same.how, same.note) == ("same", None)


def test_truncated_fit_needs_a_caller_that_folds() -> None:
    with pytest.raises(ConfigError, match=r"dumped with vocab 96 .* has 80 outputs.*tail"):
        check_compatible(_student(80), _manifest(VOCAB))
    fit = check_compatible(_student(80), _manifest(VOCAB), allow_truncated=True)
    assert (fit.how, fit.limit) == ("truncated", 80)
    assert fit.note is not None and "teacher 96 - 16 ids (80..95)" in fit.note


def test_token_strings_are_compared_when_both_tokenizers_are_at_hand() -> None:
    teacher_tok, smaller = build_tiny_tokenizer(300), build_tiny_tokenizer(280)
    m = _manifest(len(teacher_tok), teacher_tok)
    # the same BPE cut at 280 ids: the same tokens for every id it has -> truncated, trained
    fit = check_compatible(
        _student(280, smaller), m, teacher_tokenizer=teacher_tok, allow_truncated=True
    )
    assert fit.how == "truncated"
    # the same tokens, padded head: trained
    padded = check_compatible(_student(320, teacher_tok), m, teacher_tokenizer=teacher_tok)
    assert padded.how == "padded"
    # another tokenizer of the same size: refused, naming the first id that differs; align
    other = _other_tokenizer(len(teacher_tok))
    with pytest.raises(
        ConfigError, match=r"other tokens .*\(id 0 is '<pad>' for the teacher.*logitcache align"
    ):
        check_compatible(_student(320, other), m, teacher_tokenizer=teacher_tok)
    # only the cache's fingerprint: a truncated tokenizer cannot be told apart -> refused
    with pytest.raises(ConfigError, match=r"tokenizer mismatch.*logitcache align"):
        check_compatible(_student(280, smaller), m, allow_truncated=True)
    # the ULD hook: a cross-vocabulary loss compares no ids
    from logitcache.train import student as student_mod

    hooked = frozenset({"kl"})
    old, student_mod.CROSS_VOCAB_LOSSES = student_mod.CROSS_VOCAB_LOSSES, hooked
    try:
        assert check_compatible(_student(50, other), m, loss="kl").how == "cross-vocab"
    finally:
        student_mod.CROSS_VOCAB_LOSSES = old


def _other_tokenizer(vocab: int) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(["zebra quagga " * 50, "other words entirely " * 30], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


# -- the trainer ------------------------------------------------------------------------------


def _cache(url: Path, input_vocab: int, seed: int = 0) -> None:
    """A top-k cache of a random teacher over VOCAB ids; input tokens drawn below input_vocab."""
    rng = np.random.default_rng(seed)
    hdr = CacheHeader(
        codec=TopKCodec(k=K, vocab_size=VOCAB, values="float32"),
        targets=TargetsInfo(method="topk", k=K),
        seq_len=SEQ,
        vocab_size=VOCAB,
        padded_vocab_size=VOCAB,
        teacher=SourceInfo(name="random"),
    )
    rows = 32
    ids = rng.integers(0, input_vocab, (rows, SEQ))
    mask = np.ones((rows, SEQ), bool)
    mask[:, -1] = False
    lp, t = _teacher(int(mask.sum()), VOCAB, K, seed)
    targets = TopKTargets(
        t.ids.int().numpy(),
        t.logprobs.float().numpy(),
        t.tail_logprob.float().numpy(),  # type: ignore[union-attr]
        np.zeros((len(lp), 0), np.float32),
    )
    with CacheWriter(str(url), hdr) as w:
        w.write(np.arange(rows), ids, mask, targets)


def _config(tmp: Path, cache: Path, vocab: int, name: str, **kw: Any) -> TrainConfig:
    import json

    c = tmp / f"{name}.json"
    c.write_text(json.dumps({"model_type": "llama", "vocab_size": vocab, "hidden_size": 16,
                             "intermediate_size": 32, "num_hidden_layers": 1,
                             "num_attention_heads": 2, "num_key_value_heads": 1,
                             "max_position_embeddings": 64}))  # fmt: skip
    return TrainConfig(cache=str(cache), out=str(tmp / name), student_config=str(c),
                       batch_size=4, max_steps=3, progress=False, order="sequential",
                       eval_fraction=0.25, **kw)  # fmt: skip


def test_trainer_padded_and_truncated(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    _cache(tmp_path / "c", input_vocab=80)
    padded = run_train(_config(tmp_path, tmp_path / "c", VOCAB + 4, "padded"))
    assert padded["notes"] == [
        "student vocab 100 = teacher 96 + 4 padding: trained directly (the padding columns are "
        "in the student's softmax: their mass counts as student mass outside the teacher's ids)"
    ]
    assert "note: student vocab 100 = teacher 96 + 4 padding" in capfd.readouterr().err
    plain = run_train(_config(tmp_path, tmp_path / "c", 80, "trunc"))
    fused = run_train(_config(tmp_path, tmp_path / "c", 80, "trunc-fused", fused=True))
    assert "teacher 96 - 16 ids" in plain["notes"][0]
    assert all(np.isfinite(plain["losses"])) and np.isfinite(plain["eval"]["kl"])
    assert fused["losses"] == pytest.approx(plain["losses"], rel=1e-5)


def test_trainer_refuses_an_input_token_the_truncated_student_lacks(tmp_path: Path) -> None:
    _cache(tmp_path / "c", input_vocab=VOCAB)
    with pytest.raises(ConfigError, match=r"row id 0 position 0 .* holds token (8|9)\d, but the "
                       r"student has 80 ids .* at least 96 ids"):  # fmt: skip
        run_train(_config(tmp_path, tmp_path / "c", 80, "trunc"))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


def test_trainer_compares_tokens_with_the_tokenizer_the_cache_stores(
    tmp_path: Path, tiny_teacher_dir: Path
) -> None:
    import json

    from click.testing import CliRunner
    from conftest import TINY_CORPUS

    from logitcache.cli import cli

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in TINY_CORPUS * 2))
    cache = tmp_path / "cache"
    r = CliRunner().invoke(cli, ["dump", "--teacher", str(tiny_teacher_dir), "--data", str(data),
                                 "--out", str(cache), "--seq-len", "32", "--k", "8"])  # fmt: skip
    assert r.exit_code == 0, r.output

    def student(name: str, tok: Any, vocab: int) -> TrainConfig:
        d = tmp_path / name
        build_tiny_llama(vocab, seed=1).save_pretrained(d)
        tok.save_pretrained(d)
        return TrainConfig(cache=str(cache), out=str(tmp_path / f"o-{name}"), student=str(d),
                           batch_size=2, max_steps=2, progress=False)  # fmt: skip

    other = _other_tokenizer(300)
    with pytest.raises(ConfigError, match=r"other tokens than cache .*'s teacher \(id 0 is"):
        run_train(student("other", other, 300))
    # the teacher's BPE cut at 280 ids: its tokens match, so the token check passes and the data
    # (which use ids up to 299) refuse it, naming the first position
    with pytest.raises(ConfigError, match=r"row id \d+ position \d+ .* but the student has 280"):
        run_train(student("cut", build_tiny_tokenizer(280), 280))
    # the teacher's tokenizer in a padded head: trained, with the note
    s = run_train(student("padded", build_tiny_tokenizer(300), 320))
    assert s["notes"][0].startswith("student vocab 320 = teacher 300 + 20 padding: trained")
