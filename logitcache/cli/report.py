"""``logitcache report``: a cache, or training runs, as one self-contained HTML page."""

from __future__ import annotations

import click

from logitcache.cli._common import friendly_errors, parse_storage_options, storage_option
from logitcache.report.cache_stats import DEFAULT_MAX_POSITIONS

__all__ = ["report_command"]


@click.command("report")
@click.argument("paths", nargs=-1, required=True)
@click.option(
    "--out",
    default="report.html",
    show_default=True,
    help="The HTML page to write; each figure also goes to <stem>-<name>.png next to it.",
)
@click.option(
    "--max-positions",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_POSITIONS,
    show_default=True,
    help="Cache report: read at most this many target positions (a seeded sample beyond it).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the position sample.")
@storage_option
@friendly_errors
def report_command(
    paths: tuple[str, ...],
    out: str,
    max_positions: int,
    seed: int,
    storage_options: tuple[str, ...],
) -> None:
    """Plots of a CACHE (captured mass vs k, fidelity vs bytes, entropy, where the bytes go, a
    recommendation) or of one or more training RUN_DIRs (loss, learning rate, eval metrics,
    throughput; several runs overlaid). Needs matplotlib: pip install 'logitcache[report]'.

    \b
    logitcache report CACHE [--out report.html]
    logitcache report RUN_DIR [RUN_DIR ...] [--out report.html]
    """
    from logitcache.report import report

    result = report(
        list(paths),
        out,
        max_positions=max_positions,
        seed=seed,
        storage_options=parse_storage_options(storage_options),
    )
    extra = " (positions sampled; the page says how)" if result.sampled else ""
    click.echo(f"wrote {result.html} and {len(result.images)} PNG files next to it{extra}")
