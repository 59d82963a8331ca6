"""``logitcache align``: re-express a cache in a student's vocabulary (another tokenizer).

The teacher's expensive pass is not repeated: its stored targets are projected. Per teacher row:

1. **Text with byte offsets.** Each teacher token is a byte string (byte-level BPE tokens through
   the GPT-2 byte alphabet, SentencePiece pieces with ``▁`` and ``<0xNN>`` byte fallback, else the
   token decoded alone), so the row is the concatenation of its tokens' bytes and every teacher
   token has a byte offset. Special tokens (BOS, EOS, ...) are not text: they split the row into
   segments and map to the student's special token of the same role, when it has one.
2. **Re-tokenise** each text segment with the student's tokenizer (offsets, no special tokens
   added), giving each student token a byte offset in the same coordinates. A row cut in the
   middle of a UTF-8 character loses that character's bytes at its edge (they have no target).
3. **Targets.** Student position ``j`` predicts student token ``j + 1``, starting at byte ``b``.
   If a teacher token also starts at ``b`` (both tokenisations put a boundary there, so both
   contexts are the same text) and the teacher stored a target for it, the teacher's next-token
   distribution is projected onto the student vocabulary: each teacher id goes to the student id
   of the *first* token of its string (an exact string match where the student has the same
   token, the common case; a precomputed id map makes it one gather), probabilities of teacher ids
   that land on the same student id are summed, and mass that maps nowhere (a lone byte of a
   split character, a special token the student lacks) joins the tail bucket. A student position
   with no such boundary gets its **hard label only**: a one-hot target on the true next student
   token (the KD loss there is the cross-entropy). Positions the teacher cache had no target for
   (a chat prompt, padding) get none.
4. **Rows.** The student tokens of a teacher row form one student row of ``seq_len`` tokens (right
   padded); a longer one continues in the next rows. Student row ids are ``teacher row id * 16 +
   part`` (at most 16 parts: raise ``--seq-len`` otherwise), so rows stay addressable and two
   teachers aligned to one student get the same row ids.

Why the first token: the student's next-token distribution at a boundary is the teacher's mass on
continuations whose first student token is ``u``; a teacher token that the student splits into
several tokens contributes to its first one, which is where a student would put that mass. The
approximation is in multi-token continuations the teacher's top-k does not list; it is measured
(``projected_mass``: at aligned positions, the mean fraction of the teacher's stored mass that
lands on student ids).

The manifest records the source cache's digest, the student tokenizer's fingerprint, and the
statistics: ``positions_covered`` (student target positions with a teacher target, the rest are
hard-label only), ``projected_mass`` and ``exact_id_fraction`` (teacher ids whose string is a
student token). Aligning a cache to its own teacher's tokenizer gives back its targets.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from logitcache.errors import ConfigError
from logitcache.format import TopKCodec
from logitcache.format.fingerprint import tokenizer_fingerprint
from logitcache.format.manifest import Manifest, SourceInfo, TargetsInfo
from logitcache.format.targets import TopKTargets
from logitcache.store import CacheHeader, CacheReader, CacheWriter
from logitcache.store.header import DEFAULT_SHARD_BYTES
from logitcache.transform._tokens import (
    IdMap,
    char_to_byte,
    encode,
    load_tokenizer,
    token_bytes,
    valid_utf8,
)

__all__ = ["AlignResult", "IdMap", "align_cache", "token_bytes"]

MAX_PARTS = 16


@dataclass(frozen=True)
class AlignResult:
    manifest: Manifest
    positions_covered: float
    projected_mass: float
    exact_id_fraction: float
    teacher_tokens: int
    seconds: float  # the rows only: after loading the tokenizers and building the id map
    setup_seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.teacher_tokens / max(self.seconds, 1e-9)

    def summary(self) -> str:
        m = self.manifest
        return (
            f"aligned {m.num_rows:,} student rows ({m.num_positions:,} target positions): "
            f"{self.positions_covered:.1%} of them carry the teacher's projected distribution "
            f"(the rest the hard label), mean projected mass {self.projected_mass:.3f}, "
            f"{self.exact_id_fraction:.1%} of teacher ids are student tokens; "
            f"{self.tokens_per_s:,.0f} teacher tokens/s after {self.setup_seconds:.1f} s of "
            f"set-up; content digest {m.content_digest}"
        )


def align_cache(
    cache: str,
    out: str,
    *,
    student_tokenizer: str,
    teacher_tokenizer: str,
    seq_len: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
) -> AlignResult:
    """Write ``cache`` re-expressed in the student tokenizer's vocabulary to ``out``."""
    t_setup = time.perf_counter()
    reader = CacheReader(cache, storage_options=storage_options)
    m = reader.manifest
    if m.targets.method != "topk":
        raise ConfigError(
            f"cache {cache} holds sampled targets; align projects top-k distributions (a "
            "projected sample would no longer be a sample of the student-vocabulary distribution)"
        )
    teacher = load_tokenizer(teacher_tokenizer, "--teacher-tokenizer")
    student = load_tokenizer(student_tokenizer, "--student-tokenizer")
    fp = tokenizer_fingerprint(teacher)
    if m.tokenizer.fingerprint and fp != m.tokenizer.fingerprint:
        raise ConfigError(
            f"--teacher-tokenizer {teacher_tokenizer} is not the tokenizer cache {cache} was "
            f"dumped with (fingerprint {fp[:12]} vs {m.tokenizer.fingerprint[:12]}); give the "
            "teacher's own tokenizer"
        )
    seq_len = seq_len or m.seq_len
    if seq_len < 2:
        raise ConfigError(f"--seq-len must be >= 2, got {seq_len}")
    t_bytes = token_bytes(teacher)
    idmap = IdMap.build(teacher, student, t_bytes)
    k = int(m.targets.k or 1)
    vocab = len(student)
    stats = _Stats()
    source = {"source_digest": m.content_digest, "row_id": "teacher row id * 16 + part"}
    header = CacheHeader(
        codec=TopKCodec(k=k, vocab_size=vocab, values=getattr(m.codec, "values", "sqrt")),
        targets=TargetsInfo("topk", k=k, tail=m.targets.tail),
        seq_len=seq_len,
        vocab_size=vocab,
        padded_vocab_size=vocab,
        backend=m.backend,
        compression_level=int(m.compression.get("level", 15)),
        teacher=m.teacher,
        tokenizer=SourceInfo(
            os.path.basename(student_tokenizer.rstrip("/")), None, tokenizer_fingerprint(student)
        ),
        dataset=m.dataset,
        extra={
            "align": {"source_digest": m.content_digest, "row_id": "teacher row id * 16 + part"}
        },
    )
    aligner = _RowAligner(teacher, student, t_bytes, idmap, seq_len, k, stats)
    start = time.perf_counter()
    with CacheWriter(
        out, header, shard_bytes=shard_bytes, overwrite=overwrite, storage_options=storage_options
    ) as writer:
        for rows in reader.iter_rows(batch_rows=64):
            batch = aligner.rows(rows)
            if batch is not None:
                writer.write(*batch)
        figures = {
            "positions_covered": stats.covered / max(stats.targets, 1),
            "projected_mass": stats.mass / max(stats.covered, 1),
            "exact_id_fraction": float(idmap.exact.mean()),
        }
        manifest = writer.commit(extra={"align": {**source, **figures}})
    return AlignResult(
        manifest=manifest,
        **figures,
        teacher_tokens=stats.teacher_tokens,
        seconds=time.perf_counter() - start,
        setup_seconds=start - t_setup,
    )


