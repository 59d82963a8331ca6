"""``logitcache report``: a cache or training runs, as one self-contained HTML page plus PNGs.

``report(paths)`` picks the kind from what it is given: one cache (a location holding
``manifest.json``) gives the cache report (:func:`report_cache`); one or more training run
directories (each holding ``metrics.jsonl``) give the run report with their curves overlaid
(:func:`report_runs`). The page is written atomically to ``out`` (a temporary then
``os.replace``) and each figure also to ``<out stem>-<name>.png`` next to it.

The recommendation paragraph is computed, not written by hand: among k' = 1, 2, 4, ... below the
stored k, the smallest whose *median* captured mass is within 0.02 of the stored k's median is
proposed, with what it gives up (mass, KL to the stored distribution, and to the full
vocabulary when the dump recorded the entropy) and the bytes it would save. None qualifying
means the stored k is not larger than its mass curve needs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from logitcache.errors import ConfigError
from logitcache.format.manifest import MANIFEST_NAME
from logitcache.report import html as h
from logitcache.report.cache_stats import (
    DEFAULT_MAX_POSITIONS,
    CacheStats,
    cache_stats,
    candidate_ks,
)
from logitcache.report.plots import cache_figures, require_matplotlib, run_figures
from logitcache.report.runs import is_run_dir, read_run
from logitcache.store._fs import open_location

__all__ = ["ReportResult", "recommendation", "report", "report_cache", "report_runs"]

MASS_SLACK = 0.02  # how much median captured mass a smaller k may give up to be proposed


@dataclass(frozen=True)
class ReportResult:
    """What was written: the page, the PNG files, and whether positions were sampled."""

    html: Path
    images: tuple[Path, ...]
    kind: Literal["cache", "runs"]
    sampled: bool = False


def _write(
    out: str | os.PathLike[str], text: str, figures: Mapping[str, bytes]
) -> tuple[Path, tuple[Path, ...]]:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = []
    for name, png in figures.items():
        img = path.with_name(f"{path.stem}-{name}.png")
        img.write_bytes(png)
        images.append(img)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path, tuple(images)


def recommendation(s: CacheStats) -> str:
    """The page's one-paragraph recommendation (see the module docstring)."""
    m, c, u = s.manifest, s.curves, s.usage
    if c is None:
        n = int(m.targets.samples or 0)
        text = f"Sampled targets, n = {n} draws per position"
        if s.unique is not None and s.unique.size:
            q = [float(x) for x in _quantiles(s.unique, (0.05, 0.5, 0.95))]
            text += (
                f": a median {q[1]:.0f} unique ids per position (5th-95th percentile "
                f"{q[0]:.0f}-{q[2]:.0f}), {u.bytes_per_token:.1f} bytes/token"
            )
        if s.captured_mass is not None:
            mid = _quantiles(s.captured_mass, (0.5,))[0]
            text += f"; the drawn ids carry a median {mid:.3f} of the mass"
        return text + (
            ". A sampled cache has no truncation bias (its estimate of the teacher is unbiased); "
            "its error is the estimator's variance, which falls as 1/n: more draws cost bytes in "
            "proportion to the unique ids, which grow much slower than n on a peaked teacher."
        )
    k = c.k
    med = c.mass_median
    base = (
        f"At the stored k = {k}, the median position keeps {med[-1]:.3f} of the teacher's mass "
        f"(5th percentile {c.mass_p5[-1]:.3f}); the tail bucket carries the rest"
    )
    if c.kl_full is not None:
        base += (
            f", and top-{k} + tail is {c.kl_full[-1]:.3f} nats (mean KL) from the full distribution"
        )
    pick = next((j for j in candidate_ks(k)[:-1] if med[-1] - med[j - 1] <= MASS_SLACK), None)
    if pick is None:
        half = max(1, k // 2)
        return base + (
            f". Every smaller k gives up more than {MASS_SLACK} of the median mass (k = {half}: "
            f"{med[half - 1]:.3f}, KL {c.kl_stored[half - 1]:.3f} nats to this cache's "
            f"distribution): keep k = {k}. If the distance to the full distribution matters, a "
            "larger k, or sampled targets at the same bytes (docs/experiments.md), would bring "
            "the student closer."
        )
    saved = u.bytes_per_token / max(u.bytes_per_token_at(pick, k), 1e-12)
    text = (
        f"{base}. k = {pick} keeps a median {med[pick - 1]:.3f} of the mass (within {MASS_SLACK} "
        f"of k = {k}) at a mean KL of {c.kl_stored[pick - 1]:.3f} nats to this cache's distribution"
    )
    if c.kl_full is not None:
        text += f" ({c.kl_full[pick - 1]:.3f} to the full vocabulary)"
    return text + (
        f"; the tail bucket carries the rest; about {saved:.1f}x fewer bytes "
        f"({u.bytes_per_token_at(pick, k):.1f} instead of {u.bytes_per_token:.1f} bytes/token, "
        "estimated)."
    )


def _quantiles(values: Any, qs: Sequence[float]) -> list[float]:
    import numpy as np

    return [float(np.quantile(values, q)) for q in qs]


def _is_cache(path: str, storage_options: Mapping[str, Any] | None) -> bool:
    try:
        return open_location(path, storage_options).exists(MANIFEST_NAME)
    except (OSError, ValueError):
        return False


def report(
    paths: Sequence[str],
    out: str | os.PathLike[str] = "report.html",
    *,
    max_positions: int = DEFAULT_MAX_POSITIONS,
    seed: int = 0,
    storage_options: Mapping[str, Any] | None = None,
) -> ReportResult:
    """The report of one cache, or of one or more training runs (see the module docstring)."""
    if not paths:
        raise ConfigError("report needs a cache or one or more training run directories")
    require_matplotlib()  # before any work: the missing extra is named at once
    if all(is_run_dir(p) for p in paths):
        return report_runs(paths, out)
    if len(paths) == 1 and _is_cache(paths[0], storage_options):
        return report_cache(
            paths[0], out, max_positions=max_positions, seed=seed, storage_options=storage_options
        )
    bad = [p for p in paths if not is_run_dir(p)]
    if len(paths) > 1:
        raise ConfigError(
            f"{', '.join(bad)}: not a training run directory (no metrics.jsonl); with several "
            "paths, report overlays training runs, so every path must be a `logitcache train "
            "--out` directory (report one cache at a time)"
        )
    raise ConfigError(
        f"{paths[0]} is neither a cache (no manifest.json) nor a training run (no metrics.jsonl)"
    )


def report_cache(
    url: str,
    out: str | os.PathLike[str] = "report.html",
    *,
    max_positions: int = DEFAULT_MAX_POSITIONS,
    seed: int = 0,
    storage_options: Mapping[str, Any] | None = None,
) -> ReportResult:
    from logitcache.report.cache_page import cache_sections

    require_matplotlib()
    stats = cache_stats(url, max_positions, seed, storage_options)
    figures = cache_figures(stats)
    intro, sections = cache_sections(stats, figures, recommendation(stats))
    text = h.page(f"logitcache report: {url}", intro, sections)
    path, images = _write(out, text, figures)
    return ReportResult(path, images, "cache", stats.sampled)


def _names(paths: Sequence[str]) -> list[str]:
    names = [Path(p).resolve().name for p in paths]
    if len(set(names)) == len(names):
        return names
    return [str(Path(p)) for p in paths]


def report_runs(paths: Sequence[str], out: str | os.PathLike[str] = "report.html") -> ReportResult:
    require_matplotlib()
    runs = [read_run(p, n) for p, n in zip(paths, _names(paths), strict=True)]
    figures = run_figures(runs)
    metrics = sorted(
        {k for r in runs for k in (r.evals[-1] if r.evals else {}) if k != "positions"}
    )
    rows = []
    for r in runs:
        sm = r.summary or {}
        last = r.evals[-1] if r.evals else {}
        rows.append(
            [
                r.name,
                h.num(r.steps[-1] if r.steps else None, "d", "steps"),
                h.num(r.loss[-1] if r.loss else None, ".4f", "final-loss"),
                h.num(sm.get("steps_per_s"), ".2f", "steps-per-s"),
                h.num(sm.get("tokens_per_s"), ",.0f", "tokens-per-s"),
                *(h.num(last.get(mm), ".4f", f"eval-{mm}") for mm in metrics),
            ]
        )
    table = h.table(
        ["run", "steps", "final loss", "steps/s", "tokens/s", *(f"eval {mm}" for mm in metrics)],
        rows,
        ident="runs",
        keys=[r.name for r in runs],
    )
    what = {
        "loss": "training loss and learning rate vs step",
        "eval": "evaluation metrics vs step",
        "throughput": "throughput vs step",
    }
    sections = [
        h.Section(
            "Runs",
            table
            + h.paragraph(
                "Eval columns are the last evaluation of each run (the final one when it "
                "finished). tokens/s on the curves is the average since the run (or its resume) "
                "started.",
                "note",
            ),
            "runs",
        )
    ]
    for name, png in figures.items():
        sections.append(
            h.Section(
                what.get(name, name).capitalize(), h.figure(name, png, what.get(name, name)), name
            )
        )
    intro = h.paragraph(
        f"{len(runs)} training run(s), curves overlaid: "
        + ", ".join(f"{r.name} ({r.path})" for r in runs)
    )
    text = h.page("logitcache report: training runs", intro, sections)
    path, images = _write(out, text, figures)
    return ReportResult(path, images, "runs")
