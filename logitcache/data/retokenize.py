"""Cached rows re-expressed in a student's tokens, on the fly: ULD on an unaligned cache.

``--loss uld`` compares sorted probabilities, never ids, so a student with another tokenizer can
train on a cache as dumped, without ``align`` writing a new one: only the *positions* must be
paired, each student position with a teacher position that saw the same text. This module does
it as a collate transform (:class:`~logitcache.data.collate.TargetOptions` ``transform``), so the
loader's worker processes pay for it, not the training step.

Per teacher row of the batch:

1. **Bytes.** Each teacher token is a byte string (``transform/_tokens.token_bytes``: the GPT-2
   byte alphabet, SentencePiece ``▁`` and ``<0xNN>``); special tokens (BOS, EOS, padding) are not
   text: they split the row into segments and become the student's special token of the same
   role (dropped if it has none). Every token gets a key ``segment << 40 | byte offset``.
2. **Re-tokenise** each text segment with the student tokenizer (offsets, no special tokens
   added; one ``encode_batch`` for the whole batch). A segment cut inside a UTF-8 character
   loses that character's bytes at its edge.
3. **Pair** (:func:`pair_positions`). Student position ``j`` predicts student token ``j + 1``,
   which starts at key ``b``. It is paired with the teacher position ``i`` whose next token
   starts at ``b`` (*exact*: both contexts are the same bytes), else with the **nearest teacher
   position whose next token starts before b** (its context is the longest teacher context that
   is a prefix of the student's: the student is inside a teacher token; a teacher next-token
   distribution there is an approximation, which ULD's id-free comparison tolerates). A student
   position before any teacher boundary, or paired with a teacher position without a stored
   target (a chat prompt, padding), gets no target. Byte-level students may cut a character into
   several tokens that share its character offset: only the first counts as exact.
4. **Rows.** The student tokens, cut or right-padded to ``seq_len`` (the tokens beyond are
   dropped: :class:`PairingStats` ``truncated`` says how many; raise ``--student-seq-len``).
   ``labels`` are the next student tokens, ``target_index`` the paired positions, and every
   per-position target array of the batch (codes or decoded log-probs alike) is gathered at the
   paired teacher positions: ULD reads only the sorted values and the tail, never the ids.

Costs: one tokenizer pass over the batch's text plus numpy per row, in the loader's workers.
Measured on SmolLM2's rows of Python documentation (4 x 512 tokens, tiled to 64 rows) to an 8k
byte-level BPE (trained on the same documentation, so optimistic): ~237,000 teacher tokens/s in
one process on a loaded 2-core machine (17 ms per batch of 8 rows), 100% of student positions
paired, 98.8% of them exactly. Keys, pairing and statistics are shared with
:meth:`Retokenizer.measure`, which the trainer logs before the first step (``positions
paired``, ``exactly``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from logitcache.data.collate import IGNORE_INDEX
from logitcache.errors import ConfigError
from logitcache.transform._tokens import char_to_byte, encode, token_bytes, valid_utf8

__all__ = ["PairingStats", "Retokenizer", "pair_positions", "retokenizer_for"]

#: row-level arrays of a collated batch (rebuilt or passed through); all other arrays are per
#: target position and are gathered at the paired teacher positions
_ROW_ARRAYS = ("input_ids", "labels", "position_mask", "row_id", "is_pad")
_REBUILT = ("target_index", "target_labels")
_SPECIAL_ROLES = ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token")


def pair_positions(t_starts: np.ndarray, s_starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Teacher position paired with each student position, and whether exactly.

    ``t_starts [n_t]`` and ``s_starts [n_s]``: the start keys (byte offsets, non-decreasing) of
    the teacher's and the student's tokens of one text. Student position ``j < n_s - 1`` (it
    predicts token ``j + 1``) gets the teacher position ``i`` with ``t_starts[i + 1] ==
    s_starts[j + 1]``, else the largest ``i`` with ``t_starts[i + 1] < s_starts[j + 1]``, or -1
    when the student's next token starts before the teacher's second token. Returns ``(i [n_s -
    1] int64, exact [n_s - 1] bool)``.
    """
    t_next = np.asarray(t_starts, dtype=np.int64)[1:]
    s_next = np.asarray(s_starts, dtype=np.int64)[1:]
    i = np.searchsorted(t_next, s_next, side="right") - 1
    hit = i >= 0
    exact = hit & (t_next[np.maximum(i, 0)] == s_next) if len(t_next) else hit
    s_prev = np.asarray(s_starts, dtype=np.int64)[:-1]
    exact &= s_next > s_prev  # a token sharing its predecessor's offset: inside one character
    return np.where(hit, i, -1), exact


