"""Fingerprints shared by both sides: the dump records them, the trainer checks them.

Lives apart from ``inputs`` so that the training side can check a student's tokenizer against a
cache without importing the teacher-side input pipeline.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

__all__ = ["tokenizer_fingerprint"]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 (hex) over the tokenizer's vocab, merges, special tokens and chat template.

    Fast tokenizers are hashed through their full serialised JSON, re-dumped with sorted keys so
    the result is stable across processes and library versions that only reorder keys.
    """
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state: Any = json.loads(backend.to_str())
    else:
        state = {"vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])}
    extra = {
        "len": len(tokenizer),
        "special": {str(k): str(v) for k, v in tokenizer.special_tokens_map.items()},
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    h.update(json.dumps({"state": state, "extra": extra}, sort_keys=True).encode())
    return h.hexdigest()
