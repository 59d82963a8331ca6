"""Tokens as bytes: what ``align`` needs to put two tokenisations of one text side by side.

Every id of a tokenizer is a byte string: byte-level BPE tokens through the GPT-2 byte alphabet
(printable stand-ins for the 256 bytes), SentencePiece pieces with ``▁`` for a space and
``<0xNN>`` byte fallback, else the token decoded alone. Special tokens are not text (None).
:class:`IdMap` maps a teacher id to the student id of the first token of its string.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from logitcache.errors import ConfigError

__all__ = ["IdMap", "char_to_byte", "encode", "load_tokenizer", "token_bytes", "valid_utf8"]

_SPECIAL_ROLES = ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token")


def _byte_decoder() -> dict[str, int]:
    """The GPT-2 byte alphabet, inverted: printable stand-in character -> byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def _decoder_kinds(tok: Any) -> set[str]:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return set()
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return {str(p.get("type")) for p in parts if isinstance(p, dict)}


def token_bytes(tok: Any) -> list[bytes | None]:
    """The byte string of every id of ``tok`` (None for special tokens, which are not text)."""
    n = len(tok)
    pieces = tok.convert_ids_to_tokens(list(range(n)))
    special = set(tok.all_special_ids)
    kinds = _decoder_kinds(tok)
    out: list[bytes | None] = []
    if "ByteLevel" in kinds:
        table = _byte_decoder()
        for i, piece in enumerate(pieces):
            if i in special or piece is None:
                out.append(None)
            elif all(c in table for c in piece):
                out.append(bytes(table[c] for c in piece))
            else:  # an added token written as plain text
                out.append(piece.encode())
        return out
    for i, piece in enumerate(pieces):
        if i in special or piece is None:
            out.append(None)
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out.append(bytes([int(piece[3:5], 16)]))
        elif "Metaspace" in kinds or "Replace" in kinds or "▁" in piece:
            out.append(piece.replace("▁", " ").encode())
        else:
            out.append(tok.decode([i]).encode())
    return out


@dataclass(frozen=True, eq=False)
class IdMap:
    """Teacher id -> student id of the first token of its string (-1: maps nowhere)."""

    to_student: np.ndarray  # int64 [teacher vocab]
    exact: np.ndarray  # bool [teacher vocab]: the string is a student token

    @classmethod
    def build(cls, teacher: Any, student: Any, teacher_bytes: list[bytes | None]) -> IdMap:
        student_bytes = token_bytes(student)
        index: dict[bytes, int] = {}
        for j, b in enumerate(student_bytes):
            if b is not None:
                index.setdefault(b, j)
        n = len(teacher_bytes)
        to = np.full(n, -1, dtype=np.int64)
        exact = np.zeros(n, dtype=bool)
        pending: list[int] = []
        for i, b in enumerate(teacher_bytes):
            if b is None:
                continue
            match = index.get(b)
            if match is not None:
                to[i], exact[i] = match, True
            else:
                pending.append(i)
        texts = []
        for i in pending:
            try:
                texts.append(teacher_bytes[i].decode())  # type: ignore[union-attr]
            except UnicodeDecodeError:
                texts.append("")  # a lone byte of a split character: maps nowhere
        if texts:
            for i, ids in zip(pending, encode(student, texts)[0], strict=True):
                if len(ids):
                    to[i] = ids[0]
        for role in _SPECIAL_ROLES:
            t_id, s_id = _special_id(teacher, role), _special_id(student, role)
            if t_id is not None and s_id is not None:
                to[t_id], exact[t_id] = s_id, True
        return cls(to, exact)


def _special_id(tok: Any, role: str) -> int | None:
    value = getattr(tok, f"{role}_id", None)
    return int(value) if isinstance(value, int) else None


def load_tokenizer(path: str, what: str) -> Any:
    try:
        from transformers import AutoTokenizer

        gguf = [f for f in os.listdir(path) if f.endswith(".gguf")] if os.path.isdir(path) else []
        if gguf and not os.path.exists(os.path.join(path, "tokenizer.json")):
            return AutoTokenizer.from_pretrained(path, gguf_file=gguf[0])
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, ImportError) as e:
        raise ConfigError(f"{what} {path}: cannot load it as a tokenizer ({e})") from e


def load_teacher_tokenizer(reader: Any, path: str) -> Any:
    """The tokenizer at ``path`` (``--teacher-tokenizer``), refused unless it is the one cache
    ``reader`` (open) was dumped with, by the fingerprint its manifest records."""
    from logitcache.format.fingerprint import tokenizer_fingerprint

    tok = load_tokenizer(path, "--teacher-tokenizer")
    want = reader.manifest.tokenizer
    got = tokenizer_fingerprint(tok)
    if want.fingerprint and got != want.fingerprint:
        raise ConfigError(
            f"--teacher-tokenizer {path} is not the tokenizer cache {reader.url} was dumped "
            f"with (fingerprint {got[:12]} vs {want.fingerprint[:12]}); give the teacher's own "
            "tokenizer" + (", or leave the option out: the cache stores it" if want.files else "")
        )
    return tok


def encode(tok: Any, texts: list[str]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Ids and character offsets [n, 2] of each text, no special tokens added: through the Rust
    tokenizer directly when there is one (transformers' per-encoding conversion costs ~3x the
    tokenisation itself)."""
    if not texts:
        return [], []
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        encs = backend.encode_batch(texts, add_special_tokens=False)
        ids = [np.asarray(e.ids, dtype=np.int64) for e in encs]
        offs = [np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2) for e in encs]
        return ids, offs
    out = tok(texts, add_special_tokens=False, return_offsets_mapping=True)
    return (
        [np.asarray(x, dtype=np.int64) for x in out["input_ids"]],
        [np.asarray(x, dtype=np.int64).reshape(-1, 2) for x in out["offset_mapping"]],
    )


def valid_utf8(data: bytes) -> tuple[str, int]:
    """``data`` as text, dropping a character split at either edge; and the bytes dropped at the
    start (offsets of the text are relative to it)."""
    start = 0
    while start < min(3, len(data)) and 0x80 <= data[start] < 0xC0:
        start += 1
    end = len(data)
    for back in range(1, min(4, end - start) + 1):
        b = data[end - back]
        if b < 0x80:
            break
        if b >= 0xC0:
            need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            if back < need:
                end -= back
            break
    return data[start:end].decode("utf-8", errors="replace"), start


def char_to_byte(text: str, chars: np.ndarray) -> np.ndarray:
    """Byte offsets of character offsets of ``text`` (UTF-8), without a per-character loop: the
    characters start at the bytes that are not continuation bytes (``10xxxxxx``)."""
    if text.isascii():
        return chars.astype(np.int64)
    raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    prefix = np.append(np.flatnonzero((raw & 0xC0) != 0x80), len(raw))
    return prefix[np.clip(chars, 0, len(prefix) - 1)]
