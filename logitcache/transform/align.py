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

**Tokenizers.** The teacher's is the cache's own (format 1.3 stores it, sha256-checked by
:func:`~logitcache.store.tokenizer.cache_tokenizer`); an older or imported cache needs
``--teacher-tokenizer``, which is checked against the manifest's tokenizer fingerprint. The
student's tokenizer files are stored in the aligned cache, which is then self-describing too.
The byte table and id map of a (teacher, student) pair are memoised by both fingerprints, so a
process aligning several caches builds them once (~1 s for a 49k x 8k pair).

**Speed** (SmolLM2's 49k-vocabulary cache of Python docs, top-64 float32, to an 8k BPE student,
131k teacher tokens; CPU seconds of the process, old and new code alternated in one run on a
shared 2-core machine): rows are aligned a batch at a time (:mod:`._align_rows`: 162k vs 119k
teacher tokens/s for the row work alone, 1.36x), and the aligned cache is written at zstd level
3 by default (``compression_level``): the whole transform ran at 80-98k teacher tokens/s at
level 3, 48-55k at the dump's level 15 (the former code: 43-45k), for 0.7% more bytes (98.9 vs
98.2 bytes per teacher token). ``scripts/bench_derived.py`` measures it in wall time.

The manifest records the source cache's digest, the student tokenizer's fingerprint, and the
statistics: ``positions_covered`` (student target positions with a teacher target, the rest are
hard-label only), ``projected_mass`` and ``exact_id_fraction`` (teacher ids whose string is a
student token). Aligning a cache to its own teacher's tokenizer gives back its targets.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from logitcache.errors import ConfigError
from logitcache.format import TopKCodec
from logitcache.format.fingerprint import tokenizer_fingerprint
from logitcache.format.manifest import Manifest, SourceInfo, TargetsInfo
from logitcache.store import CacheHeader, CacheReader, CacheWriter
from logitcache.store.header import DEFAULT_SHARD_BYTES
from logitcache.store.tokenizer import cache_tokenizer, tokenizer_files
from logitcache.transform._align_rows import MAX_PARTS, RowAligner, Stats
from logitcache.transform._tokens import IdMap, load_teacher_tokenizer, load_tokenizer, token_bytes

__all__ = ["ALIGN_COMPRESSION_LEVEL", "MAX_PARTS", "AlignResult", "IdMap", "align_cache",
           "token_bytes"]  # fmt: skip

# zstd level of an aligned cache (a dump's is 15): see the module docstring and
# docs/derived-caches.md for the measured cost of 15 and the bytes it saves
ALIGN_COMPRESSION_LEVEL = 3

_PAIRS: OrderedDict[tuple[str, str], tuple[list[bytes | None], IdMap]] = OrderedDict()
_MAX_PAIRS = 4


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
    teacher_tokenizer: str | None = None,
    seq_len: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    compression_level: int = ALIGN_COMPRESSION_LEVEL,
    overwrite: bool = False,
) -> AlignResult:
    """Write ``cache`` re-expressed in the student tokenizer's vocabulary to ``out``.

    ``teacher_tokenizer``: only for a cache that does not store its tokenizer (format < 1.3,
    or imported without one); checked against the cache's tokenizer fingerprint."""
    t_setup = time.perf_counter()
    reader = CacheReader(cache, storage_options=storage_options)
    m = reader.manifest
    if m.targets.method != "topk":
        raise ConfigError(
            f"cache {cache} holds sampled targets; align projects top-k distributions (a "
            "projected sample would no longer be a sample of the student-vocabulary distribution)"
        )
    teacher, t_fp = _teacher(reader, teacher_tokenizer)
    student = load_tokenizer(student_tokenizer, "--student-tokenizer")
    s_fp = tokenizer_fingerprint(student)
    seq_len = seq_len or m.seq_len
    if seq_len < 2:
        raise ConfigError(f"--seq-len must be >= 2, got {seq_len}")
    t_bytes, idmap = _pair(teacher, student, t_fp, s_fp)
    k = int(m.targets.k or 1)
    vocab = len(student)
    stats = Stats()
    source = {"source_digest": m.content_digest, "row_id": "teacher row id * 16 + part"}
    header = CacheHeader(
        codec=TopKCodec(k=k, vocab_size=vocab, values=getattr(m.codec, "values", "sqrt")),
        targets=TargetsInfo("topk", k=k, tail=m.targets.tail),
        seq_len=seq_len,
        vocab_size=vocab,
        padded_vocab_size=vocab,
        backend=m.backend,
        compression_level=compression_level,
        teacher=m.teacher,
        tokenizer=SourceInfo(os.path.basename(student_tokenizer.rstrip("/")), None, s_fp),
        dataset=m.dataset,
        extra={"align": source},
    )
    aligner = RowAligner(student, t_bytes, idmap, seq_len, k, stats)
    writer = CacheWriter(
        out,
        header,
        shard_bytes=shard_bytes,
        overwrite=overwrite,
        storage_options=storage_options,
        tokenizer_files=tokenizer_files(student),  # the aligned cache decodes its own tokens
    )
    start = time.perf_counter()
    with writer:
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


def _teacher(reader: CacheReader, path: str | None) -> tuple[Any, str]:
    """The teacher tokenizer and its fingerprint: the cache's own, or ``path`` checked against
    the fingerprint the cache records."""
    m = reader.manifest
    # cache_tokenizer refuses a cache that stores none, naming --teacher-tokenizer
    tok = cache_tokenizer(reader) if path is None else load_teacher_tokenizer(reader, path)
    return tok, m.tokenizer.fingerprint or tokenizer_fingerprint(tok)


def _pair(teacher: Any, student: Any, t_fp: str, s_fp: str) -> tuple[list[bytes | None], IdMap]:
    """The teacher's byte table and the id map of a tokenizer pair, memoised by fingerprints."""
    key = (t_fp, s_fp)
    hit = _PAIRS.get(key)
    if hit is None:
        t_bytes = token_bytes(teacher)
        hit = (t_bytes, IdMap.build(teacher, student, t_bytes))
        _PAIRS[key] = hit
        while len(_PAIRS) > _MAX_PAIRS:
            _PAIRS.popitem(last=False)
    _PAIRS.move_to_end(key)
    return hit
