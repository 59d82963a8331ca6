"""The report's figures, drawn with matplotlib (the optional ``report`` extra) to PNG bytes.

matplotlib is imported inside :func:`require_matplotlib`, never at module import, so the rest of
``logitcache.report`` (info, verify, the statistics) works without it. Figures are made with
``matplotlib.figure.Figure`` directly (the Agg canvas, no ``pyplot``): no global state, no GUI
backend, safe in threads and on headless machines.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from logitcache.errors import ConfigError
from logitcache.report.cache_stats import CacheStats
from logitcache.report.runs import RunLog

__all__ = [
    "MISSING_MATPLOTLIB",
    "cache_figures",
    "draw_run_figures",
    "png_bytes",
    "require_matplotlib",
    "run_figures",
]

MISSING_MATPLOTLIB = (
    "logitcache report draws its figures with matplotlib, which is not installed: "
    "pip install 'logitcache[report]' (the optional extra)"
)
_DPI = 100
_EVAL_ORDER = ("kl", "sampled_ce", "ce", "top1_agreement", "ece")


def require_matplotlib() -> Any:
    """``matplotlib.figure.Figure``, or a :class:`ConfigError` naming the extra."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ConfigError(MISSING_MATPLOTLIB) from e
    return Figure


def png_bytes(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight")
    return buf.getvalue()


def _hist(ax: Any, values: np.ndarray, title: str, xlabel: str, bins: Any = 50) -> None:
    ax.hist(values, bins=bins, color="#4477aa")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("positions")


def _mass_figure(figure: Any, s: CacheStats) -> bytes | None:
    c = s.curves
    if s.captured_mass is None and c is None:
        return None
    fig = figure(figsize=(11, 4))
    left, right = fig.subplots(1, 2)
    if s.captured_mass is not None:
        what = f"top-{c.k}" if c is not None else "the drawn ids"
        _hist(left, s.captured_mass, f"teacher mass captured by {what}", "captured mass", 50)
        for q, style in ((0.5, "-"), (0.05, "--")):
            v = float(np.quantile(s.captured_mass, q))
            left.axvline(
                v, color="k", ls=style, lw=1, label=f"{'median' if q == 0.5 else '5th pct'} {v:.3f}"
            )
        left.legend(loc="upper left")
    if c is None:
        right.set_axis_off()
        return png_bytes(fig)
    k = np.arange(1, c.k + 1)
    right.plot(k, c.mass_mean, label="mean")
    right.plot(k, c.mass_median, label="median")
    right.plot(k, c.mass_p5, label="5th percentile")
    right.plot([c.k], [c.mass_median[-1]], "o", color="C1")
    right.plot([c.k], [c.mass_p5[-1]], "o", color="C2")
    right.annotate(
        f"{c.mass_median[-1]:.3f}",
        (c.k, c.mass_median[-1]),
        textcoords="offset points",
        xytext=(-30, 6),
    )
    right.annotate(
        f"{c.mass_p5[-1]:.3f}", (c.k, c.mass_p5[-1]), textcoords="offset points", xytext=(-30, 6)
    )
    right.set_xscale("log", base=2)
    right.set_xlabel("k (ids kept per position)")
    right.set_ylabel("teacher mass captured")
    right.set_title("mass captured vs k (from the stored targets)")
    right.set_ylim(0, 1.02)
    right.grid(alpha=0.3)
    right.legend(loc="lower right")
    return png_bytes(fig)


def _fidelity_figure(figure: Any, s: CacheStats) -> bytes | None:
    c = s.curves
    if c is None:
        return None
    fig = figure(figsize=(11, 4))
    left, right = fig.subplots(1, 2)
    k = np.arange(1, c.k + 1)
    bpt = np.array([s.usage.bytes_per_token_at(int(j), c.k) for j in k])
    for ax, x, label in ((left, k, "k' (ids kept)"), (right, bpt, "bytes/token (estimated at k')")):
        ax.plot(x, c.kl_stored, label="vs the stored top-k + tail")
        if c.kl_full is not None:
            ax.plot(x, c.kl_full, label="vs the full vocabulary (from the dump's entropy)")
        ax.set_xlabel(label)
        ax.set_ylabel("mean KL (nats)")
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left")
    left.set_xscale("log", base=2)
    left.set_title("KL(reference || top-k' + tail bucket)")
    right.set_title("the same vs stored size")
    return png_bytes(fig)


def _distribution_figure(figure: Any, s: CacheStats) -> bytes:
    panels = 2 + (s.unique is not None)
    fig = figure(figsize=(5.5 * panels, 4))
    axes = fig.subplots(1, panels)
    if s.entropy is not None:
        title = (
            "entropy of the stored top-k + tail (lower bound)"
            if s.curves is not None
            else "entropy estimate from the draws"
        )
        _hist(axes[0], s.entropy, title, "nats", 50)
        h = s.manifest.coverage.entropy
        if h is not None:
            axes[0].axvline(h, color="k", lw=1, label=f"full-vocabulary mean {h:.3f}")
            axes[0].legend(loc="upper right")
    else:
        axes[0].text(
            0.5,
            0.5,
            "no per-position entropy:\nthe draws' log-probs were not stored",
            ha="center",
            va="center",
        )
        axes[0].set_axis_off()
    _hist(axes[1], s.top1, "top-1 probability", "probability", np.linspace(0, 1, 51))
    if s.unique is not None:
        n = int(s.manifest.targets.samples or 1)
        top = int(s.unique.max()) if s.unique.size else 1
        _hist(
            axes[2],
            s.unique,
            f"unique ids per position (n = {n} draws)",
            "unique ids",
            np.arange(0.5, top + 1.5),
        )
    return png_bytes(fig)


def _bytes_figure(figure: Any, s: CacheStats) -> bytes:
    u = s.usage
    fig = figure(figsize=(11, 4))
    left, right = fig.subplots(1, 2)
    names = list(u.per_array)
    vals = [u.per_array[n] / u.tokens if u.tokens else 0.0 for n in names]
    left.barh(names[::-1], vals[::-1], color="#4477aa")
    left.set_xlabel("bytes/token")
    left.set_title("bytes per stored array" + (" (estimated)" if u.estimated else ""))
    per = [b / t if t else 0.0 for _, b, t in u.per_shard]
    right.bar(np.arange(len(per)), per, color="#66aa55", width=1.0 if len(per) > 50 else 0.8)
    right.xaxis.get_major_locator().set_params(integer=True)
    right.set_xlabel("shard (manifest order)")
    right.set_ylabel("bytes/token")
    right.set_title(f"bytes/token per shard ({len(per)} shard{'s' if len(per) != 1 else ''})")
    return png_bytes(fig)


def cache_figures(s: CacheStats) -> dict[str, bytes]:
    """Name -> PNG bytes of every figure of a cache report."""
    figure = require_matplotlib()
    out: dict[str, bytes] = {}
    for name, draw in (
        ("mass", _mass_figure),
        ("fidelity", _fidelity_figure),
        ("distributions", _distribution_figure),
        ("bytes", _bytes_figure),
    ):
        png = draw(figure, s)
        if png is not None:
            out[name] = png
    return out


def _eval_metrics(runs: Sequence[RunLog]) -> list[str]:
    seen: dict[str, None] = {}
    for r in runs:
        for m in r.eval_metrics:
            seen.setdefault(m, None)
    ordered = [m for m in _EVAL_ORDER if m in seen]
    return ordered or [m for m in seen if m != "ppl"]


def run_figures(runs: Sequence[RunLog]) -> dict[str, bytes]:
    """Name -> PNG bytes of the figures of one or more training runs (curves overlaid)."""
    return {name: png_bytes(fig) for name, fig in draw_run_figures(runs).items()}


def draw_run_figures(runs: Sequence[RunLog]) -> dict[str, Any]:
    """Name -> matplotlib ``Figure`` of :func:`run_figures` (one line per run in every panel)."""
    figure = require_matplotlib()
    out: dict[str, Any] = {}
    fig = figure(figsize=(11, 4))
    left, right = fig.subplots(1, 2)
    for r in runs:
        left.plot(r.steps, r.loss, label=r.name)
        right.plot(r.steps, r.lr, label=r.name)
    left.set(title="training loss", xlabel="step", ylabel="loss")
    right.set(title="learning rate", xlabel="step", ylabel="lr")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    out["loss"] = fig
    metrics = _eval_metrics(runs)
    if metrics:
        cols = min(len(metrics), 3)
        rows = math.ceil(len(metrics) / cols)
        fig = figure(figsize=(5 * cols, 3.6 * rows))
        axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
        for ax, metric in zip(axes, metrics, strict=False):
            for r in runs:
                xs, ys = r.eval_series(metric)
                ax.plot(xs, ys, "o-", label=r.name)
            ax.set(title=f"eval {metric}", xlabel="step")
            ax.grid(alpha=0.3)
            ax.legend()
        for ax in axes[len(metrics) :]:
            ax.set_axis_off()
        out["eval"] = fig
    fig = figure(figsize=(6, 4))
    ax = fig.subplots()
    for r in runs:
        ax.plot(r.steps, r.tokens_per_s, label=r.name)
    ax.set(title="throughput", xlabel="step", ylabel="tokens/s (since start)")
    ax.grid(alpha=0.3)
    ax.legend()
    out["throughput"] = fig
    return out
