"""A tiny top-k cache of a peaked tiny Llama teacher over random token rows, and the students.

Shared by the integration tests and ``scripts/bench_integrations.py`` (which puts this folder on
``sys.path``). Built like ``tests/train/test_train.py``'s cache: the labels are noise, the
teacher's distribution is the signal, so held-out KL measures distillation alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from logitcache.format import SourceInfo, TargetsInfo, TopKCodec, TopKTargets
from logitcache.store import CacheHeader, CacheWriter

VOCAB, SEQ, K = 96, 16, 16


def llama(seed: int, hidden: int = 32, vocab: int = VOCAB, context: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def teacher() -> LlamaForCausalLM:
    t = llama(123, hidden=48)
    with torch.no_grad():  # peaked: the distribution carries much more than the label
        t.lm_head.weight.mul_(12.0)
    return t


def dump_tiny(
    model: LlamaForCausalLM,
    url: Path,
    rows: int,
    seed: int,
    tail: str = "bucket",
    tokenizer: SourceInfo | None = None,
    input_vocab: int = VOCAB,
) -> None:
    """Write a top-k cache of ``model``; ``tail="unknown"`` stores values renormalised over the
    k ids (what an import of raw logits gives); ``tokenizer`` is recorded in the manifest; the
    rows' input tokens are drawn below ``input_vocab`` (the targets span the whole vocabulary)."""
    rng = np.random.default_rng(seed)
    hdr = CacheHeader(
        codec=TopKCodec(k=K, vocab_size=VOCAB),
        targets=TargetsInfo(method="topk", k=K, tail=tail),  # type: ignore[arg-type]
        seq_len=SEQ,
        vocab_size=VOCAB,
        padded_vocab_size=VOCAB,
        teacher=SourceInfo(name="tiny-teacher"),
        tokenizer=tokenizer or SourceInfo(),
    )
    with CacheWriter(str(url), hdr, shard_bytes=20_000) as w:
        for b in range(0, rows, 16):
            ids = rng.integers(0, input_vocab, (16, SEQ))
            mask = np.ones((16, SEQ), bool)
            mask[:, -1] = False
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.as_tensor(ids)).logits.double(), -1)
            lp = lp[torch.as_tensor(mask)]
            top, idx = lp.topk(K, dim=-1)
            rest = lp.scatter(1, idx, float("-inf")).logsumexp(-1)
            if tail == "unknown":
                top = top - top.logsumexp(-1, keepdim=True)
                rest = torch.full_like(rest, float("-inf"))
            t = TopKTargets(
                idx.int().numpy(),
                top.float().numpy(),
                rest.float().numpy(),
                np.zeros((len(top), 0), np.float32),
            )
            w.write(np.arange(b, b + 16), ids, mask, t)
