"""FSDP2 for ``logitcache train --fsdp``: the process group, the sharding plan, the memory figure,
and the final ``from_pretrained`` export.

Why FSDP next to DDP: DDP keeps a full copy of the student, its gradients and its two AdamW
moments on every rank (16 bytes per fp32 parameter: ~48 GB for a 3B student before
activations). ``torch.distributed.fsdp.fully_shard`` (FSDP2, parameters as ``DTensor`` shards on
dim 0) keeps ``1 / world_size`` of each per rank and all-gathers a layer's parameters only while
that layer runs. Measured by ``scripts/bench_fsdp.py`` (tiny Llama, gloo, 2 ranks): parameters +
gradients + optimizer state per rank are 0.50x one process's (dim-0 padding is the only excess),
and the loss curve equals one process's within 1.0e-7 relative over 10 steps.

The plan (what ``shard_student`` does):

- each decoder layer (the classes in the model's ``_no_split_modules``, the unit Hugging Face and
  Accelerate shard by) is its own FSDP unit, resharded after its forward;
- the **root** is the trainer's loss module (``run.StepLoss``): it holds the embeddings, the final
  norm and the ``lm_head``, and its forward computes the loss, so the head's weight is gathered by
  FSDP's own pre-forward hook for exactly as long as the loss needs it, the fused loss included
  (its autograd Function saves the gathered weight, and FSDP reduce-scatters the gradient into the
  shards and frees the gathered copy after backward: tested, the gathered storage is empty after
  the step). Evaluation gathers the root explicitly (:func:`gathered`) and reshards after;
- mixed precision on GPU (bf16 autocast's default there): bf16 parameters for compute, fp32
  gradient reduction and fp32 master shards (``MixedPrecisionPolicy``); the root does not cast
  its inputs, so the teacher's log-probs stay fp32;
- ``--fsdp-cpu-offload`` (``CPUOffloadPolicy``): the shards, their gradients and the AdamW state
  live in CPU memory and the optimizer step runs there; the GPU holds only the gathered layers;
- gradient accumulation reduce-scatters every micro-batch (sharded gradients accumulate in
  place; skipping the sync would hold unsharded gradients, the memory FSDP exists to save).

Every rank loads the full student into CPU memory first (``fully_shard`` then moves only its shard
to the device): fine up to a few billion parameters per host; meta-device init is not done yet.

The process group: ``--fsdp`` needs one even for a single process (FSDP is collectives on a device
mesh), so it runs under ``torchrun`` only (``--nproc-per-node 1`` for one device); without torchrun
it is refused with that command. On CUDA the group is ``cuda:nccl,cpu:gloo`` so that CPU-offloaded
shards (gradient norm, checkpoint) have a backend too.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from logitcache._distributed import RankInfo, rank_info
from logitcache.errors import ConfigError

__all__ = [
    "enable_activation_checkpointing",
    "export_full_model",
    "gathered",
    "init_fsdp_group",
    "local_state_bytes",
    "shard_student",
]


def init_fsdp_group(device: torch.device) -> RankInfo:
    """Join (or start) the torchrun job's process group; refuse ``--fsdp`` outside torchrun."""
    if not dist.is_initialized():
        rank_info()  # RANK and WORLD_SIZE are integers in range
        if "MASTER_ADDR" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise ConfigError(
                "--fsdp needs a torch.distributed process group, and this process was not started "
                "by torchrun (WORLD_SIZE/MASTER_ADDR unset); launch it with `torchrun "
                "--nproc-per-node N -m logitcache train --fsdp ...` (N=1 for one device), or "
                "drop --fsdp to train on one device"
            )
        if device.type == "cuda":  # "cuda" without an index: this rank's GPU, as with auto
            index = device.index if device.index is not None else os.environ.get("LOCAL_RANK", 0)
            torch.cuda.set_device(int(index))
            dist.init_process_group("cuda:nccl,cpu:gloo")
        else:
            dist.init_process_group("gloo")
    return RankInfo(dist.get_rank(), dist.get_world_size())


def _decoder_layers(lm: nn.Module) -> list[nn.Module]:
    names = set(getattr(lm, "_no_split_modules", None) or ())
    layers = [m for m in lm.modules() if type(m).__name__ in names]
    if not layers:
        raise ConfigError(
            f"--fsdp: cannot find the decoder layers of the student ({type(lm).__name__} names "
            f"no _no_split_modules, got {sorted(names)}); use a Hugging Face causal LM whose "
            "class declares them, or train without --fsdp"
        )
    return layers


def shard_student(
    root: nn.Module, lm: nn.Module, device: torch.device, *, bf16: bool, cpu_offload: bool
) -> None:
    """``fully_shard`` each decoder layer of ``lm``, then ``root`` (the module holding ``lm``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
    )

    layers = _decoder_layers(lm)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if cpu_offload else OffloadPolicy()

    def precision(cast_inputs: bool) -> MixedPrecisionPolicy:
        if not bf16:
            return MixedPrecisionPolicy(cast_forward_inputs=cast_inputs)
        return MixedPrecisionPolicy(
            param_dtype=torch.bfloat16,
            reduce_dtype=torch.float32,
            cast_forward_inputs=cast_inputs,
        )

    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=precision(True), offload_policy=offload)
    fully_shard(root, mesh=mesh, mp_policy=precision(False), offload_policy=offload)


def enable_activation_checkpointing(lm: nn.Module) -> None:
    """Recompute each decoder layer's activations in backward (Hugging Face's non-reentrant
    gradient checkpointing: it runs inside FSDP's hooks, so a recomputed layer is re-gathered)."""
    if not getattr(lm, "supports_gradient_checkpointing", False):
        raise ConfigError(
            f"--activation-checkpointing: the student ({type(lm).__name__}) does not support "
            "gradient checkpointing; train without it"
        )
    kwargs = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)  # type: ignore[operator]
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)  # type: ignore[operator]


@contextlib.contextmanager
def gathered(root: nn.Module) -> Iterator[None]:
    """Inside: the FSDP root's own parameters (embeddings, norm, head) are whole on this rank, so
    code outside the root's forward (evaluation) can use them; resharded (freed) on exit.
    A no-op for a module that is not sharded."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(root, FSDPModule):
        yield
        return
    root.unshard()
    try:
        yield
    finally:
        root.reshard()


def _local_nbytes(t: torch.Tensor) -> int:
    from torch.distributed.tensor import DTensor

    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


def local_state_bytes(params: Iterable[nn.Parameter], optimizer: torch.optim.Optimizer) -> int:
    """Bytes this rank holds of parameters + gradients + optimizer state: the local shards of
    ``DTensor``s (FSDP) or the whole tensors (one process, DDP). Gathered copies are transient and
    not counted; call it after ``optimizer.step()``, before the gradients are dropped."""
    total = 0
    for p in params:
        total += _local_nbytes(p)
        if p.grad is not None:
            total += _local_nbytes(p.grad)
    for state in optimizer.state.values():
        total += sum(_local_nbytes(v) for v in state.values() if isinstance(v, torch.Tensor))
    return total


def export_full_model(lm: nn.Module, final: Path, rank: int, tokenizer: Any | None) -> None:
    """Gather the full state dict (on CPU, rank 0 only holds it) and write ``final`` with
    ``save_pretrained``: ``AutoModelForCausalLM.from_pretrained(final)`` loads it. Collective:
    every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_model_state_dict(lm, options=options)
    if rank == 0:
        lm.save_pretrained(final, state_dict=full, safe_serialization=True)  # type: ignore[operator]
        if tokenizer is not None:
            tokenizer.save_pretrained(final)
    dist.barrier()