@dataclass
class _Stats:
    targets: int = 0
    covered: int = 0
    mass: float = 0.0
    teacher_tokens: int = 0


class _RowAligner:
    """Turns teacher rows into student rows with projected or one-hot targets."""

    def __init__(
        self,
        teacher: Any,
        student: Any,
        t_bytes: list[bytes | None],
        idmap: IdMap,
        seq_len: int,
        k: int,
        stats: _Stats,
    ) -> None:
        self.student = student
        self.t_len = np.array([len(b) if b is not None else -1 for b in t_bytes], dtype=np.int64)
        self.t_bytes = t_bytes
        self.idmap = idmap
        self.seq_len = seq_len
        self.k = k
        self.stats = stats
        self.special_map = {
            int(t): int(s)
            for t, s in enumerate(idmap.to_student.tolist())
            if t_bytes[t] is None and s >= 0
        }

    def rows(self, rows: Any) -> tuple[Any, ...] | None:
        targets = rows.targets
        if not isinstance(targets, TopKTargets):
            raise ConfigError("align: expected top-k targets")
        offsets = rows.position_offsets
        out_rows: list[tuple[int, np.ndarray, np.ndarray]] = []
        out_t: list[TopKTargets] = []
        for r in range(rows.num_rows):
            lo, hi = int(offsets[r]), int(offsets[r + 1])
            parts = self._row(rows.input_ids[r], rows.loss_mask[r].astype(bool),
                              _slice(targets, lo, hi))  # fmt: skip
            for part, (ids, mask, t) in enumerate(parts):
                out_rows.append((int(rows.row_id[r]) * MAX_PARTS + part, ids, mask))
                out_t.append(t)
        if not out_rows:
            return None
        row_id = np.array([x[0] for x in out_rows], dtype=np.int64)
        input_ids = np.stack([x[1] for x in out_rows])
        loss_mask = np.stack([x[2] for x in out_rows])
        return row_id, input_ids, loss_mask, _concat(out_t, self.k)

    def _row(
        self, t_ids: np.ndarray, t_mask: np.ndarray, t_targets: TopKTargets
    ) -> list[tuple[np.ndarray, np.ndarray, TopKTargets]]:
        self.stats.teacher_tokens += len(t_ids)
        s_ids, s_keys, t_keys = self._tokens(t_ids)
        # teacher: start key of each token, and its target index (its prediction's position)
        t_target_at = np.full(len(t_ids), -1, dtype=np.int64)
        t_target_at[np.flatnonzero(t_mask)] = np.arange(int(t_mask.sum()))
        n = len(s_ids)
        want = np.zeros(n, dtype=bool)  # position j has a target (predicts token j + 1)
        src = np.full(n, -1, dtype=np.int64)  # teacher target index projected at j, or -1
        if n > 1:
            nxt = s_keys[1:]
            # the teacher token covering the next student token's first byte, and whether a
            # teacher token starts exactly there
            cover = np.searchsorted(t_keys, nxt, side="right") - 1
            starts_here = (cover >= 0) & (t_keys[np.maximum(cover, 0)] == nxt)
            prev = cover - 1
            allowed = (cover >= 1) & t_mask[np.maximum(prev, 0)]
            want[:-1] = allowed
            aligned = allowed & starts_here & (t_target_at[np.maximum(prev, 0)] >= 0)
            src[:-1] = np.where(aligned, t_target_at[np.maximum(prev, 0)], -1)
        return self._pack(s_ids, want, src, t_targets)

    def _tokens(self, t_ids: np.ndarray) -> tuple[np.ndarray, ...]:
        """Student ids and start keys, teacher start keys (key = segment << 40 | byte)."""
        lens = self.t_len[t_ids]
        special = lens < 0
        seg = np.cumsum(special) * 2 - special  # text segments even, specials odd
        byte = np.zeros(len(t_ids), dtype=np.int64)
        texts: list[bytes] = []
        seg_ids: list[int] = []
        bounds = np.flatnonzero(np.diff(seg, prepend=-1))  # first token of each segment
        for a, b in zip(bounds, [*bounds[1:], len(t_ids)], strict=True):
            if special[a]:
                continue
            seg_lens = lens[a:b]
            byte[a:b] = np.cumsum(seg_lens) - seg_lens
            texts.append(b"".join(self.t_bytes[int(i)] or b"" for i in t_ids[a:b]))
            seg_ids.append(int(seg[a]))
        t_keys = (seg.astype(np.int64) << 40) | byte
        s_ids_list: list[np.ndarray] = []
        s_keys_list: list[np.ndarray] = []
        decoded = [valid_utf8(t) for t in texts]
        enc_ids, enc_offs = encode(self.student, [d[0] for d in decoded])
        text_of_seg = dict(zip(seg_ids, range(len(texts)), strict=True))
        for a in bounds:
            s = int(seg[a])
            if special[a]:
                mapped = self.special_map.get(int(t_ids[a]))
                if mapped is not None:
                    s_ids_list.append(np.array([mapped], dtype=np.int64))
                    s_keys_list.append(np.array([s << 40], dtype=np.int64))
                continue
            i = text_of_seg[s]
            text, skip = decoded[i]
            ids = enc_ids[i]
            offs = enc_offs[i]
            s_ids_list.append(ids)
            s_keys_list.append((s << 40) | (char_to_byte(text, offs[:, 0]) + skip))
        s_ids = np.concatenate(s_ids_list) if s_ids_list else np.zeros(0, np.int64)
        s_keys = np.concatenate(s_keys_list) if s_keys_list else np.zeros(0, np.int64)
        return s_ids, s_keys, t_keys

    def _pack(
        self, s_ids: np.ndarray, want: np.ndarray, src: np.ndarray, t_targets: TopKTargets
    ) -> list[tuple[np.ndarray, np.ndarray, TopKTargets]]:
        out: list[tuple[np.ndarray, np.ndarray, TopKTargets]] = []
        n, s = len(s_ids), self.seq_len
        if n == 0:
            return out
        parts = -(-n // s)
        if parts > MAX_PARTS:
            raise ConfigError(
                f"a teacher row becomes {n} student tokens, more than {MAX_PARTS} rows of "
                f"--seq-len {s}; raise --seq-len"
            )
        for p in range(parts):
            lo, hi = p * s, min((p + 1) * s, n)
            ids = np.zeros(s, dtype=np.int64)
            ids[: hi - lo] = s_ids[lo:hi]
            mask = np.zeros(s, dtype=np.uint8)
            w = want[lo:hi].copy()
            w[-1] = False  # the last position of a row predicts a token outside it
            mask[: hi - lo] = w
            sel = np.flatnonzero(w) + lo
            out.append((ids, mask, self._targets(sel, s_ids, src, t_targets)))
        return out

    def _targets(
        self, sel: np.ndarray, s_ids: np.ndarray, src: np.ndarray, t: TopKTargets
    ) -> TopKTargets:
        k, p = self.k, len(sel)
        ids = np.zeros((p, k), dtype=np.int64)
        lp = np.full((p, k), -np.inf)
        tail = np.full(p, -np.inf)
        # hard label only: one-hot on the true next student token
        ids[:, 0] = s_ids[sel + 1]
        lp[:, 0] = 0.0
        proj = np.flatnonzero(src[sel] >= 0)
        self.stats.targets += p
        self.stats.covered += len(proj)
        if len(proj):
            rows = src[sel[proj]]
            p_ids, p_lp, p_tail, mass = _project(
                t.ids[rows], t.logprobs[rows], t.tail_logprob[rows], self.idmap.to_student
            )
            stored = np.exp(t.logprobs[rows].astype(np.float64)).sum(axis=1)
            self.stats.mass += float((mass / np.maximum(stored, 1e-30)).sum())
            ids[proj], lp[proj], tail[proj] = p_ids, p_lp, p_tail
        return TopKTargets(
            ids.astype(np.int32),
            lp.astype(np.float32),
            tail.astype(np.float32),
            np.zeros((p, 0), dtype=np.float32),
        )


def _project(
    ids: np.ndarray, lp: np.ndarray, tail: np.ndarray, to: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Teacher entries -> student entries: ids mapped, equal ids summed, unmapped mass to the tail.
    Returns (ids [P, k], log-probs [P, k], tail [P], mapped mass [P])."""
    n, k = ids.shape
    p = np.exp(lp.astype(np.float64))
    sid = to[ids]
    lost = np.where(sid < 0, p, 0.0).sum(axis=1)
    p = np.where(sid < 0, 0.0, p)
    sid = np.where(sid < 0, np.iinfo(np.int64).max, sid)
    order = np.argsort(sid, axis=1, kind="stable")
    sid = np.take_along_axis(sid, order, axis=1)
    p = np.take_along_axis(p, order, axis=1)
    first = np.ones_like(sid, dtype=bool)
    first[:, 1:] = sid[:, 1:] != sid[:, :-1]
    group = np.cumsum(first.reshape(-1)) - 1
    merged = np.bincount(group, weights=p.reshape(-1))
    slot = np.cumsum(first, axis=1) - 1
    out_ids = np.zeros((n, k), dtype=np.int64)
    out_p = np.zeros((n, k))
    rows = np.repeat(np.arange(n), k).reshape(n, k)
    out_ids[rows[first], slot[first]] = sid[first]
    out_p[rows[first], slot[first]] = merged
    invalid = out_ids == np.iinfo(np.int64).max
    out_ids[invalid], out_p[invalid] = 0, 0.0
    new_tail = np.exp(tail.astype(np.float64)) + lost
    with np.errstate(divide="ignore"):
        return out_ids, np.log(out_p), np.log(new_tail), out_p.sum(axis=1)


def _slice(t: TopKTargets, lo: int, hi: int) -> TopKTargets:
    return TopKTargets(t.ids[lo:hi], t.logprobs[lo:hi], t.tail_logprob[lo:hi],
                       t.temperature_lognorm[lo:hi])  # fmt: skip


def _concat(parts: list[TopKTargets], k: int) -> TopKTargets:
    return TopKTargets(
        np.concatenate([t.ids for t in parts]) if parts else np.zeros((0, k), np.int32),
        np.concatenate([t.logprobs for t in parts]) if parts else np.zeros((0, k), np.float32),
        np.concatenate([t.tail_logprob for t in parts]) if parts else np.zeros(0, np.float32),
        np.zeros((sum(t.num_positions for t in parts), 0), dtype=np.float32),
    )
