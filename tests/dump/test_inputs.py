"""Inputs: rows, masks, packing, chat spans, pre-tokenised data, fingerprints and errors."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from logitcache.dump.inputs import (
    InputOptions,
    dataset_fingerprint,
    iter_batches,
    iter_rows,
    tokenizer_fingerprint,
)
from logitcache.errors import ConfigError, InputError, InputNotFoundError

DOCS = ["The quick brown fox jumps over the lazy dog.", "Hello world!", "", "A teacher model."]
CHATS = [
    [
        {"role": "system", "content": "Be nice."},
        {"role": "user", "content": "Hello world"},
        {"role": "assistant", "content": "I am fine."},
        {"role": "user", "content": "ok"},
        {"role": "assistant", "content": "thank you"},
    ],
    [{"role": "user", "content": "no answer here"}],
    [{"role": "user", "content": "Numbers?"}, {"role": "assistant", "content": "0 1 2 3"}],
]


def _jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _doc_stream(tok: Any, docs: list[str]) -> list[int]:
    out: list[int] = []
    for d in docs:
        ids = tok(d, add_special_tokens=False)["input_ids"]
        if ids:
            out += [*ids, tok.eos_token_id]
    return out


def test_packing_text_jsonl(tmp_path: Path, tiny_tokenizer: Any) -> None:
    src = _jsonl(tmp_path / "d.jsonl", [{"text": d, "id": i} for i, d in enumerate(DOCS)])
    rows = list(iter_rows(str(src), tiny_tokenizer, InputOptions(seq_len=16)))
    stream = _doc_stream(tiny_tokenizer, DOCS)
    assert [r.row_id for r in rows] == list(range(len(rows)))
    assert len(rows) == -(-len(stream) // 16)
    got = np.concatenate([r.input_ids for r in rows])[: len(stream)]
    np.testing.assert_array_equal(got, stream)
    for r in rows:
        assert r.input_ids.dtype == np.int32 and r.loss_mask.dtype == np.bool_
        assert r.input_ids.shape == r.loss_mask.shape == (16,)
        assert not r.loss_mask[-1]  # the label of the last position is not in the row
    n_last = len(stream) - 16 * (len(rows) - 1)
    np.testing.assert_array_equal(rows[-1].loss_mask, np.arange(16) < n_last - 1)
    assert (rows[-1].input_ids[n_last:] == tiny_tokenizer.pad_token_id).all()


def test_txt_paragraphs_and_parquet_column(tmp_path: Path, tiny_tokenizer: Any) -> None:
    (tmp_path / "a.txt").write_text("Hello world!\nline two\n\n\nA teacher model.\n")
    rows = list(iter_rows(str(tmp_path / "a.txt"), tiny_tokenizer, InputOptions(seq_len=64)))
    stream = _doc_stream(tiny_tokenizer, ["Hello world!\nline two", "A teacher model."])
    np.testing.assert_array_equal(rows[0].input_ids[: len(stream)], stream)
    pq.write_table(pa.table({"body": DOCS, "n": [1, 2, 3, 4]}), tmp_path / "b.parquet")
    opts = InputOptions(seq_len=64, column="body")
    rows = list(iter_rows(str(tmp_path / "b.parquet"), tiny_tokenizer, opts))
    stream = _doc_stream(tiny_tokenizer, DOCS)
    np.testing.assert_array_equal(rows[0].input_ids[: len(stream)], stream)


def test_no_pack_split_and_truncate(tmp_path: Path, tiny_tokenizer: Any) -> None:
    src = _jsonl(tmp_path / "d.jsonl", [{"text": d} for d in DOCS])
    docs = [_doc_stream(tiny_tokenizer, [d]) for d in DOCS if d]
    split = list(iter_rows(str(src), tiny_tokenizer, InputOptions(seq_len=8, pack=False)))
    assert len(split) == sum(-(-len(d) // 8) for d in docs)
    first = np.concatenate([r.input_ids for r in split[: -(-len(docs[0]) // 8)]])
    np.testing.assert_array_equal(first[: len(docs[0])], docs[0])
    trunc = list(
        iter_rows(
            str(src), tiny_tokenizer, InputOptions(seq_len=8, pack=False, overflow="truncate")
        )
    )
    assert len(trunc) == len(docs)
    for row, doc in zip(trunc, docs, strict=True):
        n = min(8, len(doc))
        np.testing.assert_array_equal(row.input_ids[:n], doc[:n])
        np.testing.assert_array_equal(row.loss_mask, np.arange(8) < n - 1)


def _assistant_text(tok: Any, rows: list[Any]) -> str:
    """Decode the tokens that masked-in positions predict (label of position t is t + 1)."""
    out = []
    for r in rows:
        idx = np.nonzero(r.loss_mask)[0] + 1
        out.append(tok.decode(r.input_ids[idx].tolist()))
    return "".join(out)


@pytest.mark.parametrize("template", ["prefix", "generation"])
def test_chat_masks_cover_exactly_assistant_spans(
    tmp_path: Path, tiny_tokenizer: Any, template: str
) -> None:
    tok = tiny_tokenizer
    if template == "generation":
        tok = copy.deepcopy(tiny_tokenizer)
        tok.chat_template = (
            "{% for m in messages %}<|{{ m['role'] }}|>{% if m['role'] == 'assistant' %}"
            "{% generation %}{{ m['content'] }}<|end|>{% endgeneration %}"
            "{% else %}{{ m['content'] }}<|end|>{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}"
        )
    src = _jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in CHATS])
    rows = list(iter_rows(str(src), tok, InputOptions(seq_len=256, pack=False)))
    assert len(rows) == 2  # the chat without an assistant turn has no targets: skipped
    assert [r.row_id for r in rows] == [0, 1]
    assert _assistant_text(tok, rows[:1]) == "I am fine.<|end|>thank you<|end|>"
    assert _assistant_text(tok, rows[1:]) == "0 1 2 3<|end|>"
    # exactly: every masked-in label is inside an assistant turn and every assistant token is one
    ids = rows[0].input_ids
    starts = [i for i in range(len(ids)) if ids[i] == tok.convert_tokens_to_ids("<|assistant|>")]
    ends = [i for i in range(len(ids)) if ids[i] == tok.convert_tokens_to_ids("<|end|>")]
    want = np.zeros(256, dtype=bool)
    for s in starts:
        e = min(x for x in ends if x > s)
        want[s:e] = True  # positions s..e-1 predict tokens s+1..e
    np.testing.assert_array_equal(rows[0].loss_mask, want)
    (whole,) = iter_rows(str(src), tok, InputOptions(seq_len=256))
    assert _assistant_text(tok, [whole]) == "I am fine.<|end|>thank you<|end|>0 1 2 3<|end|>"
    # packed into short rows (rows without labels are skipped), a row's labels are a contiguous
    # piece of the assistant text and only the label of a row's first token can be lost
    packed = list(iter_rows(str(src), tok, InputOptions(seq_len=16)))
    full = _assistant_text(tok, [whole])
    assert all(_assistant_text(tok, [r]) in full for r in packed)
    lost = int(whole.loss_mask.sum()) - sum(int(r.loss_mask.sum()) for r in packed)
    assert 0 <= lost <= len(packed)


def test_pretokenised_column_and_flat_files(tmp_path: Path) -> None:
    docs = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    pq.write_table(pa.table({"input_ids": docs}), tmp_path / "t.parquet")
    opts = InputOptions(seq_len=4, eos_id=1)
    rows = list(iter_rows(str(tmp_path / "t.parquet"), None, opts))
    flat = np.concatenate([r.input_ids for r in rows])
    np.testing.assert_array_equal(flat[:12], [5, 6, 7, 1, 8, 9, 1, 10, 11, 12, 13, 1])
    stream = np.arange(2, 2 + 21, dtype=np.uint16)
    np.save(tmp_path / "s.npy", stream)
    stream.tofile(tmp_path / "s.bin")
    for name, dtype in [("s.npy", None), ("s.bin", "uint16")]:
        rows = list(
            iter_rows(str(tmp_path / name), None, InputOptions(seq_len=8, token_dtype=dtype))
        )
        assert len(rows) == 3
        np.testing.assert_array_equal(np.concatenate([r.input_ids for r in rows])[:21], stream)
        np.testing.assert_array_equal(rows[2].loss_mask, np.arange(8) < 4)
    batch = next(iter_batches(rows, 2))
    assert batch.input_ids.shape == (2, 8) and batch.row_ids.tolist() == [0, 1]


def test_fsspec_url_and_directory(tiny_tokenizer: Any, tmp_path: Path) -> None:
    with fsspec.open("memory://lc/d.jsonl", "w") as f:
        f.write("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    rows = list(iter_rows("memory://lc/d.jsonl", tiny_tokenizer, InputOptions(seq_len=16)))
    local = _jsonl(tmp_path / "d.jsonl", [{"text": d} for d in DOCS])
    rows2 = list(iter_rows(str(local.parent), tiny_tokenizer, InputOptions(seq_len=16)))
    assert len(rows) == len(rows2)
    for a, b in zip(rows, rows2, strict=True):
        np.testing.assert_array_equal(a.input_ids, b.input_ids)


def test_errors(tmp_path: Path, tiny_tokenizer: Any) -> None:
    src = _jsonl(tmp_path / "d.jsonl", [{"text": d, "id": 1} for d in DOCS])
    with pytest.raises(InputNotFoundError, match="does not exist"):
        iter_rows(str(tmp_path / "nope.jsonl"), tiny_tokenizer, InputOptions(seq_len=8))
    with pytest.raises(InputError, match=r"unknown column 'body'.*\['text', 'id'\]"):
        iter_rows(str(src), tiny_tokenizer, InputOptions(seq_len=8, column="body"))
    with pytest.raises(ConfigError, match="seq_len"):
        InputOptions(seq_len=1)
    empty = _jsonl(tmp_path / "e.jsonl", [{"text": ""}, {"text": ""}])
    with pytest.raises(InputError, match="no rows"):
        list(iter_rows(str(empty), tiny_tokenizer, InputOptions(seq_len=8)))
    chat = _jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in CHATS])
    no_template = copy.deepcopy(tiny_tokenizer)
    no_template.chat_template = None
    with pytest.raises(InputError, match="no chat template"):
        iter_rows(str(chat), no_template, InputOptions(seq_len=8))
    (tmp_path / "s.bin").write_bytes(b"\0" * 8)
    with pytest.raises(InputError, match="token_dtype"):
        iter_rows(str(tmp_path / "s.bin"), None, InputOptions(seq_len=8))
    with pytest.raises(InputError, match="tokenizer"):
        iter_rows(str(src), None, InputOptions(seq_len=8))
    big = _jsonl(tmp_path / "big.jsonl", [{"input_ids": [1, 2, 99999]}])
    with pytest.raises(InputError, match="token ids must lie"):
        list(iter_rows(str(big), tiny_tokenizer, InputOptions(seq_len=8)))


def test_dataset_fingerprint(tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "d.jsonl", [{"text": d} for d in DOCS])
    fp = dataset_fingerprint(str(src), InputOptions(seq_len=16))
    assert fp == dataset_fingerprint(str(src), InputOptions(seq_len=16))
    assert fp != dataset_fingerprint(str(src), InputOptions(seq_len=32))
    assert fp != dataset_fingerprint(str(src), InputOptions(seq_len=16, pack=False))
    quick = dataset_fingerprint(str(src), InputOptions(seq_len=16), quick=True)
    _jsonl(src, [{"text": d} for d in reversed(DOCS)])
    assert fp != dataset_fingerprint(str(src), InputOptions(seq_len=16))
    assert len(quick) == 64


def test_tokenizer_fingerprint_stable_across_processes(
    tiny_tokenizer: Any, tiny_teacher_dir: Path
) -> None:
    fp = tokenizer_fingerprint(tiny_tokenizer)
    code = (
        "from transformers import AutoTokenizer; from logitcache.dump.inputs import "
        f"tokenizer_fingerprint; print(tokenizer_fingerprint(AutoTokenizer.from_pretrained("
        f"{str(tiny_teacher_dir)!r})))"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == fp
    changed = copy.deepcopy(tiny_tokenizer)
    changed.chat_template = "{{ messages }}"
    assert tokenizer_fingerprint(changed) != fp


def _bos_tokenizer(tiny_tokenizer: Any) -> tuple[Any, int]:
    """The tiny tokenizer, made to put a BOS (here ``<|system|>``) at the start of every
    encoding, as Llama/Gemma tokenizers do."""
    from tokenizers import processors

    tok = copy.deepcopy(tiny_tokenizer)
    bos = tok.convert_tokens_to_ids("<|system|>")
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|system|> $A", special_tokens=[("<|system|>", bos)]
    )
    tok.bos_token = "<|system|>"
    assert tok("a")["input_ids"][0] == bos
    return tok, bos


@pytest.mark.parametrize("pack", [True, False])
def test_special_tokens_follow_the_tokenizer(
    tmp_path: Path, tiny_tokenizer: Any, pack: bool
) -> None:
    """auto: a tokenizer that adds a BOS gets one at every document start and at the start of
    every row that begins inside a document; the BOS is never a target (#14.3)."""
    tok, bos = _bos_tokenizer(tiny_tokenizer)
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": d * 3}) + "\n" for d in DOCS))
    rows = list(iter_rows(str(src), tok, InputOptions(seq_len=12, pack=pack)))
    assert all(r.input_ids[0] == bos for r in rows)
    for r in rows:
        at_bos = np.nonzero(r.input_ids[1:] == bos)[0]  # positions predicting a BOS
        assert not r.loss_mask[at_bos].any()
    docs = [d for d in DOCS if d]
    assert sum(int((r.input_ids == bos).sum()) for r in rows) >= len(docs)
    plain = list(
        iter_rows(str(src), tok, InputOptions(seq_len=12, pack=pack, add_special_tokens="no"))
    )
    assert not any((r.input_ids == bos).any() for r in plain)
    # the tiny tokenizer adds nothing: auto == no there, and the rows are the plain cuts
    auto = list(iter_rows(str(src), tiny_tokenizer, InputOptions(seq_len=12, pack=pack)))
    assert [r.input_ids.tolist() for r in auto] == [r.input_ids.tolist() for r in plain]


def test_special_tokens_setting_is_part_of_the_fingerprint(tmp_path: Path) -> None:
    src = tmp_path / "d.jsonl"
    src.write_text(json.dumps({"text": "hello"}) + "\n")
    fps = {
        dataset_fingerprint(str(src), InputOptions(seq_len=8, add_special_tokens=v))
        for v in ("auto", "yes", "no")
    }
    assert len(fps) == 3
    with pytest.raises(ConfigError, match="add_special_tokens"):
        InputOptions(seq_len=8, add_special_tokens="maybe")  # type: ignore[arg-type]
