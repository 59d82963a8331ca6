"""Sharded checkpoints of ``--fsdp`` runs: torch.distributed.checkpoint (DCP), atomic, reshardable.

Layout of ``OUT/checkpoints/step-00000010/`` (the same name, rotation and atomic rename as the
DDP checkpoints of ``train/checkpoint.py``):

- ``dcp/``: ``.metadata`` + one ``__<rank>_0.distcp`` per rank: the model's parameters and the
  AdamW state tensors (``exp_avg``, ``exp_avg_sq``, ``step``), keyed by parameter name, each rank
  writing its own shards. Tensors only: the optimizer's hyper-parameters are not in it;
- ``optimizer_groups.pt``: the AdamW parameter groups (lr, betas, ..., parameter names);
- ``scheduler.pt``, ``rng.pt``: as in DDP checkpoints (rank 0's RNG; every rank is seeded alike);
- ``state.json``: step, run fingerprint, loader position, token count.

**Atomic.** Rank 0 creates ``.tmp-step-N/``; every rank writes its shards into it (``dcp.save``
returns on rank 0 only after every rank's write finished and the metadata is written); rank 0
then writes the small files and renames the directory to ``step-N``. A crash anywhere before the
rename leaves a ``.tmp-*`` directory that ``latest_checkpoint`` never picks (tested with a
SIGKILL of rank 0 right after the shard files are written) and the next save of that step removes.
The ranks must share the checkpoint directory (one filesystem), as DCP's file writer requires.

**Another world size.** Shards are saved with their global offsets; ``dcp.load`` fills this run's
shards from whichever files hold them, so a checkpoint of 2 ranks resumes on 1, or on 4
(tested: 2 -> 1 and 1 -> 2, the losses after the resume equal an uninterrupted run's within
1e-5). The loader position is world-size free (``data/sampler.py``'s resume rule).

**No pickle on the read path.** DCP reads ``.metadata`` with ``pickle.load`` and non-tensor
entries with ``torch.load(weights_only=False)``. Here ``.metadata`` is read by an unpickler that
admits only DCP's metadata classes, ``torch.Size``, dtypes and paths, and a checkpoint whose
metadata declares non-tensor (bytes) entries is refused before any is read: a tampered checkpoint
cannot run code.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import signal
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint import FileSystemReader

from logitcache.errors import ConfigError
from logitcache.train.checkpoint import (
    SHARDED_DIR,
    begin_checkpoint,
    commit_checkpoint,
    load_tensors,
    read_state,
    restore_rng,
    rng_state,
)

__all__ = ["KILL_IN_SAVE_ENV", "load_sharded_checkpoint", "save_sharded_checkpoint"]

#: Test hook: rank 0 SIGKILLs itself inside the save of this step, after the shard files are
#: written and before the checkpoint is committed (the crash the atomic rename protects against).
KILL_IN_SAVE_ENV = "LOGITCACHE_TEST_KILL_IN_SAVE"


def save_sharded_checkpoint(
    root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: dict[str, Any],
    keep: int,
) -> None:
    """Write checkpoint ``step`` from every rank (collective), commit it on rank 0, rotate."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank = dist.get_rank()
    tmp = root / f".tmp-step-{step:08d}"
    if rank == 0:
        begin_checkpoint(root, step)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save(
        {"model": model_sd, "optimizer": optim_sd["state"]},
        storage_writer=dcp.FileSystemWriter(str(tmp / SHARDED_DIR)),
    )
    if rank == 0:
        if os.environ.get(KILL_IN_SAVE_ENV) == str(step):
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save(optim_sd["param_groups"], tmp / "optimizer_groups.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=1))
        commit_checkpoint(root, tmp, step, keep)
    dist.barrier()


def load_sharded_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    fingerprint: dict[str, Any],
) -> dict[str, Any]:
    """Restore a sharded checkpoint into this run's shards (any world size); refuse one of a
    different run, or a DDP checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    state = read_state(path, fingerprint)
    if not (path / SHARDED_DIR).is_dir():
        raise ConfigError(
            f"cannot resume from {path} with --fsdp: it is a DDP checkpoint (no {SHARDED_DIR}/); "
            "resume it without --fsdp, or start a new --out with --fsdp"
        )
    reader = _TensorsOnlyReader(path / SHARDED_DIR)
    reader.read_metadata()  # refusals as they are (dcp.load would wrap them in its own error)
    model_sd, optim_sd = get_state_dict(model, optimizer)  # this run's shards, as templates
    payload = {"model": model_sd, "optimizer": optim_sd["state"]}
    dcp.load(payload, storage_reader=reader)
    groups = load_tensors(path / "optimizer_groups.pt")
    set_state_dict(
        model,
        optimizer,
        model_state_dict=model_sd,
        optim_state_dict={"state": payload["optimizer"], "param_groups": groups},
    )
    scheduler.load_state_dict(load_tensors(path / "scheduler.pt"))
    restore_rng(load_tensors(path / "rng.pt"))
    return state


# -- reading .metadata without running code ---------------------------------------------------

_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_ALLOWED = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, where: Path) -> None:
        super().__init__(io.BytesIO(data))
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in _ALLOWED or (module == _METADATA_MODULE and not name.startswith("__")):
            found = super().find_class(module, name)
            if module != _METADATA_MODULE or isinstance(found, type):
                return found
        raise ConfigError(
            f"checkpoint metadata {self.where}: refused to load: it references {module}.{name}, "
            "which is not part of a DCP checkpoint's metadata and could run code when loaded; "
            "logitcache never writes such files: replace the checkpoint with one you trust"
        )


class _TensorsOnlyReader(FileSystemReader):
    """DCP's file reader with a safe ``.metadata`` reader; refuses non-tensor entries."""

    def __init__(self, path: Path) -> None:
        super().__init__(str(path))
        self._where = path

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        from torch.distributed.checkpoint.metadata import (
            BytesStorageMetadata,
            Metadata,
            StorageMeta,
        )

        rank = kwargs.get("rank")
        name = ".metadata" if rank is None else f"__{rank}.metadata"
        file = self._where / name
        try:
            data = file.read_bytes()
        except OSError as e:
            raise ConfigError(f"checkpoint {self._where}: cannot read {name} ({e})") from e
        try:
            metadata = _MetadataUnpickler(data, file).load()
        except ConfigError:
            raise
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
            raise ConfigError(f"checkpoint metadata {file} is damaged ({e})") from e
        if not isinstance(metadata, Metadata):
            raise ConfigError(
                f"checkpoint metadata {file}: expected DCP Metadata, got {type(metadata).__name__}"
            )
        objects = [
            k for k, v in metadata.state_dict_metadata.items()
            if isinstance(v, BytesStorageMetadata)
        ]  # fmt: skip
        if objects:
            raise ConfigError(
                f"checkpoint {self._where}: refused to load: it stores pickled objects "
                f"({objects[:3]}), which DCP would unpickle; logitcache checkpoints hold tensors "
                "only: replace it with one you trust"
            )
        storage_meta = metadata.storage_meta or StorageMeta()
        storage_meta.load_id = self.load_id
        metadata.storage_meta = storage_meta
        return metadata
