"""Teacher factories for the dump tests (``--teacher dump_factories:NAME``; tests/ on the path).

Both load the tiny teacher saved at ``$LOGITCACHE_TEST_TEACHER`` (a HF directory).
``slow``: sleeps ``$LOGITCACHE_TEST_DELAY`` seconds per forward, so a test can kill a dump
mid-way. ``nan``: one output row of the head is NaN, so every logit vector holds a NaN.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch


def _load() -> tuple[Any, Any]:
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = os.environ["LOGITCACHE_TEST_TEACHER"]
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


def slow() -> tuple[Any, Any]:
    model, tok = _load()
    delay = float(os.environ.get("LOGITCACHE_TEST_DELAY", "0"))
    if delay > 0:
        model.model.register_forward_pre_hook(lambda *_: time.sleep(delay))
    return model, tok


def nan() -> tuple[Any, Any]:
    model, tok = _load()
    with torch.no_grad():
        model.lm_head.weight[5] = float("nan")
    return model, tok
