"""``--loss uld`` on a cache of another tokenizer: rows re-tokenised in the loader, positions
paired by byte offset (data/retokenize.py), a tiny student with its own BPE trains on it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_CORPUS, build_tiny_llama

from logitcache.cli import cli
from logitcache.data import make_loader
from logitcache.data.retokenize import Retokenizer, pair_positions
from logitcache.errors import ConfigError
from logitcache.store import CacheReader
from logitcache.train import TrainConfig, run_train

SEQ, K = 32, 8
OTHER_TEXT = [  # the student's tokenizer learns from other text: its merges differ
    "Students learn from soft labels; the teacher's distribution carries more than a label.",
    "Byte pair encoding merges frequent pairs of symbols into new tokens, again and again.",
    "Quick brown foxes and lazy dogs: a classic sentence that uses every letter once.",
]


def other_bpe(vocab_size: int = 200) -> Any:
    """A genuinely different tokenizer: byte-level BPE trained (deterministically: BPE training
    is a greedy count, no randomness) in memory on other text, with its own ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<eos>", "<pad>"],  # other ids than the teacher's
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(OTHER_TEXT + TINY_CORPUS[:2], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("uld")
    data = root / "docs.jsonl"
    docs = [" ".join(TINY_CORPUS[j % 6] for j in range(i % 4 + 1)) for i in range(24)]
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cache = root / "cache"
    args = ["dump", "--teacher", str(tiny_teacher_dir), "--data", str(data), "--out", str(cache),
            "--seq-len", str(SEQ), "--k", str(K)]  # fmt: skip
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    tok = other_bpe()
    student = root / "student"
    build_tiny_llama(vocab_size=len(tok), seed=3).save_pretrained(student)
    tok.save_pretrained(student)
    return {"cache": cache, "student": student, "tok": tok, "root": root}


def _cfg(s: dict[str, Any], out: Path, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = dict(
        cache=str(s["cache"]),
        out=str(out),
        student=str(s["student"]),
        loss="uld",
        batch_size=4,
        max_steps=12,
        lr=1e-2,
        progress=False,
        log_every=1,
        order="sequential",
    )
    return TrainConfig(**{**base, **kw})


# -- the pairing rule, on hand-built tokenisations --------------------------------------------


def test_pairing_exact_where_boundaries_meet() -> None:
    # text "abcdef": teacher tokens ab|cd|ef, student a|bcd|ef
    i, exact = pair_positions(np.array([0, 2, 4]), np.array([0, 1, 4]))
    # student 0 predicts "bcd" at 1: no teacher boundary at or before 1 after the first token
    # student 1 predicts "ef" at 4: teacher position 1 (after "cd") predicts "ef" at 4, exactly
    assert i.tolist() == [-1, 1] and exact.tolist() == [False, True]


def test_pairing_falls_back_to_the_nearest_earlier_boundary() -> None:
    # teacher abc|def|g (0, 3, 6); student ab|cd|e|fg (0, 2, 4, 5)
    i, exact = pair_positions(np.array([0, 3, 6]), np.array([0, 2, 4, 5]))
    # next starts 2, 4, 5: none <3 -> -1; 4 >= 3 -> teacher 0; 5 -> teacher 0 (6 > 5)
    assert i.tolist() == [-1, 0, 0] and not exact.any()
    same = np.array([0, 1, 3, 7])
    i, exact = pair_positions(same, same)  # identical tokenisations pair one to one, exactly
    assert i.tolist() == [0, 1, 2] and exact.all()


def test_pairing_inside_one_character_is_not_exact() -> None:
    # a byte-level student splits "é" into two tokens sharing its character offset (2)
    i, exact = pair_positions(np.array([0, 2, 4]), np.array([0, 2, 2, 4]))
    assert i.tolist() == [0, 0, 1] and exact.tolist() == [True, False, True]


def test_retokenizer_rows_specials_and_identity(tiny_tokenizer: Any) -> None:
    """Rows with an EOS between documents: the student's EOS takes its place; with the teacher's
    own tokenizer every position pairs exactly with itself."""
    tok = tiny_tokenizer
    eos = tok.eos_token_id
    ids = [*tok(TINY_CORPUS[0], add_special_tokens=False)["input_ids"][:10], eos]
    ids += tok(TINY_CORPUS[2], add_special_tokens=False)["input_ids"][: 16 - len(ids)]
    t_ids = np.array([ids])
    has = np.ones_like(t_ids, dtype=bool)
    same = Retokenizer(tok, tok, 16).rows(t_ids, has)
    assert same.input_ids.tolist() == t_ids.tolist()
    assert same.keep[0, :15].all() and same.src.tolist() == list(range(15))
    assert same.stats.exact == same.stats.paired == 15
    other = other_bpe()
    rows = Retokenizer(tok, other, 40).rows(t_ids, has)
    student_ids = rows.input_ids[0][rows.input_ids[0] != other.pad_token_id]
    text = other.decode(student_ids.tolist())
    assert text == tok.decode(ids)  # the same text, EOS included, in the student's ids
    assert other.eos_token_id in student_ids.tolist()
    assert 0 < rows.stats.paired <= rows.stats.positions
    assert 0 < rows.stats.exact < rows.stats.paired  # some student tokens lie inside teacher's


# -- the loader transform and the trainer ------------------------------------------------------


def test_loader_batches_are_in_the_students_tokens(setup: dict[str, Any]) -> None:
    tok = setup["tok"]
    reader = CacheReader(str(setup["cache"]))
    from logitcache.store.tokenizer import cache_tokenizer

    retok = Retokenizer(cache_tokenizer(reader), tok, 48)
    loader = make_loader(str(setup["cache"]), 4, order="sequential", transform=retok)
    batch = next(iter(loader))
    loader.close()
    # in a worker process (the transform is pickled with the dataset): the same batch
    in_worker = make_loader(str(setup["cache"]), 4, order="sequential", transform=retok,
                            num_workers=1)  # fmt: skip
    other = next(iter(in_worker))
    in_worker.close()
    for key in ("input_ids", "target_index", "target_labels", "logprobs", "tail_logprob"):
        assert torch.equal(batch[key], other[key]), key
    assert batch["input_ids"].shape == (4, 48) and int(batch["input_ids"].max()) < len(tok)
    n = batch["target_index"].numel()
    assert n > 0 and batch["logprobs"].shape == (n, K) and batch["target_labels"].shape == (n,)
    flat, idx = batch["input_ids"].flatten(), batch["target_index"]
    inside = idx % 48 != 47  # a row's last position predicts the first token beyond the cut
    assert (batch["target_labels"][inside] == flat[idx[inside] + 1]).all()


def test_uld_trains_a_student_of_another_tokenizer(
    setup: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    s = run_train(_cfg(setup, tmp_path / "o", student_seq_len=48))
    losses = s["losses"]
    assert all(np.isfinite(losses)) and len(losses) == 12
    assert np.mean(losses[-3:]) < np.mean(losses[:3])  # it learns
    pairing = s["pairing"]
    assert 0.5 < pairing["positions_paired"] <= 1 and 0 < pairing["exact_fraction"] < 1
    err = capsys.readouterr().err
    assert "re-tokenised on the fly" in err and "exactly" in err
    assert (tmp_path / "o" / "final" / "tokenizer.json").exists()


def test_other_losses_keep_the_refusal_and_uld_refuses_id_metrics(
    setup: dict[str, Any], tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="logitcache align"):
        run_train(_cfg(setup, tmp_path / "kl", loss="kl"))
    with pytest.raises(ConfigError, match="held-out metrics"):
        run_train(_cfg(setup, tmp_path / "ev", eval_fraction=0.2))
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        run_train(_cfg(setup, tmp_path / "ctx", student_seq_len=1000))
    # a --teacher-tokenizer that is not the one the cache was dumped with: refused by name
    with pytest.raises(ConfigError, match=r"is not the tokenizer cache .* leave the option out"):
        run_train(_cfg(setup, tmp_path / "tt", teacher_tokenizer=str(setup["student"])))


def test_cli_flags(setup: dict[str, Any], tmp_path: Path) -> None:
    args = ["train", "--cache", str(setup["cache"]), "--out", str(tmp_path / "c"),
            "--student", str(setup["student"]), "--loss", "uld", "--student-tokenizer",
            str(setup["student"]), "--student-seq-len", "40", "--max-steps", "2",
            "--batch-size", "2", "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    last = result.output.strip().splitlines()[-1]
    summary = json.loads(last[last.index('{"steps"') :])  # after transformers' progress bar
    assert summary["pairing"]["positions_paired"] > 0.5
    helptext = CliRunner().invoke(cli, ["train", "--help"]).output
    assert "--student-tokenizer" in helptext and "uld" in helptext
