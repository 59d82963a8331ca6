"""The cache report's page: identity, sample, recommendation, then one section per figure.

Tables carry the exact values in ``data-value`` (see :mod:`.html`); the captured-mass table has
one row per k' in 1, 2, 4, ... and the stored k (``<tr data-k="8">``).
"""

from __future__ import annotations

import math

import numpy as np

from logitcache.report import html as h
from logitcache.report.cache_stats import CacheStats, candidate_ks

__all__ = ["cache_sections"]


def _identity(s: CacheStats) -> str:
    m = s.manifest
    t = m.targets
    what = f"top-{t.k}" + (" + tail mass" if t.tail == "bucket" else f" (tail {t.tail})")
    if t.method == "sampled":
        what = f"sampled, n = {t.samples} draws"
    rows: list[list[str]] = [
        ["content digest", m.content_digest],
        ["format", f"logitcache {m.format_version} ({m.backend}), {m.created_by} {m.created_at}"],
        ["targets", what],
        ["codec", str(m.codec.to_dict())],
        ["vocabulary", f"{m.vocab_size:,} (padded {m.padded_vocab_size:,})"],
        ["rows", f"{m.num_rows:,} x seq_len {m.seq_len} = {m.num_rows * m.seq_len:,} tokens"],
        ["positions with targets", f"{m.num_positions:,}"],
        ["size", f"{m.num_bytes:,} bytes in {len(m.shards)} shards"],
    ]
    for key, src in (("teacher", m.teacher), ("tokenizer", m.tokenizer), ("dataset", m.dataset)):
        rev = f" @ {src.revision}" if src.revision else ""
        rows.append([key, f"{src.name or '-'}{rev} (fingerprint {src.fingerprint or '-'})"])
    cov = m.coverage
    if cov.captured_mass is not None:
        rows.append(["captured mass (dump, all positions)", f"{cov.captured_mass:.4f}"])
    if cov.entropy is not None:
        rows.append(["teacher entropy (dump, full vocabulary)", f"{cov.entropy:.4f} nats"])
    if cov.teacher_nll is not None:
        ppl = math.exp(min(cov.teacher_nll, 700.0))
        rows.append(
            [
                "teacher NLL / perplexity on the dumped tokens",
                f"{cov.teacher_nll:.4f} nats / {ppl:.2f}",
            ]
        )
    table = h.table(["", ""], rows, ident="identity", left=2)
    bpt = s.usage.bytes_per_token
    return table + (
        f'<p>bytes/token (whole cache): <b id="bytes-per-token" data-value="{bpt!r}">'
        f"{bpt:.2f}</b></p>"
    )


def _sample_note(s: CacheStats) -> str:
    if not s.sampled:
        return h.paragraph(
            f"Every one of the cache's {s.total_positions:,} target positions was read "
            f"({s.shards_read} shard{'s' if s.shards_read != 1 else ''}).",
            "note",
            "sample",
        )
    frac = s.positions / max(s.total_positions, 1)
    return h.paragraph(
        f"SAMPLED: the figures come from {s.positions:,} of the cache's {s.total_positions:,} "
        f"target positions ({frac:.2%}), read from {s.shards_read} of {len(s.manifest.shards)} "
        f"shards: shards in a random order (seed {s.seed}) until they held {s.max_positions:,} "
        "positions, then that many positions drawn uniformly from them (logitcache report "
        "--max-positions / --seed; docs/report.md). The identity and bytes come from the manifest "
        "and cover the whole cache.",
        "note",
        "sample",
    )


def _mass_table(s: CacheStats) -> str:
    c = s.curves
    if c is None:
        return ""
    rows = []
    for k in candidate_ks(c.k):
        i = k - 1
        cells = [
            f"<td>{k}</td>",
            h.num(float(c.mass_mean[i]), ".4f", "mass-mean"),
            h.num(float(c.mass_median[i]), ".3f", "mass-median"),
            h.num(float(c.mass_p5[i]), ".3f", "mass-p5"),
            h.num(float(c.kl_stored[i]), ".4f", "kl-stored"),
            h.num(None if c.kl_full is None else float(c.kl_full[i]), ".4f", "kl-full"),
            h.num(s.usage.bytes_per_token_at(k, c.k), ".1f", "bytes-per-token"),
        ]
        rows.append(f'<tr data-k="{k}">' + "".join(cells) + "</tr>")
    header = "".join(
        f"<th>{x}</th>"
        for x in (
            "k'",
            "mean mass",
            "median mass",
            "5th pct mass",
            "KL to stored (nats)",
            "KL to full vocab (nats)",
            "bytes/token (est.)",
        )
    )
    return f'<table id="mass-table"><tr>{header}</tr>{"".join(rows)}</table>'


