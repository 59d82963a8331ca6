"""``logitcache info``: a summary of a cache from its manifest alone (no shard is read)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from logitcache.store._fs import open_location
from logitcache.store.reader import read_manifest

__all__ = ["cache_info", "format_info"]


def cache_info(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A JSON-able summary of a committed cache (reads only the manifest).

    Opens even a manifest whose stored content digest disagrees with its content, to show both:
    ``content_digest`` is always the recomputed one, ``stored_digest`` what the file says."""
    m = read_manifest(open_location(url, storage_options), check_digest=False)
    tokens = m.num_rows * m.seq_len
    if m.targets.method == "topk":
        entries = m.num_positions * int(m.targets.k or 0)
    else:
        entries = sum(s.entries for s in m.shards)
    return {
        "url": url,
        "format_version": m.format_version,
        "content_digest": m.content_digest,
        "stored_digest": m.stored_digest,
        "digest_ok": m.stored_digest in (None, m.content_digest),
        "created_by": m.created_by,
        "created_at": m.created_at,
        "backend": m.backend,
        "rows": m.num_rows,
        "seq_len": m.seq_len,
        "tokens": tokens,
        "positions": m.num_positions,
        "entries": entries,
        "shards": len(m.shards),
        "bytes": m.num_bytes,
        "bytes_per_token": m.num_bytes / tokens if tokens else None,
        "bytes_per_position": m.num_bytes / m.num_positions if m.num_positions else None,
        "bytes_per_entry": m.num_bytes / entries if entries else None,
        "vocab_size": m.vocab_size,
        "padded_vocab_size": m.padded_vocab_size,
        "targets": m.targets.to_dict(),
        "codec": m.codec.to_dict(),
        "teacher": m.teacher.to_dict(),
        "tokenizer": m.tokenizer.to_dict(),
        "dataset": m.dataset.to_dict(),
        "coverage": m.coverage.to_dict(),
    }


def format_info(info: Mapping[str, Any]) -> str:
    """Human-readable rendering of :func:`cache_info`."""
    t = info["targets"]
    what = f"top-{t['k']}" if t["method"] == "topk" else f"sampled n={t['samples']}"
    if t["method"] == "topk" and t["tail"] == "bucket":
        what += " + tail mass"
    if t["temperatures"]:
        what += f", exact at T={', '.join(str(x) for x in t['temperatures'])}"
    cov = info["coverage"]

    def num(v: Any, fmt: str) -> str:
        return format(v, fmt) if v is not None else "-"

    lines = [
        f"cache       {info['url']}",
        f"format      logitcache {info['format_version']} ({info['backend']}), "
        f"{info['created_by']} {info['created_at']}".rstrip(),
        f"rows        {info['rows']:,} x seq_len {info['seq_len']} = {info['tokens']:,} tokens; "
        f"{info['positions']:,} positions with targets",
        f"targets     {what}; codec {info['codec']}",
        f"vocab       {info['vocab_size']:,} (padded {info['padded_vocab_size']:,})",
        f"size        {info['bytes']:,} bytes in {info['shards']} shards; "
        f"{num(info['bytes_per_token'], '.1f')} B/token, "
        f"{num(info['bytes_per_entry'], '.3f')} B/entry",
        f"coverage    captured mass {num(cov['captured_mass'], '.4f')}, "
        f"teacher entropy {num(cov['entropy'], '.3f')} nats"
        + (
            f", teacher NLL {cov['teacher_nll']:.3f} nats (perplexity "
            f"{math.exp(min(cov['teacher_nll'], 700.0)):.1f})"
            if cov.get("teacher_nll") is not None
            else ""
        ),
        f"digest      {info.get('content_digest') or '-'} (train --expect-digest)",
    ]
    if not info.get("digest_ok", True):
        lines.append(
            f"            STORED DIGEST DIFFERS: the manifest says {info['stored_digest']}; it was "
            "edited after its commit, so readers refuse it: re-copy or re-dump the cache"
        )
    for key in ("teacher", "tokenizer", "dataset"):
        src = info[key]
        fp = (src.get("fingerprint") or "-")[:16]
        lines.append(f"{key:<11} {src.get('name') or '-'} (fingerprint {fp})")
        if key == "tokenizer":  # format 1.3: the cache stores its tokenizer's files
            files = src.get("files") or []
            stored = ", ".join(f"{f['path']} ({f['bytes']:,} B)" for f in files)
            lines.append(
                f"            stored: {stored}"
                if files
                else "            its files are not stored (a cache before format 1.3): "
                "commands that decode its tokens take --teacher-tokenizer"
            )
    return "\n".join(lines)
