"""What every command shares: the error wrapper, the storage options, and flags made from the
library's config dataclasses.

A :class:`LogitCacheError` becomes ``error: <message>`` on stderr and exit status 1; any other
exception keeps its traceback, because it is a bug in logitcache.

**Flags are projections of the configs.** :func:`config_option` builds a click option from one
field of a frozen config dataclass (``DumpConfig``, ``TrainConfig``, ``DemoConfig``): the flag is
the field's name (``batch_size`` -> ``--batch-size``), the default is the field's default (shown
in ``--help``), the help text is ``field(metadata={"help": ...})``, choices come from a
``Literal`` annotation or ``metadata["choices"]`` (the loss registry, the sampler's orders...),
``bool`` fields are ``--x/--no-x`` switches and ``tuple[T, ...]`` fields repeatable flags. A flag
in other units (``--shard-mb`` for ``shard_bytes``) declares its unit: its default is computed
from the field's default and its value is converted back (refusing values <= 0). So a default,
a choice list or a help line is written once, in the library.

Building these options needs the config classes, whose modules import torch; a command with
``cls=ConfigCommand`` builds them on first use (its ``--help`` or its run), so ``logitcache
--help`` and the cache tools start without torch.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import click

from logitcache.errors import LogitCacheError

__all__ = [
    "MIB",
    "ConfigCommand",
    "config_option",
    "config_options",
    "dst_storage_option",
    "friendly_errors",
    "parse_storage_options",
    "storage_option",
]

MIB = 1 << 20

F = TypeVar("F", bound=Callable[..., Any])


def friendly_errors(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LogitCacheError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


def parse_storage_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``--storage-option key=value`` pairs as a dict (values parsed as JSON when possible)."""
    out: dict[str, Any] = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key:
            raise click.BadParameter(
                f"expected key=value, got {p!r}", param_hint="--storage-option"
            )
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


storage_option = click.option(
    "--storage-option",
    "storage_options",
    multiple=True,
    metavar="KEY=VALUE",
    help="fsspec option for the cache's filesystem (repeatable); VALUE is parsed as JSON "
    "if it can be.",
)


dst_storage_option = click.option(
    "--dst-storage-option",
    "dst_storage_options",
    multiple=True,
    metavar="KEY=VALUE",
    help="fsspec option for the destination only (repeatable; overrides --storage-option).",
)


def _field(cls: type, name: str) -> dataclasses.Field[Any]:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def config_option(
    cls: type,
    name: str,
    *decls: str,
    unit: tuple[str, int] | None = None,
    help: str | None = None,
    required: bool | None = None,
    **extra: Any,
) -> Callable[[F], F]:
    """A click option for field ``name`` of config dataclass ``cls`` (see the module docstring).

    ``decls`` overrides the flag spelling (e.g. ``"--temperature"`` for ``temperatures``);
    ``unit=("MiB", MIB)`` makes a flag in that unit; ``help`` defaults to the field's metadata.
    The value reaches the command under the field's name.
    """
    f = _field(cls, name)
    tp = _unwrap_optional(typing.get_type_hints(cls)[name])
    default = _default(f)
    kw: dict[str, Any] = {
        "help": help if help is not None else f.metadata.get("help"),
        "show_default": True,
    }
    if (
        required
        if required is not None
        else f.default is dataclasses.MISSING and (f.default_factory is dataclasses.MISSING)
    ):
        kw["required"] = True
    flag = f"--{name.replace('_', '-')}"
    if unit is not None:
        label, factor = unit

        def to_units(ctx: click.Context, param: click.Parameter, value: float) -> int:
            if not value > 0:
                raise click.BadParameter(f"must be > 0 {label}, got {value}")
            return max(1, round(value * factor))

        kw.update(type=float, default=default / factor, callback=to_units, metavar=label.upper())
    elif tp is bool:
        decls = decls or (f"{flag}/--no-{flag[2:]}",)
        kw["default"] = default
        if default is None:
            kw["show_default"] = False
    elif typing.get_origin(tp) is tuple:
        kw.update(multiple=True, type=typing.get_args(tp)[0], default=default or ())
        kw["show_default"] = False
    else:
        choices = f.metadata.get("choices")
        if choices is None and typing.get_origin(tp) is typing.Literal:
            choices = typing.get_args(tp)
        if choices is not None:
            kw["type"] = click.Choice(list(choices))
        elif tp in (int, float, str):
            kw["type"] = tp
        kw["default"] = default
        if default is None:
            kw["show_default"] = False
    kw.update(extra)
    return click.option(*(decls or (flag,)), name, **kw)


def config_options(
    cls: type, helps: Mapping[str, str], spelling: Mapping[str, Mapping[str, Any]]
) -> list[Callable[[F], F]]:
    """:func:`config_option` for each field named in ``helps`` (its help line), in that order;
    ``spelling[name]`` adds ``decls`` (the flag's spelling) and any other keyword."""
    out = []
    for name, text in helps.items():
        kw = dict(spelling.get(name, {}))
        out.append(config_option(cls, name, *kw.pop("decls", ()), help=text, **kw))
    return out


class ConfigCommand(click.Command):
    """A command whose options are built on first use by ``options()`` (a list of decorators
    made with :func:`config_option` or ``click.option``), placed before any declared with
    decorators; see the module docstring for why."""

    def __init__(
        self, *args: Any, options: Callable[[], list[Callable[[F], F]]], **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._make_options: Callable[[], list[Callable[[F], F]]] | None = options

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        if self._make_options is not None:
            make, self._make_options = self._make_options, None

            def sink() -> None: ...

            for decorator in reversed(make()):
                decorator(sink)
            built: list[click.Parameter] = getattr(sink, "__click_params__", [])
            self.params[:0] = list(reversed(built))
        return super().get_params(ctx)
