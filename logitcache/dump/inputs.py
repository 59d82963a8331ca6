"""Reading and tokenising dump inputs into fixed-length rows.

A dump sees its data as a stream of :class:`Row` objects: ``row_id`` (int64), ``input_ids``
([seq_len] int32) and ``loss_mask`` ([seq_len] bool). The stream is lazy (files are read record by
record, documents tokenised in small batches, the packer holds at most one row plus one document),
so host memory does not grow with the dataset.

Decisions, and why:

- **Mask semantics.** ``loss_mask[t]`` is 1 iff the teacher's prediction *at* position t (the
  distribution over the token at t + 1) is a training target. So ``loss_mask[t] = target[t + 1]``
  where ``target[i]`` says whether token i is something the student should learn to produce (every
  text token; assistant tokens only for chat). The last position of a row is therefore always 0:
  its next token is not in the row, and a hard-label loss at that position would have no label.
  Every masked-in position has its label ``input_ids[t + 1]`` in the same row.
- **Special tokens** (``add_special_tokens``): ``auto`` (default) follows the tokenizer's own
  convention: text is tokenised the way the tokenizer encodes by default, so a tokenizer that puts
  a BOS at the start of every encoding puts one at the start of every document (teachers trained
  with a BOS lose much without it: perplexity 114 without vs 23.5 with on a 262k-vocabulary
  teacher). ``yes``/``no`` force it. Pre-tokenised ids are taken as they are; chat templates bring
  their own tokens. The BOS is context, not a target.
- **Rows that start mid-document.** When special tokens add a BOS, a row that starts inside a
  document (packing, or ``split`` without packing) starts with a BOS too, followed by the next
  ``seq_len - 1`` tokens: the teacher always sees position 0 as it was trained (models that use
  the BOS as an attention sink degrade over the whole row without it), and the student gets the
  same row from the cache. Its first target is predicted from the BOS alone, which is what the
  teacher's distribution there says. Without a BOS, rows are plain cuts, as before.
- **Packing** (default): documents are tokenised (see above), each followed by EOS, concatenated
  and cut into non-overlapping rows of ``seq_len``; the final partial row is right-padded with the
  mask off. A document may straddle two rows; the first token of each row is never a target
  (costs 1/seq_len of the targets, in exchange for rows that are independent). The EOS after a
  text document is a target (the student learns to end documents); the EOS after a chat is a
  plain separator (chat templates end assistant turns with their own end token, which is inside
  the assistant span).
- **No packing**: one document per row, right-padded (pad id: ``pad_id``, the tokenizer's pad, or
  EOS), the mask off on padding. Longer documents are ``split`` (default: the rest continues in the
  next rows, nothing is lost) or ``truncate``\\ d. Right padding needs no attention mask: with
  causal attention no masked-in position can see a pad.
- **Chat masks.** With a template that marks assistant text with ``{% generation %}``, the
  tokenizer's own ``return_assistant_tokens_mask`` is used. Otherwise each assistant turn's
  character span is found by rendering prefixes of the conversation: the turn starts where
  ``render(messages[:i], add_generation_prompt=True)`` ends and ends where
  ``render(messages[:i+1])`` ends (content plus end-of-turn marker); tokens whose first character
  lies in a span are assistant tokens. If a template does not render prefixes as prefixes, we
  refuse rather than guess.
- **Row ids** are 0, 1, 2, ... in stream order (files sorted by name, records in file order). Rows
  with no target at all (e.g. a chat without an assistant turn) are skipped *before* numbering, so
  ids are dense. The same data and options always give the same ids; ranks split rows by id.
- **Pre-tokenised**: an ``input_ids`` column (each row a document, EOS appended if known) or a flat
  ``.npy``/``.bin`` token stream (already one sequence: cut into rows as is, no EOS added; ``.bin``
  needs ``token_dtype``, there is no header to tell it).

Fingerprints: :func:`dataset_fingerprint` hashes a recipe version, the options, and each input
file's name, size and content (sha256; ``quick=True`` uses fsspec's ``ukey`` (path, size, mtime)
instead of reading the bytes). :func:`tokenizer_fingerprint` hashes the tokenizer's full canonical
JSON (vocab, merges, normaliser, pre-tokeniser, added and special tokens) plus the chat template.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from logitcache.dump.chat import render_chat
from logitcache.dump.readers import (
    CONTAINERS,
    DocKind,
    InputSource,
    open_source,
    tokenizer_vocab_size,
)
from logitcache.errors import ConfigError, InputError
from logitcache.format.fingerprint import tokenizer_fingerprint

__all__ = [
    "InputOptions",
    "Row",
    "TokenBatch",
    "dataset_fingerprint",
    "iter_batches",
    "iter_rows",
    "tokenizer_fingerprint",
]

_ROWS_VERSION = 2  # bump when the row recipe changes: it invalidates dataset fingerprints
_TOKENIZE_BATCH = 64


@dataclass(frozen=True)
class InputOptions:
    """How inputs become rows. ``input_format`` overrides the extension (one of CONTAINERS)."""

    seq_len: int
    input_format: str | None = None
    column: str | None = None
    pack: bool = True
    overflow: Literal["split", "truncate"] = "split"
    token_dtype: str | None = None
    append_eos: bool = True
    add_special_tokens: Literal["auto", "yes", "no"] = "auto"
    eos_id: int | None = None
    pad_id: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise ConfigError(
                f"seq_len must be an integer >= 2 (a row needs a position and its next token), "
                f"got {self.seq_len!r}"
            )
        if self.input_format is not None and self.input_format not in CONTAINERS:
            raise ConfigError(
                f"unknown input format {self.input_format!r}; expected one of {sorted(CONTAINERS)}"
            )
        if self.add_special_tokens not in ("auto", "yes", "no"):
            raise ConfigError(
                f"add_special_tokens must be 'auto', 'yes' or 'no', got {self.add_special_tokens!r}"
            )
        if self.overflow not in ("split", "truncate"):
            raise ConfigError(f"overflow must be 'split' or 'truncate', got {self.overflow!r}")
        if self.token_dtype is not None:
            try:
                dt = np.dtype(self.token_dtype)
            except TypeError as e:
                raise ConfigError(f"token_dtype {self.token_dtype!r} is not a numpy dtype") from e
            if dt.kind not in "iu":
                raise ConfigError(f"token_dtype must be an integer dtype, got {self.token_dtype!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, eq=False)
class Row:
    """One fixed-length row: input_ids [seq_len] int32, loss_mask [seq_len] bool."""

    row_id: int
    input_ids: np.ndarray
    loss_mask: np.ndarray


@dataclass(frozen=True, eq=False)
class TokenBatch:
    """Stacked rows: row_ids [B] int64, input_ids [B, S] int32, loss_mask [B, S] bool."""

    row_ids: np.ndarray
    input_ids: np.ndarray
    loss_mask: np.ndarray


def iter_rows(source: str, tokenizer: Any | None, options: InputOptions) -> Iterator[Row]:
    """Stream ``source`` (path, directory, glob or fsspec URL) as rows.

    Checks that can be made without reading everything (data exists, column known, chat template
    present, tokenizer present for text) happen here, before the first row is requested; "empty
    after tokenisation" is raised when the stream ends without a row.
    """
    src = open_source(source, options.input_format, options.column, options.token_dtype)
    if src.kind in (DocKind.TEXT, DocKind.CHAT) and tokenizer is None:
        raise InputError(
            f"{source} holds {src.kind.value} data, which needs a tokenizer, but the teacher has "
            "none; pass a tokenizer or use pre-tokenised input_ids"
        )
    if src.kind is DocKind.CHAT and not getattr(tokenizer, "chat_template", None):
        raise InputError(
            f"{source} holds chat data (column {src.column!r}) but the tokenizer has no chat "
            "template; use a tokenizer with one, or give text data instead"
        )
    if src.kind is DocKind.FLAT and not options.pack:
        raise ConfigError(
            f"{source} is a flat token stream with no document boundaries, so no-pack (one "
            "document per row) is impossible; use packing"
        )
    eos = options.eos_id if options.eos_id is not None else _tok_id(tokenizer, "eos_token_id")
    if eos is None and options.append_eos and src.kind is DocKind.TOKENS:
        raise InputError(
            f"{source}: cannot append EOS after pre-tokenised documents, no eos id is known; "
            "pass eos_id, or append_eos=False"
        )
    pad = options.pad_id
    if pad is None:
        pad = _tok_id(tokenizer, "pad_token_id")
    if pad is None:
        pad = eos if eos is not None else 0
    return _rows(src, tokenizer, options, eos, pad)


def special_tokens(tokenizer: Any | None, setting: str) -> tuple[bool, int | None]:
    """(add the tokenizer's special tokens to text?, the BOS id they start with, if any).

    ``auto`` adds them iff the tokenizer's default encoding differs from the plain one (it adds
    something, a BOS for most that do); ``yes``/``no`` force it."""
    if tokenizer is None or setting == "no":
        return False, None
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    added = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    if setting == "auto" and added == plain:
        return False, None
    bos = added[0] if added and added[: len(plain)] != plain else None
    return True, bos


def _tok_id(tokenizer: Any | None, attr: str) -> int | None:
    value = getattr(tokenizer, attr, None) if tokenizer is not None else None
    return int(value) if value is not None else None


def _rows(
    src: InputSource, tokenizer: Any | None, options: InputOptions, eos: int | None, pad: int
) -> Iterator[Row]:
    seq_len = options.seq_len
    add, bos = special_tokens(tokenizer, options.add_special_tokens)
    if src.kind in (DocKind.TOKENS, DocKind.FLAT):
        add, bos = False, None
    docs = _docs(src, tokenizer, options, eos, add)
    pieces = (
        _pack(docs, seq_len, bos)
        if options.pack
        else _no_pack(docs, seq_len, options.overflow, bos)
    )
    row_id = 0
    for ids, targets in pieces:
        n = len(ids)
        mask = np.zeros(seq_len, dtype=bool)
        mask[: n - 1] = targets[1:n]
        if not mask.any():
            continue
        row_ids = np.full(seq_len, pad, dtype=np.int32)
        row_ids[:n] = ids
        yield Row(row_id, row_ids, mask)
        row_id += 1
    if row_id == 0:
        raise InputError(
            f"{src.description} gave no rows with a training target after tokenisation (empty "
            "documents, or chats without an assistant turn); check the data and the column"
        )


def _docs(
    src: InputSource, tokenizer: Any | None, options: InputOptions, eos: int | None, add: bool
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (ids int64, target bool) per document, EOS appended as documented above."""
    vocab = tokenizer_vocab_size(tokenizer)
    add_eos = options.append_eos and eos is not None
    if src.kind is DocKind.FLAT:
        for chunk in src.records():
            _check_ids(chunk, vocab, src.description)
            yield chunk, np.ones(len(chunk), dtype=bool)
        return
    batch: list[Any] = []
    for value in src.records():
        batch.append(value)
        if len(batch) >= _TOKENIZE_BATCH:
            yield from _tokenize(
                batch, src, tokenizer, options, eos if add_eos else None, vocab, add
            )
            batch = []
    if batch:
        yield from _tokenize(batch, src, tokenizer, options, eos if add_eos else None, vocab, add)


