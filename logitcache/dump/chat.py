"""Chat conversations to token ids plus an assistant-token mask (see :mod:`logitcache.dump.inputs`).

Two ways to find the assistant tokens, best first:

1. templates that wrap assistant text in ``{% generation %}`` blocks: the tokenizer computes the
   mask itself (``return_assistant_tokens_mask``), which is exact by construction;
2. any other template: render prefixes of the conversation. Assistant turn i spans the characters
   from the end of ``render(messages[:i], add_generation_prompt=True)`` to the end of
   ``render(messages[:i+1])``, i.e. its content and its end-of-turn marker, not the role header
   (which the student is given, not asked to produce). The full text is tokenised once with
   character offsets, and a token is an assistant token iff its first character is in a span.
   Templates that rewrite earlier turns when more follow (so a prefix render is not a prefix) are
   refused with an explanation instead of producing a silently wrong mask.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from logitcache.errors import InputError

_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


def render_chat(tokenizer: Any, messages: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (ids int64 [n], assistant bool [n]) for one conversation."""
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and "role" in m for m in messages
    ):
        raise InputError(f"{where}: chat messages must be a list of {{role, content}} dicts")
    template = tokenizer.chat_template
    if isinstance(template, str) and _GENERATION_TAG.search(template):
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids = np.asarray(out["input_ids"], dtype=np.int64).reshape(-1)
        mask = np.asarray(out["assistant_masks"], dtype=bool).reshape(-1)
        return ids, mask
    full = _render(tokenizer, messages, False)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = _render(tokenizer, messages[:i], True) if i else _render_empty(tokenizer)
        end = _render(tokenizer, messages[: i + 1], False)
        if not (full.startswith(end) and end.startswith(start)):
            raise InputError(
                f"{where}: the chat template does not render a conversation's prefixes as "
                "prefixes of the whole (it rewrites earlier turns), so assistant spans cannot be "
                "located; use a template with {% generation %} markers"
            )
        spans.append((len(start), len(end)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    starts = np.asarray([o[0] for o in enc["offset_mapping"]], dtype=np.int64)
    mask = np.zeros(len(ids), dtype=bool)
    for lo, hi in spans:
        mask |= (starts >= lo) & (starts < hi)
    return ids, mask


def _render(tokenizer: Any, messages: list[Any], generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )
    return str(text)


def _render_empty(tokenizer: Any) -> str:
    # A conversation that opens with an assistant turn: some templates cannot render [].
    try:
        return _render(tokenizer, [], True)
    except Exception:  # template errors are jinja's own types; fall back to "no header"
        return ""
