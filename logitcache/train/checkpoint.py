"""Training checkpoints: written atomically, rotated, loaded without pickle.

Layout of ``OUT/checkpoints/step-00000010/``:

- ``model/``: ``save_pretrained`` output (config + safetensors), loadable with
  ``AutoModelForCausalLM.from_pretrained`` on its own;
- ``optimizer.pt``, ``scheduler.pt``, ``rng.pt``: state dicts of tensors and numbers, read back
  with ``torch.load(weights_only=True)`` (no pickle of arbitrary objects);
- ``state.json``: step, the run fingerprint (refuses resuming another run), loader state.

A checkpoint is built under ``.tmp-step-...`` and renamed into place, so a crash mid-save leaves
the previous checkpoints intact and never a half-written one under a ``step-*`` name. Only the
``keep`` newest are kept. ``--fsdp`` runs write sharded checkpoints by the same rules
(``begin_checkpoint`` / ``commit_checkpoint``; layout in ``train/sharded_checkpoint.py``); each
kind is refused by the other's loader with the command that resumes it.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from logitcache.errors import ConfigError

__all__ = [
    "SHARDED_DIR",
    "begin_checkpoint",
    "commit_checkpoint",
    "latest_checkpoint",
    "load_checkpoint",
    "load_tensors",
    "pickle_refused",
    "read_state",
    "restore_rng",
    "rng_state",
    "save_checkpoint",
]

_STEP_DIR = re.compile(r"^step-(\d{8})$")
#: the DCP directory of a sharded (``--fsdp``) checkpoint (``train/sharded_checkpoint.py``)
SHARDED_DIR = "dcp"


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch CPU, and every CUDA device), for ``rng.pt``."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def begin_checkpoint(root: Path, step: int) -> Path:
    """A fresh temporary directory for checkpoint ``step`` (a leftover of a crash is removed)."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def commit_checkpoint(root: Path, tmp: Path, step: int, keep: int) -> Path:
    """Rename the finished ``tmp`` to ``step-NNNNNNNN`` and delete all but the ``keep`` newest."""
    final = root / f"step-{step:08d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    steps = sorted(p for p in root.iterdir() if _STEP_DIR.match(p.name))
    for old in steps[: max(0, len(steps) - keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_checkpoint(
    root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint ``step`` atomically and delete all but the ``keep`` newest."""
    tmp = begin_checkpoint(root, step)
    model.save_pretrained(tmp / "model", safe_serialization=True)  # type: ignore[operator]
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=1))
    return commit_checkpoint(root, tmp, step, keep)


def pickle_refused(where: str, error: pickle.UnpicklingError) -> ConfigError:
    """One line for a file that ``torch.load(weights_only=True)`` refused (instead of torch's
    page that ends "please file an issue"): which file, why, and the fix."""
    lines = [x.strip() for x in str(error).splitlines() if x.strip()]
    why = next((x for x in lines if "GLOBAL" in x or "global" in x), lines[-1] if lines else "")
    return ConfigError(
        f"{where}: refused to load: it holds pickled Python objects beyond tensors and numbers, "
        f"which could run code when loaded ({why.rstrip('.')}); logitcache never writes such "
        "files: replace it with one you trust"
    )


def load_tensors(path: Path) -> Any:
    """``torch.load(weights_only=True)``; a file holding pickled objects is a one-line refusal."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        raise pickle_refused(f"checkpoint file {path}", e) from None


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (None when there is none)."""
    if not root.is_dir():
        return None
    steps = sorted(p for p in root.iterdir() if _STEP_DIR.match(p.name))
    return steps[-1] if steps else None


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    fingerprint: dict[str, Any],
) -> dict[str, Any]:
    """Restore everything saved at ``path``; refuse a checkpoint of a different run."""
    state = read_state(path, fingerprint)
    if (path / SHARDED_DIR).is_dir():
        raise ConfigError(
            f"cannot resume from {path}: it is a sharded (DCP) checkpoint written by an --fsdp "
            "run; resume it with --fsdp under torchrun (any number of ranks)"
        )
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    for f in sorted((path / "model").glob("*.safetensors")):
        weights.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {k for k in missing if "lm_head" in k or "embed" in k}
    if set(missing) - tied or unexpected:
        raise ConfigError(
            f"checkpoint {path} does not match the student: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}"
        )
    optimizer.load_state_dict(load_tensors(path / "optimizer.pt"))
    scheduler.load_state_dict(load_tensors(path / "scheduler.pt"))
    restore_rng(load_tensors(path / "rng.pt"))
    return state


def read_state(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """``state.json`` of the checkpoint at ``path``, refused if it belongs to a different run."""
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"checkpoint {path} has no readable state.json ({e})") from e
    theirs = state.get("fingerprint", {})
    for key in sorted(set(fingerprint) | set(theirs)):
        if fingerprint.get(key) != theirs.get(key):
            raise ConfigError(
                f"cannot resume from {path}: it belongs to a different run ({key} was "
                f"{theirs.get(key)!r}, this run has {fingerprint.get(key)!r}); use the original "
                "settings, or a new --out directory to start fresh"
            )
    return dict(state)


def restore_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