@dataclass(frozen=True)
class PairingStats:
    """What pairing did over some rows: counts of student tokens and target positions."""

    student_tokens: int  # student tokens of the rows' text, before the cut to seq_len
    truncated: int  # of which beyond seq_len (dropped)
    positions: int  # student positions with a next token inside the row
    paired: int  # of which paired with a teacher position that has a target
    exact: int  # of which exactly (same byte offset)

    @property
    def paired_fraction(self) -> float:
        return self.paired / max(self.positions, 1)

    @property
    def exact_fraction(self) -> float:
        return self.exact / max(self.paired, 1)

    @property
    def truncated_fraction(self) -> float:
        return self.truncated / max(self.student_tokens, 1)

    def to_dict(self) -> dict[str, float | int]:
        return {
            "positions_paired": round(self.paired_fraction, 6),
            "exact_fraction": round(self.exact_fraction, 6),
            "truncated_fraction": round(self.truncated_fraction, 6),
            "student_positions": self.positions,
        }

    def summary(self) -> str:
        return (
            f"{self.paired_fraction:.1%} of student positions paired with a teacher target "
            f"({self.exact_fraction:.1%} of them exactly, at the same byte offset); "
            f"{self.truncated_fraction:.1%} of student tokens beyond --student-seq-len dropped"
        )


@dataclass(frozen=True)
class _Rows:
    input_ids: np.ndarray  # [B, S] student ids
    keep: np.ndarray  # [B, S] bool: positions with a paired teacher target
    src: np.ndarray  # [N] flat teacher position (b * S_t + i) of each kept position
    exact: np.ndarray  # [N] bool
    stats: PairingStats
    full: list[np.ndarray]  # each row's student ids before the cut


