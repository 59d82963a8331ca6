"""Device side of a batch: dequantise the codes where the step runs, then hand targets to a loss.

:class:`TargetDequantizer` is the :class:`~logitcache.data.DevicePrefetcher` ``transform`` for a
cache: on CUDA it runs on the prefetcher's side stream right after the host-to-device copy, so
uint8 codes cross PCIe (a quarter of the bytes of float32 log-probs) and become float32 log-probs
with one table gather and one subtraction, overlapped with the previous step. On CPU the same
arithmetic runs through numpy, which gathers a 256-entry table several times faster than torch's
CPU ``index_select``; both paths give bit-identical values (float32 gather, float32 subtract).

:func:`teacher_targets` turns a dequantised batch into the loss library's
:class:`~logitcache.loss.TopKTeacher` / :class:`~logitcache.loss.SampledTeacher`. It imports
``logitcache.loss`` (its public API only) when called, so ``import logitcache.data`` stays free of
it: a training loop with its own loss never loads ours.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from logitcache.data._packing import unpack
from logitcache.data.prefetch import Batch
from logitcache.errors import ConfigError
from logitcache.format.codec import TargetCodec
from logitcache.format.sampled import SampledCodec
from logitcache.format.topk import TopKCodec

__all__ = ["TargetDequantizer", "teacher_targets"]


def _gather(
    table_np: np.ndarray, table: torch.Tensor, codes: torch.Tensor, numpy_on_cpu: bool
) -> torch.Tensor:
    if numpy_on_cpu and codes.device.type == "cpu":
        return torch.from_numpy(np.take(table_np, codes.numpy()))
    flat = codes.reshape(-1).to(torch.int32)
    return torch.index_select(table, 0, flat).reshape(codes.shape)


class TargetDequantizer:
    """Prefetch transform: ``value_code`` + ``value_lognorm`` -> float32 ``logprobs`` (top-k),
    ``logprob_code`` -> ``logprobs`` (sampled), float16 ``logprobs`` -> float32; other fields pass.

    Tables are copied to each device once. Codes must come from this cache's codec.
    ``numpy_on_cpu`` (default True) gathers CPU tensors with numpy; tests set it to False to run
    the torch path that devices take.
    """

    numpy_on_cpu = True

    def __init__(self, codec: TargetCodec) -> None:
        table: np.ndarray | None = None
        if (isinstance(codec, TopKCodec) and codec.values == "sqrt") or (
            isinstance(codec, SampledCodec) and codec.logprobs == "uint8"
        ):
            table = codec.value_table()
        self._table_np = None if table is None else np.ascontiguousarray(table, np.float32)
        self._on_device: dict[torch.device, torch.Tensor] = {}

    def _table(self, device: torch.device) -> tuple[np.ndarray, torch.Tensor]:
        if self._table_np is None:
            raise ConfigError(
                "the batch holds value codes but this cache's codec stores no code table; "
                "build the TargetDequantizer from the cache the batch came from"
            )
        if device not in self._on_device:
            self._on_device[device] = torch.from_numpy(self._table_np).to(device)
        return self._table_np, self._on_device[device]

    def __call__(self, batch: Batch) -> Batch:
        out = unpack(batch)
        if "value_code" in out:
            codes = out.pop("value_code")
            lognorm = out.pop("value_lognorm")
            table_np, table = self._table(codes.device)
            logq = _gather(table_np, table, codes, self.numpy_on_cpu)
            out["logprobs"] = logq.sub_(lognorm.to(torch.float32)[:, None])
        elif "logprob_code" in out:
            codes = out.pop("logprob_code")
            table_np, table = self._table(codes.device)
            out["logprobs"] = _gather(table_np, table, codes, self.numpy_on_cpu)
        elif isinstance(lp := out.get("logprobs"), torch.Tensor) and lp.dtype != torch.float32:
            out["logprobs"] = lp.float()
        return out


def teacher_targets(batch: Batch) -> Any:
    """The loss library's teacher bundle for a dequantised batch (see :class:`TargetDequantizer`).

    Returns a :class:`~logitcache.loss.TopKTeacher` (``ids``, ``logprobs``, optional
    ``tail_logprob`` and ``temperature_lognorm``) or a :class:`~logitcache.loss.SampledTeacher`
    (``ids``, ``counts``, ``num_draws``, optional ``logprobs`` and ``temperature_lognorm``),
    aligned with ``batch["target_index"]``.
    """
    from logitcache.loss import SampledTeacher, TopKTeacher

    if "value_code" in batch or "logprob_code" in batch:
        raise ConfigError(
            "the batch still holds value codes: dequantise it first (make_loader does; or pass "
            "TargetDequantizer(reader.codec) as the DevicePrefetcher transform)"
        )
    kind = batch.get("kind")
    ids = batch["target_ids"]
    temp = batch.get("temperature_lognorm")
    if kind == "topk":
        return TopKTeacher(
            ids=ids,
            logprobs=batch["logprobs"].float(),
            tail_logprob=batch.get("tail_logprob"),
            temperature_lognorm=temp,
        )
    if kind == "sampled":
        lp = batch.get("logprobs")
        return SampledTeacher(
            ids=ids,
            counts=batch["counts"],
            num_draws=int(batch["num_draws"]),
            logprobs=None if lp is None else lp.float(),
            temperature_lognorm=temp,
        )
    raise ConfigError(f"batch kind must be 'topk' or 'sampled', got {kind!r}")
