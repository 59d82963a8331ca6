"""Stored bytes/token vs student quality, one point per arm of ``scripts/exp_targets.py``.

    python -m logitcache.report.experiments RESULTS.json --out figure.png

``RESULTS.json`` is that script's output (``OUT/results.json``, or its last printed line): arm
name -> ``bytes_per_token`` (``0`` for hard labels: the labels are the text; ``null`` for online
KD, which stores nothing and pays the teacher on every step), ``kl_to_teacher`` and
``heldout_ce`` with their ``*_std`` over seeds. Online KD is drawn as a horizontal line (the
reference every cache approximates); the ``teacher`` row, if present, is left out.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from logitcache.report.plots import png_bytes, require_matplotlib

__all__ = ["targets_figure"]

_LABELS = {
    "hard": "hard labels",
    "topk12-renorm": "top-12, renormalised",
    "topk12-tail": "top-12 + tail",
    "topk64-tail": "top-64 + tail",
    "sampled": "sampled",
}


def targets_figure(results: Mapping[str, Mapping[str, Any]]) -> bytes:
    """PNG: bytes/token vs full-vocabulary KL to the teacher and vs held-out CE, per arm."""
    figure = require_matplotlib()
    fig = figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    for ax, key, title in (
        (axes[0], "kl_to_teacher", "KL(teacher || student), full vocabulary (nats)"),
        (axes[1], "heldout_ce", "held-out cross-entropy of the true text (nats)"),
    ):
        arms = {a: r for a, r in results.items() if a != "teacher" and key in r}
        values = sorted(float(r[key]) for r in arms.values())
        mid = values[len(values) // 2]
        # an arm far off the others (renormalised top-k) would squash them: drawn at the top
        # edge with its value written next to it
        near = [v for v in values if v <= 1.5 * mid]
        pad = 0.15 * (max(near) - min(near) or 1.0)
        top = max(near) + pad
        for i, (arm, r) in enumerate(arms.items()):
            y, err = float(r[key]), float(r.get(f"{key}_std") or 0.0)
            label = _LABELS.get(arm, arm)
            if arm == "sampled" and r.get("samples"):
                label = f"sampled, n = {r['samples']}"
            if r.get("bytes_per_token") is None:
                ax.axhline(y, color="k", ls="--", lw=1, label=f"{label} (no cache)")
                continue
            x = float(r["bytes_per_token"])
            if y > top:
                ax.plot(x, top - pad / 4, "^", color=f"C{i}", label=f"{label} ({y:.2f}, off scale)")
                ax.annotate(
                    f"{y:.2f}",
                    (x, top - pad / 4),
                    textcoords="offset points",
                    xytext=(6, -3),
                    fontsize=8,
                )
                continue
            ax.errorbar(x, y, yerr=err, fmt="o", capsize=3, color=f"C{i}", label=label)
        ax.set_ylim(min(near) - pad, top)
        ax.set_xlabel("stored bytes/token")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper right")
    return png_bytes(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", help="scripts/exp_targets.py's results.json")
    ap.add_argument("--out", default="exp_targets.png")
    args = ap.parse_args()
    data = json.loads(Path(args.results).read_text())
    Path(args.out).write_bytes(targets_figure(data))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