class Retokenizer:
    """Collate transform: a batch of teacher rows -> the same text in the student's tokens, with
    the teacher targets gathered at the paired positions (see the module docstring).

    ``teacher`` and ``student`` are Hugging Face tokenizers (the cache's own, ``cache_tokenizer``,
    and the student's); ``seq_len`` is the student's row length. Picklable (DataLoader workers
    receive it with the dataset): the tokenizers and the teacher's token bytes travel along.
    """

    def __init__(self, teacher: Any, student: Any, seq_len: int) -> None:
        if seq_len < 2:
            raise ConfigError(f"the student's seq_len must be >= 2, got {seq_len}")
        self.student = student
        self.seq_len = int(seq_len)
        t_bytes = token_bytes(teacher)
        self.t_len = np.array([-1 if b is None else len(b) for b in t_bytes], dtype=np.int64)
        self.t_bytes = t_bytes
        self.special_map: dict[int, int] = {}
        for role in _SPECIAL_ROLES:
            t_id, s_id = getattr(teacher, f"{role}_id", None), getattr(student, f"{role}_id", None)
            if isinstance(t_id, int) and isinstance(s_id, int):
                self.special_map.setdefault(t_id, s_id)
        pad = getattr(student, "pad_token_id", None)
        self.pad_id = int(pad) if isinstance(pad, int) else 0

    # -- one batch -----------------------------------------------------------------------------

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The collated teacher batch (host numpy, before packing) in the student's tokens."""
        t_ids = np.asarray(batch["input_ids"])
        keep = np.asarray(batch["position_mask"], dtype=bool)
        rows = self.rows(t_ids, keep)
        n_teacher = int(batch["target_index"].shape[0])
        flat_to_target = np.full(t_ids.size, -1, dtype=np.int64)
        flat_to_target[batch["target_index"]] = np.arange(n_teacher)
        src = flat_to_target[rows.src]
        labels = np.full(rows.input_ids.shape, IGNORE_INDEX, dtype=np.int64)
        b, j = np.nonzero(rows.keep)
        labels[b, j] = _next_tokens(rows.input_ids, rows.full, b, j)
        target_index = np.flatnonzero(rows.keep.reshape(-1))
        out: dict[str, Any] = {
            "input_ids": rows.input_ids,
            "labels": labels,
            "position_mask": rows.keep,
            "target_index": target_index,
            "target_labels": labels.reshape(-1)[target_index],
            "row_id": batch["row_id"],
            "is_pad": batch["is_pad"],
        }
        for name, value in batch.items():
            if name in out or name in _ROW_ARRAYS or name in _REBUILT:
                continue
            is_array = isinstance(value, np.ndarray)
            out[name] = np.ascontiguousarray(value[src]) if is_array else value
        return out

    # -- rows ----------------------------------------------------------------------------------

    def rows(self, t_ids: np.ndarray, has_target: np.ndarray) -> _Rows:
        """Student rows of teacher rows ``t_ids [B, S_t]`` whose positions ``has_target``
        carry a teacher target, and the pairing (see :func:`pair_positions`)."""
        n_rows, s_t = t_ids.shape
        s = self.seq_len
        out_ids = np.full((n_rows, s), self.pad_id, dtype=np.int64)
        keep = np.zeros((n_rows, s), dtype=bool)
        srcs: list[np.ndarray] = []
        exacts: list[np.ndarray] = []
        counts = np.zeros(5, dtype=np.int64)
        full: list[np.ndarray] = []
        for r, (s_ids, s_keys, t_keys) in enumerate(self._tokens(t_ids)):
            full.append(s_ids)
            n = len(s_ids)
            m = min(n, s)
            out_ids[r, :m] = s_ids[:m]
            pos = min(max(n - 1, 0), s)  # positions with a next token, inside the cut
            i, exact = pair_positions(t_keys, s_keys)
            i, exact = i[:pos], exact[:pos]
            ok = i >= 0
            ok[ok] = has_target[r, i[ok]]
            keep[r, :pos] = ok
            srcs.append(r * s_t + i[ok])
            exacts.append(exact[ok])
            counts += (n, n - m, pos, int(ok.sum()), int(exact[ok].sum()))
        stats = PairingStats(*(int(c) for c in counts))
        src = np.concatenate(srcs) if srcs else np.zeros(0, dtype=np.int64)
        ex = np.concatenate(exacts) if exacts else np.zeros(0, dtype=bool)
        return _Rows(out_ids, keep, src, ex, stats, full)

    def _tokens(self, t_ids: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per row: student ids, their start keys, the teacher tokens' start keys."""
        plans = []
        texts: list[str] = []
        for row in t_ids:
            known = row < len(self.t_len)  # ids of a padded head beyond the tokenizer: not text
            lens = np.where(known, self.t_len[np.where(known, row, 0)], -1)
            special = lens < 0
            seg = np.cumsum(special) * 2 - special  # text segments even, specials odd
            byte = np.zeros(len(row), dtype=np.int64)
            pieces: list[tuple[int, int | None, int]] = []
            bounds = np.flatnonzero(np.diff(seg, prepend=-1))  # first token of each segment
            for a, e in zip(bounds, [*bounds[1:], len(row)], strict=True):
                if special[a]:
                    pieces.append((int(seg[a]), None, 0))
                    continue
                seg_lens = lens[a:e]
                byte[a:e] = np.cumsum(seg_lens) - seg_lens
                text, skip = valid_utf8(b"".join(self.t_bytes[int(t)] or b"" for t in row[a:e]))
                pieces.append((int(seg[a]), len(texts), skip))
                texts.append(text)
            plans.append((row, (seg.astype(np.int64) << 40) | byte, pieces))
        enc_ids, enc_offs = encode(self.student, texts)
        out = []
        for row, t_keys, pieces in plans:
            ids_parts: list[np.ndarray] = []
            key_parts: list[np.ndarray] = []
            for seg_no, text_no, skip in pieces:
                if text_no is None:  # a special token: the student's of the same role
                    first = int(row[np.flatnonzero((t_keys >> 40) == seg_no)[0]])
                    mapped = self.special_map.get(first)
                    if mapped is not None:
                        ids_parts.append(np.array([mapped], dtype=np.int64))
                        key_parts.append(np.array([seg_no << 40], dtype=np.int64))
                    continue
                offs = char_to_byte(texts[text_no], enc_offs[text_no][:, 0]) + skip
                ids_parts.append(enc_ids[text_no])
                key_parts.append((np.int64(seg_no) << 40) | offs)
            s_ids = np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int64)
            s_keys = np.concatenate(key_parts) if key_parts else np.zeros(0, np.int64)
            out.append((s_ids, s_keys, t_keys))
        return out

    # -- statistics ----------------------------------------------------------------------------

    def measure(self, reader: Any, max_rows: int = 256) -> PairingStats:
        """Pairing statistics over the first ``max_rows`` rows of a cache (an open reader)."""
        rows = reader.read_rows(0, min(max_rows, reader.num_rows))
        return self.rows(np.asarray(rows.input_ids), rows.loss_mask.astype(bool)).stats


