"""The ``logitcache train`` command: flags and an optional config file, merged, then ``run_train``.

The flags are :class:`~logitcache.train.TrainConfig`'s fields (names, defaults, help, choices:
see ``cli/_common.py``), built on first use so that the CLI starts without torch.

Precedence: a flag given on the command line beats the config file, which beats the default.
The config file (``--config run.yaml`` or ``.json``) uses the same names as the flags, with
dashes or underscores.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from logitcache.cli._common import (
    ConfigCommand,
    config_option,
    friendly_errors,
    parse_storage_options,
    storage_option,
)
from logitcache.errors import ConfigError

__all__ = ["train"]


def _read_config(path: str) -> dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read it ({e})") from e
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"--config {path}: not a text file (byte {e.start} is not UTF-8); give a .json or "
            ".yaml file of settings"
        ) from None
    if p.suffix in (".yaml", ".yml"):
        try:
            import yaml  # type: ignore[import-untyped]
        except ImportError as e:
            raise ConfigError(
                f"--config {path}: reading YAML needs PyYAML (pip install pyyaml), "
                "or use a .json config"
            ) from e
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:  # includes the refused !!python tags (ConstructorError)
            why = " ".join(str(e).split())
            raise ConfigError(
                f"--config {path}: not plain YAML settings ({why}); python tags are refused: "
                "write plain values"
            ) from None
    else:
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ConfigError(
                f"--config {path}: not valid JSON ({e}); settings files are .json, or .yaml/.yml"
            ) from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"--config {path}: expected a mapping of settings, got {type(data).__name__}"
        )
    return {str(k).replace("-", "_"): v for k, v in data.items()}


#: TrainConfig fields that are flags, in --help order (storage_options: the shared option).
_FLAGS = (
    "cache", "out", "student", "student_config", "loss", "student_tokenizer", "teacher_tokenizer",
    "student_seq_len", "temperature", "alpha", "beta", "fused",
    "top_k", "batch_size", "grad_accum", "max_steps", "stop_after", "lr", "weight_decay",
    "warmup_steps", "min_lr_ratio", "clip", "seed", "eval_every", "eval_fraction", "eval_cache",
    "eval_batches", "save_every", "keep", "num_workers", "readahead", "local_cache",
    "local_cache_size", "expect_digest", "order", "resume", "device", "bf16", "compile",
    "fsdp", "fsdp_cpu_offload", "activation_checkpointing",
    "allow_vocab_mismatch", "log_every", "progress",
)  # fmt: skip


def _options() -> list[Any]:
    from logitcache.train import TrainConfig

    config_file = click.option(
        "--config",
        "config_file",
        type=click.Path(dir_okay=False),
        help="YAML or JSON file of settings (flags override it).",
    )
    # cache and out may come from --config: checked after the merge
    flags = [config_option(TrainConfig, name, required=False) for name in _FLAGS]
    return [config_file, *flags]


@click.command("train", cls=ConfigCommand, options=_options)
@storage_option
@click.pass_context
@friendly_errors
def train(
    ctx: click.Context, config_file: str | None, storage_options: tuple[str, ...], **flags: Any
) -> None:
    """Train a student from a cache alone (single device, or DDP/FSDP under torchrun)."""
    from logitcache.train import TrainConfig, run_train

    settings: dict[str, Any] = _read_config(config_file) if config_file else {}
    for name, value in flags.items():
        if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE:
            settings[name] = value  # a flag beats the file; the file beats the default
    if storage_options:
        settings["storage_options"] = parse_storage_options(storage_options)
    missing = [k for k in ("cache", "out") if not settings.get(k)]
    if missing:
        raise ConfigError(f"missing required setting(s): {', '.join('--' + m for m in missing)}")
    summary = run_train(TrainConfig.from_mapping(settings))
    click.echo(json.dumps({k: v for k, v in summary.items() if k != "losses"}))
