"""The ``logitcache`` command line. Thin: each command parses options and calls one library
function; one module per family (:mod:`.dump`, :mod:`.train`, :mod:`.cache`, :mod:`.transform`,
:mod:`.report`, :mod:`.demo`), the
shared options and the error wrapper in :mod:`._common`.
"""

from __future__ import annotations

import click

from logitcache import __version__
from logitcache.cli.cache import cp, finalize, info, merge, verify
from logitcache.cli.demo import demo
from logitcache.cli.dump import dump
from logitcache.cli.report import report_command
from logitcache.cli.train import train
from logitcache.cli.transform import (
    align_command,
    export_command,
    import_command,
    mix_command,
)

__all__ = ["cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="logitcache")
def cli() -> None:
    """Offline knowledge distillation: cache a teacher's sparse soft labels once, train many
    students from them."""


for _command in (
    dump,
    train,
    info,
    verify,
    finalize,
    cp,
    merge,
    import_command,
    export_command,
    mix_command,
    align_command,
    report_command,
    demo,
):
    cli.add_command(_command)


def main() -> None:
    cli()
