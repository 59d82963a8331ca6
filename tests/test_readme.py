"""The README's library example runs as printed (on a tiny cache and a tiny student)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from synth import topk_targets
from transformers import LlamaConfig, LlamaForCausalLM

from logitcache.format import TargetsInfo, TopKCodec
from logitcache.store import CacheHeader, CacheWriter

README = Path(__file__).resolve().parents[1] / "README.md"


def test_library_example_runs(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    block = re.search(r"## Your own training loop\s+```python\n(.*?)```", README.read_text(), re.S)
    assert block is not None
    rng = np.random.default_rng(0)
    hdr = CacheHeader(
        codec=TopKCodec(k=8, vocab_size=64),
        targets=TargetsInfo(method="topk", k=8),
        seq_len=12,
        vocab_size=64,
        padded_vocab_size=64,
    )
    monkeypatch.chdir(tmp_path)
    with CacheWriter("cache/", hdr) as w:
        mask = np.ones((16, 12), bool)
        w.write(
            np.arange(16),
            rng.integers(0, 64, (16, 12)),
            mask,
            topk_targets(rng, int(mask.sum()), 8, 64),
        )
    torch.manual_seed(0)
    student = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=32,
        )
    )
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    scope = {"student": student, "opt": opt}
    exec(compile(block.group(1), "README.md", "exec"), scope)
    assert scope["state"]["sampler"]["epoch"] == 1  # a whole epoch was consumed
    assert float(scope["loss"].detach()) > 0
