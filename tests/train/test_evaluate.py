"""Chunked evaluation: the same metrics as scoring full logits, without [positions x vocab]."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

from logitcache.loss import SampledTeacher, TopKTeacher
from logitcache.train.evaluate import evaluate
from logitcache.train.student import student_output, target_logits

V, SEQ, B, K = 211, 12, 3, 8


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces (no autograd involved)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def _batches(kind: str) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(3):
        ids = torch.randint(0, V, (B, SEQ), generator=g)
        index = torch.randperm(B * SEQ, generator=g)[: B * SEQ - 5].sort().values
        labels = torch.randint(0, V, (len(index),), generator=g)
        labels[::4] = -100
        out.append({"input_ids": ids, "target_index": index, "target_labels": labels, "k": kind})
    return out


def _teacher(batch: dict[str, Any]) -> TopKTeacher | SampledTeacher:
    g = torch.Generator().manual_seed(int(batch["target_index"].sum()))
    n = len(batch["target_index"])
    p = torch.softmax(3 * torch.randn(n, V, generator=g), -1)
    if batch["k"] == "sampled":
        draws = torch.multinomial(p, K, replacement=True, generator=g)
        return SampledTeacher(draws, torch.ones(n, K))
    top, ids = p.topk(K, -1)
    return TopKTeacher(ids, top.log())


@pytest.mark.parametrize("kind", ["topk", "sampled"])
def test_chunked_equals_full_and_is_bounded(model: LlamaForCausalLM, kind: str) -> None:
    batches = _batches(kind)
    dev = torch.device("cpu")
    full_mode, chunk_mode = _LargestTensor(), _LargestTensor()
    with full_mode:
        full = evaluate(batches, lambda b: target_logits(model, b), _teacher, dev)
    with chunk_mode:
        chunked = evaluate(batches, lambda b: student_output(model, b), _teacher, dev, chunk_size=5)
    assert full.keys() == chunked.keys() and full["positions"] == chunked["positions"] == 93
    for key, value in full.items():
        assert chunked[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    weights = max(p.numel() for p in model.parameters())  # views of the head weight count too
    bound = max(5 * V, weights)
    assert full_mode.largest >= B * SEQ * V > bound  # the model's own full logits
    assert chunk_mode.largest <= bound  # nothing bigger than one chunk of logits (or a weight)