def _tokenize(
    values: list[Any],
    src: InputSource,
    tokenizer: Any,
    options: InputOptions,
    eos: int | None,
    vocab: int | None,
    add: bool,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    docs: list[tuple[np.ndarray, np.ndarray | None]]
    if src.kind is DocKind.TEXT:
        encoded = tokenizer(values, add_special_tokens=add)["input_ids"]
        if add:  # the tokenizer's special tokens are context, not targets
            special = set(getattr(tokenizer, "all_special_ids", ()))
            docs = [
                (e := np.asarray(x, dtype=np.int64), ~np.isin(e, list(special))) for x in encoded
            ]
        else:
            docs = [(np.asarray(e, dtype=np.int64), None) for e in encoded]
    elif src.kind is DocKind.CHAT:
        docs = [render_chat(tokenizer, m, src.description) for m in values]
    else:
        docs = [(np.asarray(v, dtype=np.int64).reshape(-1), None) for v in values]
    for ids, assistant in docs:
        if len(ids) == 0:
            continue
        _check_ids(ids, vocab, src.description)
        targets = np.ones(len(ids), dtype=bool) if assistant is None else assistant
        if eos is not None:
            if src.kind is DocKind.CHAT:
                if options.pack:  # a separator between conversations, not a target
                    ids, targets = np.append(ids, eos), np.append(targets, False)
            elif ids[-1] != eos:
                ids, targets = np.append(ids, eos), np.append(targets, True)
        yield ids, targets


def _check_ids(ids: np.ndarray, vocab: int | None, where: str) -> None:
    if len(ids) == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or (vocab is not None and hi >= vocab):
        raise InputError(
            f"{where}: token ids must lie in [0, {vocab}) (the tokenizer's vocabulary), "
            f"found ids in [{lo}, {hi}]; was the data tokenised with another tokenizer?"
        )


def _pack(
    docs: Iterator[tuple[np.ndarray, np.ndarray]], seq_len: int, bos: int | None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Cut the concatenated documents into rows; with ``bos``, a row that starts inside a
    document gets a BOS and ``seq_len - 1`` tokens (see the module docstring)."""
    ids_buf: list[np.ndarray] = []
    tg_buf: list[np.ndarray] = []
    start_buf: list[np.ndarray] = []  # True where a document starts
    n = 0
    for ids, targets in docs:
        first = np.zeros(len(ids), dtype=bool)
        first[0] = True
        ids_buf.append(ids)
        tg_buf.append(targets)
        start_buf.append(first)
        n += len(ids)
        if n < seq_len:
            continue
        all_ids, all_tg, all_st = (np.concatenate(b) for b in (ids_buf, tg_buf, start_buf))
        pos = 0
        while True:
            prefix = None if bos is None or all_st[pos] else bos
            take = seq_len - (prefix is not None)
            if n - pos < take:
                break
            yield _row_piece(all_ids, all_tg, pos, take, prefix)
            pos += take
        ids_buf, tg_buf, start_buf = [all_ids[pos:]], [all_tg[pos:]], [all_st[pos:]]
        n -= pos
    if n:
        all_ids, all_tg, all_st = (np.concatenate(b) for b in (ids_buf, tg_buf, start_buf))
        prefix = None if bos is None or all_st[0] else bos
        yield _row_piece(all_ids, all_tg, 0, n, prefix)


def _row_piece(
    ids: np.ndarray, tg: np.ndarray, pos: int, take: int, bos: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """``take`` tokens from ``pos``, after a BOS (not a target) when ``bos`` is given."""
    piece_ids, piece_tg = ids[pos : pos + take], tg[pos : pos + take]
    if bos is None:
        return piece_ids, piece_tg
    return np.concatenate([[bos], piece_ids]), np.concatenate([[False], piece_tg])


def _no_pack(
    docs: Iterator[tuple[np.ndarray, np.ndarray]], seq_len: int, overflow: str, bos: int | None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for ids, targets in docs:
        stop = len(ids) if overflow == "split" else min(len(ids), seq_len)
        start = 0
        while start < stop:
            prefix = bos if start else None  # continuation rows start with the BOS
            take = min(seq_len - (prefix is not None), stop - start)
            yield _row_piece(ids, targets, start, take, prefix)
            start += take


def iter_batches(rows: Iterable[Row], batch_size: int) -> Iterator[TokenBatch]:
    """Stack consecutive rows into batches of ``batch_size`` (the last one may be smaller)."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    group: list[Row] = []
    for row in rows:
        group.append(row)
        if len(group) == batch_size:
            yield _stack(group)
            group = []
    if group:
        yield _stack(group)


def _stack(rows: list[Row]) -> TokenBatch:
    return TokenBatch(
        row_ids=np.array([r.row_id for r in rows], dtype=np.int64),
        input_ids=np.stack([r.input_ids for r in rows]),
        loss_mask=np.stack([r.loss_mask for r in rows]),
    )


def dataset_fingerprint(source: str, options: InputOptions, *, quick: bool = False) -> str:
    """sha256 (hex) of the row recipe version, the options and every input file's bytes.

    File names enter without their directory, so moving a dataset keeps its fingerprint.
    ``quick`` hashes fsspec's ``ukey`` (path, size, mtime) instead of the content.
    """
    src = open_source(source, options.input_format, options.column, options.token_dtype)
    h = hashlib.sha256()
    recipe = {
        "rows_version": _ROWS_VERSION,
        "container": src.container,
        "kind": src.kind.value,
        "column": src.column,
        "options": options.to_dict(),
    }
    h.update(json.dumps(recipe, sort_keys=True).encode())
    for path in src.paths:
        h.update(b"\0file\0" + path.rsplit("/", 1)[-1].encode())
        h.update(str(src.fs.size(path)).encode())
        if quick:
            h.update(str(src.fs.ukey(path)).encode())
            continue
        with src.fs.open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()
