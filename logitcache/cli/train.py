"""The ``logitcache train`` command: flags and an optional config file, merged, then ``train()``.

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

from logitcache.cli._common import friendly_errors, parse_storage_options, storage_option
from logitcache.errors import ConfigError
from logitcache.loss import LOSS_NAMES

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


def _options(fn: Any) -> Any:
    opts = [
        click.option(
            "--config",
            "config_file",
            type=click.Path(dir_okay=False),
            help="YAML or JSON file of settings (flags override it).",
        ),
        click.option("--cache", help="Cache directory or URL to train from."),
        click.option("--out", help="Output directory: checkpoints, metrics.jsonl, final/ model."),
        click.option("--student", help="Hugging Face model directory to fine-tune."),
        click.option(
            "--student-config", help="Hugging Face config.json for a freshly initialised student."
        ),
        click.option(
            "--loss",
            type=click.Choice(LOSS_NAMES),
            help="KD loss (default kl: forward KL with a tail bucket).",
        ),
        click.option(
            "--temperature",
            type=float,
            help="Distillation temperature (default 1.0); exact when the cache recorded it.",
        ),
        click.option(
            "--alpha", type=float, help="Weight of the hard-label cross-entropy, 0..1 (default 0)."
        ),
        click.option("--beta", type=float, help="JSD mixing weight (default 0.5)."),
        click.option(
            "--fused/--no-fused",
            default=None,
            help="Chunked fused-linear loss: never materialises [N, V] student logits.",
        ),
        click.option(
            "--top-k",
            type=int,
            help="Use only the top-k of the stored targets (the rest joins the tail).",
        ),
        click.option("--batch-size", type=int, help="Rows per rank per micro-batch (default 8)."),
        click.option(
            "--grad-accum", type=int, help="Micro-batches per optimizer step (default 1)."
        ),
        click.option("--max-steps", type=int, help="Optimizer steps (default 100)."),
        click.option(
            "--stop-after",
            type=int,
            help="Stop at this step with a checkpoint (time-limited jobs); --resume continues.",
        ),
        click.option("--lr", type=float, help="Peak learning rate of AdamW (default 5e-4)."),
        click.option("--weight-decay", type=float, help="AdamW weight decay (default 0.01)."),
        click.option(
            "--warmup-steps",
            type=int,
            help="Linear warmup steps before the cosine decay (default 0).",
        ),
        click.option(
            "--min-lr-ratio",
            type=float,
            help="Final learning rate as a fraction of the peak (default 0.1).",
        ),
        click.option(
            "--clip", type=float, help="Gradient norm clipping, 0 to disable (default 1.0)."
        ),
        click.option(
            "--seed", type=int, help="Seed of the student init and the data order (default 0)."
        ),
        click.option(
            "--eval-every", type=int, help="Evaluate every N steps (default: at the end only)."
        ),
        click.option(
            "--eval-fraction",
            type=float,
            help="Hold out this fraction of the cache's rows for evaluation.",
        ),
        click.option("--eval-cache", help="A second cache to evaluate on."),
        click.option("--eval-batches", type=int, help="Evaluate on at most this many batches."),
        click.option(
            "--save-every", type=int, help="Checkpoint every N steps (default: at the end only)."
        ),
        click.option("--keep", type=int, help="Checkpoints to keep (default 2)."),
        click.option("--num-workers", type=int, help="DataLoader worker processes (default 0)."),
        click.option(
            "--readahead", type=int, help="Shards fetched ahead while streaming (default 2)."
        ),
        click.option(
            "--local-cache",
            help="Directory keeping verified copies of a remote cache's shards (LRU-bounded).",
        ),
        click.option("--local-cache-size", help="Bound of --local-cache, e.g. 20G (default 50G)."),
        click.option(
            "--expect-digest",
            help="Refuse the cache unless its content digest (logitcache info) is this.",
        ),
        click.option(
            "--order",
            type=click.Choice(["streaming", "random", "sequential"]),
            help="Row order (default streaming).",
        ),
        click.option(
            "--resume/--no-resume",
            default=None,
            help="Continue from the newest checkpoint in --out.",
        ),
        click.option("--device", help="auto (default), cpu, cuda, cuda:1, ..."),
        click.option(
            "--bf16/--no-bf16", default=None, help="bf16 autocast (default: on for CUDA)."
        ),
        click.option(
            "--compile/--no-compile", "compile_", default=None, help="torch.compile the student."
        ),
        click.option(
            "--allow-vocab-mismatch/--no-allow-vocab-mismatch",
            default=None,
            help="Accept a student tokenizer that differs from the teacher's "
            "(ids must be a prefix-compatible subset).",
        ),
        click.option("--log-every", type=int, help="Log training loss every N steps (default 10)."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


@click.command("train")
@_options
@storage_option
@click.pass_context
@friendly_errors
def train(
    ctx: click.Context, config_file: str | None, storage_options: tuple[str, ...], **flags: Any
) -> None:
    """Train a student from a cache alone (single device, or DDP under torchrun)."""
    from logitcache.train import TrainConfig, run_train

    settings: dict[str, Any] = _read_config(config_file) if config_file else {}
    for name, value in flags.items():
        key = "compile" if name == "compile_" else name
        given = ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE
        if given or (key not in settings and value is not None):
            settings[key] = value
    if storage_options:
        settings["storage_options"] = parse_storage_options(storage_options)
    missing = [k for k in ("cache", "out") if not settings.get(k)]
    if missing:
        raise ConfigError(f"missing required setting(s): {', '.join('--' + m for m in missing)}")
    summary = run_train(TrainConfig.from_mapping(settings))
    click.echo(json.dumps({k: v for k, v in summary.items() if k != "losses"}))
