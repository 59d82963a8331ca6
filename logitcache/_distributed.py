"""Devices, ranks and world sizes: one copy for the dump, the loader and the trainer.

Both stages run under ``torchrun``, which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and (for a
rendezvous) ``MASTER_ADDR``. The rules every stage follows:

- ``device="auto"`` is ``cuda:$LOCAL_RANK`` when CUDA is available (``cuda:0`` outside torchrun),
  else the CPU;
- a process group is started only when ``WORLD_SIZE > 1``: NCCL for CUDA devices, gloo otherwise
  (gloo also runs every distributed test of this repository on CPU);
- where no group is running, this process is rank 0 of 1; an explicit rank/world given by the
  caller (the loader's ``rank=``/``world_size=``) wins over ``torch.distributed``'s.

**Tensor parallel (the dump).** ``W`` ranks with ``tensor_parallel=T`` form a ``W/T x T`` mesh,
rank ``r`` at data-parallel index ``r // T`` and tensor-parallel index ``r % T``: a tensor-parallel
group is ``T`` consecutive ranks, so with ``--nproc-per-node`` a multiple of ``T`` a group never
spans nodes (its collectives run every layer; the data-parallel ones only at the end). Rows are
split over the data-parallel index only (:meth:`ParallelLayout.writer`): the ``T`` ranks of a group
read the same rows and the group's tensor-parallel rank 0 writes them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

from logitcache.errors import ConfigError

__all__ = [
    "ParallelLayout",
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
# Every other collective (each layer of a tensor-parallel forward, the resume point's broadcast):
# a peer silent this long hangs (stopped, or its node gone without closing the connection; a
# killed one fails the collective at once), so the dump fails instead of waiting the barrier's
# 24 h. torch's own default for gloo; ``LOGITCACHE_COLLECTIVE_TIMEOUT`` (seconds) overrides it.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


def collective_timeout() -> timedelta:
    """:data:`COLLECTIVE_TIMEOUT`, or ``$LOGITCACHE_COLLECTIVE_TIMEOUT`` seconds when set."""
    text = os.environ.get("LOGITCACHE_COLLECTIVE_TIMEOUT")
    if text is None:
        return COLLECTIVE_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < 1e9:  # also NaN and inf
        raise ConfigError(
            f"LOGITCACHE_COLLECTIVE_TIMEOUT must be a number of seconds > 0, got {text!r}; "
            "unset it for the default (1800)"
        )
    return timedelta(seconds=seconds)


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


@dataclass(frozen=True)
class ParallelLayout:
    """Where rank ``rank`` of ``world_size`` sits in a (data x tensor) parallel mesh."""

    rank: int = 0
    world_size: int = 1
    tensor_parallel: int = 1

    def __post_init__(self) -> None:
        t, w = self.tensor_parallel, self.world_size
        if isinstance(t, bool) or not isinstance(t, int) or t < 1:
            raise ConfigError(f"--tensor-parallel must be an integer >= 1, got {t!r}")
        if t > 1 and w == 1:
            raise ConfigError(
                f"--tensor-parallel {t} needs {t} processes started by torchrun; run "
                f"torchrun --nproc-per-node {t} -m logitcache dump --tensor-parallel {t} ..."
            )
        if w % t:
            raise ConfigError(
                f"--tensor-parallel {t} must divide the number of torchrun processes, got "
                f"{w}; use --nproc-per-node (x --nnodes) = a multiple of {t}, or another "
                f"--tensor-parallel that divides {w}"
            )

    @property
    def data_parallel(self) -> int:
        return self.world_size // self.tensor_parallel

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tensor_parallel

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tensor_parallel

    @property
    def writer(self) -> RankInfo:
        """The rank split of the rows: data-parallel index of data-parallel size."""
        return RankInfo(self.dp_rank, self.data_parallel)

    @property
    def writes(self) -> bool:
        """Whether this rank writes: tensor-parallel rank 0 of its group."""
        return self.tp_rank == 0


class RankGroup:
    """Barriers between the ranks of a torchrun job; a no-op for a single process.

    Without torchrun's rendezvous variables (``MASTER_ADDR``) the ranks cannot meet: each works
    alone (the dump then writes its part, and ``logitcache finalize`` joins them later).

    With ``layout.tensor_parallel > 1`` the rendezvous is required, and the group also builds the
    ``(dp, tp)`` device mesh (:attr:`mesh`; :attr:`tp_group` is this rank's tensor-parallel
    process group). The backend is gloo, plus NCCL for CUDA tensors when ``device`` is CUDA.
    """

    def __init__(
        self,
        info: RankInfo,
        layout: ParallelLayout | None = None,
        device: torch.device | None = None,
    ) -> None:
        self.info = info
        self.layout = layout or ParallelLayout(info.rank, info.world_size)
        self.active = False
        self.mesh: DeviceMesh | None = None
        self.tp_group: dist.ProcessGroup | None = None
        self.barrier_group: dist.ProcessGroup | None = None
        tp = self.layout.tensor_parallel
        rendezvous = "MASTER_ADDR" in os.environ
        if tp > 1 and not rendezvous:
            raise ConfigError(
                f"--tensor-parallel {tp} needs torchrun's rendezvous (MASTER_ADDR is not set); "
                f"launch with torchrun --nproc-per-node {info.world_size} -m logitcache dump ..."
            )
        if info.world_size > 1 and rendezvous and not dist.is_initialized():
            cuda = device is not None and device.type == "cuda"
            if cuda and tp > 1:  # NCCL binds this rank's GPU
                torch.cuda.set_device(device)
            backend = "cpu:gloo,cuda:nccl" if cuda and tp > 1 else "gloo"
            dist.init_process_group(backend, timeout=collective_timeout())
            # the end-of-dump barrier waits for the slowest rank: its own, long-waiting group
            self.barrier_group = dist.new_group(backend="gloo", timeout=BARRIER_TIMEOUT)
            self.active = True
        if tp > 1:
            from torch.distributed.device_mesh import init_device_mesh

            kind = device.type if device is not None else "cpu"
            shape = (self.layout.data_parallel, tp)
            self.mesh = init_device_mesh(kind, shape, mesh_dim_names=("dp", "tp"))
            self.tp_group = self.mesh.get_group("tp")

    def broadcast_from_writer(self, value: int) -> int:
        """The tensor-parallel group's writer's ``value`` (an int) on every rank of the group."""
        if self.tp_group is None:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        src = dist.get_global_rank(self.tp_group, 0)
        dist.broadcast(t, src=src, group=self.tp_group)  # a CPU tensor: gloo in every case
        return int(t.item())

    def barrier(self) -> None:
        if self.active:
            dist.barrier(group=self.barrier_group)

    def close(self) -> None:
        if self.active:
            dist.destroy_process_group()
            self.active = False