def _next_tokens(
    ids: np.ndarray, full: list[np.ndarray], b: np.ndarray, j: np.ndarray
) -> np.ndarray:
    """Student token ``j + 1`` of row ``b`` (from the uncut row: the last kept position of a
    cut row predicts the first dropped token)."""
    s = ids.shape[1]
    inside = j + 1 < s
    out = np.where(inside, ids[b, np.minimum(j + 1, s - 1)], 0)
    for k in np.flatnonzero(~inside):
        out[k] = full[int(b[k])][int(j[k]) + 1]
    return out


def retokenizer_for(
    reader: Any,
    student_tokenizer: Any | None,
    *,
    teacher_tokenizer: str | None = None,
    seq_len: int | None = None,
    context: int | None = None,
) -> Retokenizer | None:
    """The :class:`Retokenizer` a student needs on cache ``reader`` (open), or None when its
    tokenizer is the cache's, or unknown (no tokenizer, no fingerprint to compare).

    The teacher's tokenizer is ``teacher_tokenizer`` (a directory, checked against the manifest's
    fingerprint) or the one the cache stores (format 1.3). ``seq_len``: the student's row length
    (default: the cache's); ``context``: the student's ``max_position_embeddings``, which must
    hold it."""
    from logitcache.format.fingerprint import tokenizer_fingerprint
    from logitcache.store.tokenizer import cache_tokenizer
    from logitcache.transform._tokens import load_teacher_tokenizer

    m = reader.manifest
    teacher = None
    if teacher_tokenizer:
        teacher = load_teacher_tokenizer(reader, teacher_tokenizer)
    want = m.tokenizer.fingerprint or (tokenizer_fingerprint(teacher) if teacher else "")
    if student_tokenizer is None or not want or tokenizer_fingerprint(student_tokenizer) == want:
        return None
    seq_len = seq_len or m.seq_len
    if context is not None and seq_len > context:
        raise ConfigError(
            f"the student's rows would be {seq_len} tokens (--student-seq-len, default the "
            f"cache's seq_len) but its context is {context} (max_position_embeddings); pass "
            f"--student-seq-len {context} or less"
        )
    if teacher is None:
        teacher = cache_tokenizer(reader)
    return Retokenizer(teacher, student_tokenizer, seq_len)
