"""Devices, ranks and world sizes: one copy for the dump, the loader and the trainer.

Both stages run under ``torchrun``, which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and (for a
rendezvous) ``MASTER_ADDR``. The rules every stage follows:

- ``device="auto"`` is ``cuda:$LOCAL_RANK`` when CUDA is available (``cuda:0`` outside torchrun),
  else the CPU;
- a process group is started only when ``WORLD_SIZE > 1``: NCCL for CUDA devices, gloo otherwise
  (gloo also runs every distributed test of this repository on CPU);
- where no group is running, this process is rank 0 of 1; an explicit rank/world given by the
  caller (the loader's ``rank=``/``world_size=``) wins over ``torch.distributed``'s.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from logitcache.errors import ConfigError

__all__ = [
    "RankGroup",
    "RankInfo",
    "current_rank_world",
    "init_process_group",
    "rank_info",
    "resolve_device",
]

# Ranks wait for the slowest one at the end of a dump; a dead rank is torchrun's business (it stops
# the others), so this only bounds a hang nobody noticed.
BARRIER_TIMEOUT = timedelta(hours=24)


def resolve_device(name: str) -> torch.device:
    """``auto``: ``cuda:$LOCAL_RANK`` (torchrun) or ``cuda:0`` when available, else cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"unknown device {name!r} ({e}); use auto, cpu, cuda or cuda:N") from e


@dataclass(frozen=True)
class RankInfo:
    """This process's place in a torchrun job (rank 0 of 1 when not under torchrun)."""

    rank: int = 0
    world_size: int = 1


def rank_info() -> RankInfo:
    """Read ``RANK`` and ``WORLD_SIZE`` (set by torchrun); absent means a single process."""
    try:
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as e:
        raise ConfigError(f"RANK and WORLD_SIZE must be integers: {e}") from e
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"need 0 <= RANK < WORLD_SIZE, got RANK={rank} WORLD_SIZE={world}")
    return RankInfo(rank, world)


def init_process_group(device: torch.device) -> RankInfo:
    """Join the torchrun job's process group (NCCL on CUDA, gloo otherwise) when there is one."""
    info = rank_info()
    if info.world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        return RankInfo(dist.get_rank(), dist.get_world_size())
    return info


def current_rank_world(rank: int | None = None, world_size: int | None = None) -> RankInfo:
    """``rank``/``world_size`` as given, else ``torch.distributed``'s, else 0 of 1; checked."""
    running = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if running else 1
    if rank is None:
        rank = dist.get_rank() if running else 0
    for name, value, minimum in (("world_size", world_size, 1), ("rank", rank, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if rank >= world_size:
        raise ConfigError(f"rank must be in [0, world_size={world_size}), got {rank}")
    return RankInfo(int(rank), int(world_size))


class RankGroup:
    """Barriers between the ranks of a torchrun job; a no-op for a single process.

    Without torchrun's rendezvous variables (``MASTER_ADDR``) the ranks cannot meet: each works
    alone (the dump then writes its part, and ``logitcache finalize`` joins them later).
    """

    def __init__(self, info: RankInfo) -> None:
        self.info = info
        self.active = False
        if info.world_size > 1 and "MASTER_ADDR" in os.environ and not dist.is_initialized():
            dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
            self.active = True

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def close(self) -> None:
        if self.active:
            dist.destroy_process_group()
            self.active = False