def cache_sections(
    s: CacheStats, figures: dict[str, bytes], recommendation: str
) -> tuple[str, list[h.Section]]:
    intro = _sample_note(s) + h.paragraph(recommendation, "rec", "recommendation")
    sections = [h.Section("Identity", _identity(s), "identity")]
    if "mass" in figures:
        body = h.figure("mass", figures["mass"], "captured teacher mass") + _mass_table(s)
        body += h.paragraph(
            "Captured mass: the sum of the stored probabilities of the k' most likely ids. Median "
            "and 5th percentile from a 1,000-bin histogram (within 0.001); means exact."
            if s.curves is not None
            else "Captured mass: the teacher's probability of the distinct ids drawn at a position "
            "(from the stored log-probs of the draws).",
            "note",
        )
        sections.append(h.Section("Captured teacher mass", body, "mass"))
    if "fidelity" in figures:
        body = h.figure("fidelity", figures["fidelity"], "fidelity curve") + h.paragraph(
            "The reference of 'KL to stored' is this cache's own top-k + tail distribution, NOT "
            "the teacher's full vocabulary: it shows what a smaller k would lose against this "
            "cache, and is 0 at the stored k by construction. The tail bucket's mass is spread "
            "evenly over the ids not listed (the only completion the stored numbers allow)."
            + (
                " 'KL to full vocab' uses the full-vocabulary entropy the dump recorded "
                f"(mean {s.manifest.coverage.entropy:.4f} nats): mean KL(full || top-k' + tail) "
                "= mean entropy of top-k' + evenly spread tail - mean full entropy"
                + (" (an estimate on the sample)." if s.sampled else ".")
                if s.manifest.coverage.entropy is not None
                else " The dump recorded no entropy, so the distance to the full vocabulary "
                "cannot be computed."
            )
            + " Bytes at k' are estimated by scaling the per-entry arrays by k'/k.",
            "note",
        )
        sections.append(h.Section("Fidelity vs k and vs bytes", body, "fidelity"))
    sections.append(
        h.Section("Entropy and top-1 probability", _dist_body(s, figures), "distributions")
    )
    sections.append(h.Section("Where the bytes go", _bytes_body(s, figures), "bytes"))
    if s.notes:
        sections.append(h.Section("Notes", "".join(h.paragraph(n, "note") for n in s.notes)))
    return intro, sections


def _dist_body(s: CacheStats, figures: dict[str, bytes]) -> str:
    rows = []
    for name, arr in (
        ("top-1 probability", s.top1),
        ("entropy (nats)", s.entropy),
        ("unique ids", s.unique),
    ):
        if arr is not None and arr.size:
            q = np.quantile(arr, (0.05, 0.5, 0.95))
            rows.append([name, h.num(float(arr.mean())), *(h.num(float(x)) for x in q)])
    body = h.figure("distributions", figures["distributions"], "entropy and top-1 distributions")
    body += h.table(["", "mean", "5th pct", "median", "95th pct"], rows, ident="distributions")
    if s.curves is not None:
        body += h.paragraph(
            "Entropy here is that of the stored top-k with the tail as one outcome: a lower bound "
            "of the teacher's; the line marks the dump's full-vocabulary mean.",
            "note",
        )
    return body


def _bytes_body(s: CacheStats, figures: dict[str, bytes]) -> str:
    u = s.usage
    rows = [
        [
            name,
            h.num(b, ",d"),
            h.num(b / u.tokens if u.tokens else None, ".3f", "array-bytes-per-token"),
        ]
        for name, b in u.per_array.items()
    ]
    body = h.figure("bytes", figures["bytes"], "bytes per array and per shard")
    body += h.table(
        ["array", "bytes", "bytes/token"], rows, ident="bytes-table", keys=list(u.per_array)
    )
    if u.estimated:
        body += h.paragraph(
            "Arrow shards are one file each: the split per array is ESTIMATED from the zstd-"
            "compressed sizes of each column's buffers in one shard, applied to the cache's bytes. "
            "Per-shard bytes are exact (from the manifest).",
            "note",
        )
    return body
