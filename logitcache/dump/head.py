"""The teacher's output head: the model's own logits, or the head split off for chunking.

The head is split off by convention (``get_decoder()`` gives final hidden states,
``get_output_embeddings()`` the projection) and then *checked*: a probe compares the split path with
the model's own forward, so an unknown logit post-processing in some architecture is caught at load
time (and handled by falling back to full logits) instead of silently changing the targets.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from logitcache.errors import ConfigError


def forward_logits(
    model: torch.nn.Module, ids: torch.Tensor, attention: torch.Tensor | None
) -> torch.Tensor:
    """The model's own logits [B, S, V]: ``.logits`` of an HF output, a tuple's first item, or a
    tensor. ``attention_mask``/``use_cache`` are passed only where the forward names them."""
    params = inspect.signature(model.forward).parameters
    kwargs: dict[str, Any] = {}
    if attention is not None and "attention_mask" in params:
        kwargs["attention_mask"] = attention
    if "use_cache" in params:
        kwargs["use_cache"] = False
    out = model(ids, **kwargs)
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.ndim != 3:
        raise ConfigError(
            f"the teacher's forward returned {type(out).__name__}; expected logits [B, S, V], "
            "a tuple starting with them, or an object with .logits"
        )
    return out


@dataclass(eq=False)
class SplitHead:
    """Base model to final hidden states, then ``(h @ W[:real].T + b) * scale``, soft-capped."""

    base: torch.nn.Module
    weight: torch.Tensor
    bias: torch.Tensor | None
    scale: float | None
    softcap: float | None
    # an offloaded head (weight on meta, brought in by Accelerate's hooks) runs as its module
    module: torch.nn.Module | None = None

    def hidden_states(self, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        out = forward_hidden(self.base, ids, attention)
        return out

    def logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """float32 logits [N, real_vocab]; written into ``out`` ([N, real_vocab] float32) when
        given and the head is float32 (a reused buffer saves a large allocation per chunk)."""
        if self.module is not None:
            z = self.module(hidden)[..., : self.weight.shape[0]].float()
        elif out is not None and self.weight.dtype == hidden.dtype == out.dtype == torch.float32:
            z = torch.mm(hidden, self.weight.t(), out=out)
            if self.bias is not None:
                z.add_(self.bias)
        else:
            z = torch.nn.functional.linear(hidden, self.weight, self.bias).float()
        if self.scale is not None:
            z.mul_(self.scale)
        if self.softcap is not None:
            z.div_(self.softcap).tanh_().mul_(self.softcap)
        return z


def forward_hidden(
    base: torch.nn.Module, ids: torch.Tensor, attention: torch.Tensor
) -> torch.Tensor:
    params = inspect.signature(base.forward).parameters
    kwargs: dict[str, Any] = {"attention_mask": attention} if "attention_mask" in params else {}
    if "use_cache" in params:
        kwargs["use_cache"] = False
    out = base(ids, **kwargs)
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        hidden = out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"base model returned {type(out).__name__}, not hidden states")
    return hidden


def split_head(
    model: torch.nn.Module, real_vocab: int, probe: torch.Tensor, reference: torch.Tensor
) -> SplitHead | None:
    """The split-off head if it reproduces ``reference`` (the full forward on ``probe``), else None
    (with a warning: the dump then materialises full logits per batch)."""
    try:
        out_emb = model.get_output_embeddings()  # type: ignore[operator]
        base = model.get_decoder()  # type: ignore[operator]
        weight = getattr(out_emb, "weight", None)
        if base is None or base is model or not isinstance(weight, torch.Tensor):
            raise TypeError("no separate output projection")
        bias = getattr(out_emb, "bias", None)
        config = getattr(model, "config", None)
        scale = None
        if getattr(config, "logit_scale", None) is not None:  # Cohere: multiply
            scale = float(config.logit_scale)  # type: ignore[union-attr]
        if getattr(config, "logits_scaling", None) is not None:  # Granite: divide
            scale = (scale or 1.0) / float(config.logits_scaling)  # type: ignore[union-attr]
        softcap = getattr(config, "final_logit_softcapping", None)
        offloaded = weight.device.type == "meta"
        head = SplitHead(
            base,
            weight[:real_vocab],
            bias[:real_vocab] if isinstance(bias, torch.Tensor) and not offloaded else None,
            scale,
            float(softcap) if softcap else None,
            out_emb if offloaded else None,
        )
        with torch.no_grad():
            mine = head.logits(head.hidden_states(probe, torch.ones_like(probe)))
        want = reference[..., :real_vocab].float()
        tol = (1e-4 if weight.dtype == torch.float32 else 3e-2) * (1 + float(want.abs().max()))
        if mine.shape != want.shape or float((mine - want).abs().max()) > tol:
            raise ValueError("split head logits differ from the model's own logits")
        return head
    except Exception as e:  # any failure means: not splittable; the fallback is always correct
        warnings.warn(
            f"cannot split the output head off {type(model).__name__} ({e}); computing full "
            "logits per batch instead, which needs batch x seq x vocab memory",
            stacklevel=3,
        )
        return None


@dataclass(eq=False, kw_only=True)
class ShardedHead(SplitHead):
    """This rank's vocabulary shard of a tensor-parallel head: global ids ``offset ..
    offset + weight.shape[0]`` (real ids only; padded rows dropped), ``width`` the widest shard
    of the group (every rank chunks by it, so the collectives line up), ``group`` the
    tensor-parallel process group."""

    offset: int
    width: int
    group: Any
    tp_rank: int
    tp_size: int


def split_sharded_head(
    model: torch.nn.Module,
    real_vocab: int,
    probe: torch.Tensor,
    reference: torch.Tensor,
    group: Any,
) -> ShardedHead:
    """The local shard of a head that Hugging Face's tensor-parallel plan sharded by vocabulary
    (``colwise``: the weight is a DTensor placed ``Shard(0)``), probed against ``reference`` (the
    gathered full logits on ``probe``). Every rank of ``group`` raises together when one fails."""
    import torch.distributed as dist

    from logitcache.errors import TeacherError

    rank, size = dist.get_rank(group), dist.get_world_size(group)
    problem = ""
    head: ShardedHead | None = None
    try:
        out_emb = model.get_output_embeddings()  # type: ignore[operator]
        base = model.get_decoder()  # type: ignore[operator]
        weight: Any = getattr(out_emb, "weight", None)
        placements = tuple(getattr(weight, "placements", ()))
        by_vocab = len(placements) == 1 and getattr(placements[0], "dim", None) == 0
        if base is None or weight is None or not by_vocab or not hasattr(weight, "to_local"):
            raise TypeError(f"output head weight placed {placements or 'whole'}, not Shard(dim=0)")
        local = weight.to_local()
        bias = getattr(out_emb, "bias", None)
        local_bias = bias.to_local() if bias is not None and hasattr(bias, "to_local") else None
    except Exception as e:
        problem = str(e)
        local, local_bias, base = torch.zeros(0, 1), None, None
    rows = torch.tensor([local.shape[0]], dtype=torch.int64)
    sizes = [torch.zeros_like(rows) for _ in range(size)]
    dist.all_gather(sizes, rows, group=group)  # CPU tensors: gloo (also beside NCCL)
    widths = [int(s.item()) for s in sizes]
    offset = sum(widths[:rank])
    n_real = max(0, min(widths[rank], real_vocab - offset))
    if not problem:
        config = getattr(model, "config", None)
        scale = None
        if getattr(config, "logit_scale", None) is not None:
            scale = float(config.logit_scale)  # type: ignore[union-attr]
        if getattr(config, "logits_scaling", None) is not None:
            scale = (scale or 1.0) / float(config.logits_scaling)  # type: ignore[union-attr]
        softcap = getattr(config, "final_logit_softcapping", None)
        head = ShardedHead(
            base,
            local[:n_real],
            None if local_bias is None else local_bias[:n_real],
            scale,
            float(softcap) if softcap else None,
            offset=offset,
            width=max(widths),
            group=group,
            tp_rank=rank,
            tp_size=size,
        )
        with torch.no_grad():
            mine = head.logits(head.hidden_states(probe, torch.ones_like(probe)))
        want = reference[..., offset : offset + n_real].float()
        tol = (1e-4 if local.dtype == torch.float32 else 3e-2) * (1 + _amax(want))
        if sum(widths) != reference.shape[-1]:
            problem = f"the shards hold {sum(widths)} rows, the model outputs {reference.shape[-1]}"
        elif mine.shape != want.shape or _amax(mine - want) > tol:
            problem = "the sharded head's logits differ from the model's own logits"
    failed = torch.tensor([1 if problem else 0], dtype=torch.int64)
    dist.all_reduce(failed, group=group)
    if problem or int(failed.item()) or head is None:
        raise TeacherError(
            "cannot use this teacher with --tensor-parallel: its output head could not be split "
            f"into vocabulary shards ({problem or 'on another rank of the group'}); the sparsify "
            "needs the head sharded by vocabulary (a 'colwise' lm_head in the model's TP plan). "
            "Dump without --tensor-parallel (on a device it fits), or use a model whose TP plan "
            "shards lm_head colwise"
        )
    return head


def _amax(x: torch.Tensor) -> float:
    return float(x.abs().max()) if x.numel() else 0.0
