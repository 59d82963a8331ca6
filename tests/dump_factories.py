"""Teacher factories for the dump tests (``--teacher dump_factories:NAME``; tests/ on the path).

Both load the tiny teacher saved at ``$LOGITCACHE_TEST_TEACHER`` (a HF directory).
``slow``: sleeps ``$LOGITCACHE_TEST_DELAY`` seconds per forward, so a test can kill a dump
mid-way. ``nan``: one output row of the head is NaN, so every logit vector holds a NaN.

``$LOGITCACHE_TEST_EXIT_BEFORE_MANIFEST`` (set to a rank, or ``all``) makes that process exit
(``os._exit``, like a SIGKILL: no cleanup, the lock stays) at the moment it would write the
manifest or its part's completion marker, i.e. right after its last shard and progress record
were committed: a deterministic kill point at the last moment of a dump.

Run as a script (``python tests/dump_factories.py dump ...``, e.g. as torchrun's entry), it is
the ``logitcache`` CLI with that hook installed: for teachers that are not factories (a
tensor-parallel dump loads a Hugging Face directory).
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


def _exit_before_manifest() -> None:
    wanted = os.environ.get("LOGITCACHE_TEST_EXIT_BEFORE_MANIFEST")
    if wanted is None or wanted not in ("all", os.environ.get("RANK", "0")):
        return
    from logitcache.store._fs import Location

    write_atomic = Location.write_atomic

    def write_or_exit(self: Location, rel: str, data: bytes) -> None:
        if rel == "manifest.json" or rel.startswith("_parts/"):
            os._exit(9)
        write_atomic(self, rel, data)

    Location.write_atomic = write_or_exit  # type: ignore[method-assign]


def slow() -> tuple[Any, Any]:
    _exit_before_manifest()
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


if __name__ == "__main__":
    _exit_before_manifest()
    from logitcache.cli import cli

    cli()
