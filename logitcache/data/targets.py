"""Device side of a batch: dequantise the codes where the step runs, then hand targets to a loss.

:class:`TargetDequantizer` is the :class:`~logitcache.data.DevicePrefetcher` ``transform`` for a
cache: on CUDA it runs on the prefetcher's side stream right after the host-to-device copy, so
uint8 codes cross PCIe (a quarter of the bytes of float32 log-probs) and become float32 log-probs
with one table gather and one subtraction, overlapped with the previous step. On CPU the same
arithmetic runs through numpy, which gathers a 256-entry table several times faster than torch's
CPU ``index_select``; both paths give bit-identical values (the arithmetic of
``format/_decode.py``: exact integer normalisers, float32 gather, float32 subtract).

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
from logitcache.errors import CacheCorruptError, ConfigError
from logitcache.format._decode import (
    decode_ids_np,
    decode_ids_torch,
    sqrt_dequantize_np,
    sqrt_dequantize_torch,
    sqrt_device_tables,
    sqrt_logprobs_np,
    sqrt_logprobs_torch,
)
from logitcache.format.codec import TargetCodec
from logitcache.format.sampled import SampledCodec
from logitcache.format.topk import TopKCodec

__all__ = ["TargetDequantizer", "teacher_targets"]


#: the id arrays of every top-k id layout (``format/_decode.py``)
_ID_ARRAYS = ("id_lo", "id_hi_delta", "id_hi_delta_top", "id_delta_lo", "id_delta_hi")


class TargetDequantizer:
    """Prefetch transform: compact targets -> ``target_ids`` int32 and float32 ``logprobs``.

    - the codec's id arrays (``id_lo`` + ``id_hi_delta`` (+ ``id_hi_delta_top``), or the older
      ``id_delta_lo`` + ``id_delta_hi``) -> ``target_ids``: one cumulative sum per position;
    - ``value_code`` + ``tail_code`` (sqrt codes of the k entries and the tail) -> ``logprobs``,
      ``tail_logprob``: the per-position normaliser over the k + 1 buckets (an exact integer sum
      and one log), then one gather of the log table and one subtraction; a batch with
      ``keep_tail=False`` drops ``tail_logprob`` afterwards;
    - ``value_code`` + ``value_lognorm`` (a ``top_k`` cut: normaliser computed on the host) ->
      ``logprobs``; ``logprob_code`` -> ``logprobs`` (sampled); float16 ``logprobs`` -> float32.

    The arithmetic is ``format/_decode.py``'s, shared with the codec and the host collate.
    Tables are copied to each device once. Codes must come from this cache's codec.
    ``numpy_on_cpu`` (default True) decodes CPU tensors with numpy (several times faster than
    torch's CPU kernels for these shapes) and checks that codes and ids are in range, raising
    :class:`~logitcache.errors.CacheCorruptError`; tests set it to False to run the torch path
    that devices take (unchecked there: a check would synchronise the stream; the loader checks
    every shard on the host when it loads it, :meth:`~logitcache.data.collate.Collator.view`).
    The two paths give bit-identical ids and log-probs.
    """

    numpy_on_cpu = True

    def __init__(self, codec: TargetCodec) -> None:
        self._levels = 0
        self._log_scale = 0.0
        self._sampled_table: np.ndarray | None = None
        self._sqrt_tables: tuple[np.ndarray, np.ndarray] | None = None
        if isinstance(codec, TopKCodec) and codec.values == "sqrt":
            self._levels = codec.quant_levels
            logt, sq, self._log_scale = sqrt_device_tables(self._levels, codec.k)
            self._sqrt_tables = (logt, sq)
        elif isinstance(codec, SampledCodec) and codec.logprobs == "uint8":
            self._sampled_table = np.array(codec.value_table(), dtype=np.float32)
        self._vocab = codec.vocab_size if isinstance(codec, TopKCodec | SampledCodec) else 0
        self._on_device: dict[tuple[str, torch.device], torch.Tensor] = {}

    def _table(self, device: torch.device, which: str) -> torch.Tensor:
        key = (which, device)
        if key not in self._on_device:
            host = {
                "log": None if self._sqrt_tables is None else self._sqrt_tables[0],
                "sq": None if self._sqrt_tables is None else self._sqrt_tables[1],
                "sampled": self._sampled_table,
            }[which]
            if host is None:
                raise ConfigError(
                    "the batch holds value codes but this cache's codec stores no code table; "
                    "build the TargetDequantizer from the cache the batch came from"
                )
            self._on_device[key] = torch.from_numpy(host).to(device)
        return self._on_device[key]

    def _numpy(self, t: torch.Tensor) -> bool:
        return self.numpy_on_cpu and t.device.type == "cpu"

    def __call__(self, batch: Batch) -> Batch:
        out = unpack(batch)
        keep_tail = out.pop("keep_tail", True)
        id_names = [n for n in _ID_ARRAYS if n in out]
        if id_names:
            out["target_ids"] = self._decode_ids({n: out.pop(n) for n in id_names})
        if "tail_code" in out:
            logprobs, tail = self._decode_sqrt(out.pop("value_code"), out.pop("tail_code"))
            out["logprobs"] = logprobs
            if keep_tail:
                out["tail_logprob"] = tail
        elif "value_code" in out:
            codes = out.pop("value_code")
            lognorm = out.pop("value_lognorm")
            if self._numpy(codes):
                self._check_codes(codes.numpy())
                logq = sqrt_logprobs_np(codes.numpy(), lognorm.numpy(), self._levels)
                out["logprobs"] = torch.from_numpy(logq)
            else:
                logt = self._table(codes.device, "log")
                out["logprobs"] = sqrt_logprobs_torch(codes, lognorm, logt)
        elif "logprob_code" in out:
            codes = out.pop("logprob_code")
            if self._numpy(codes) and self._sampled_table is not None:
                out["logprobs"] = torch.from_numpy(np.take(self._sampled_table, codes.numpy()))
            else:
                table = self._table(codes.device, "sampled")
                flat = codes.reshape(-1).to(torch.int32)
                out["logprobs"] = torch.index_select(table, 0, flat).reshape(codes.shape)
        elif isinstance(lp := out.get("logprobs"), torch.Tensor) and lp.dtype != torch.float32:
            out["logprobs"] = lp.float()
        return out

    def _decode_ids(self, planes: dict[str, torch.Tensor]) -> torch.Tensor:
        if not self._numpy(next(iter(planes.values()))):
            return decode_ids_torch(planes)
        ids = decode_ids_np({n: t.numpy() for n, t in planes.items()})
        last = ids[:, -1] if ids.ndim == 2 and ids.shape[1] else ids.reshape(-1)
        bad = np.flatnonzero((last < 0) | (last >= self._vocab))  # ascending: last is largest
        if bad.size:
            raise CacheCorruptError(
                f"decoded target ids reach vocab_size {self._vocab} or more at {bad.size} "
                f"positions of the batch (first: {int(bad[0])}): a shard's id arrays are "
                "damaged; run `logitcache verify` and re-copy or re-dump the cache"
            )
        return torch.from_numpy(ids)

    def _check_codes(self, *codes: np.ndarray) -> None:
        if self._sqrt_tables is None:
            self._table(torch.device("cpu"), "log")  # raises the ConfigError
        if any(c.size and int(c.max()) > self._levels for c in codes):
            raise CacheCorruptError(
                f"value codes exceed levels={self._levels}: a shard's value arrays are damaged; "
                "run `logitcache verify` and re-copy or re-dump the cache"
            )

    def _decode_sqrt(
        self, codes: torch.Tensor, tail_codes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._numpy(codes):
            logt, sq = self._table(codes.device, "log"), self._table(codes.device, "sq")
            return sqrt_dequantize_torch(codes, tail_codes, logt, sq, self._log_scale)
        c, tc = codes.numpy(), tail_codes.numpy()
        self._check_codes(c, tc)
        logq, tail = sqrt_dequantize_np(c, tc, self._levels)
        return torch.from_numpy(logq), torch.from_numpy(tail)


def teacher_targets(batch: Batch) -> Any:
    """The loss library's teacher bundle for a dequantised batch (see :class:`TargetDequantizer`).

    Returns a :class:`~logitcache.loss.TopKTeacher` (``ids``, ``logprobs``, optional
    ``tail_logprob`` and ``temperature_lognorm``) or a :class:`~logitcache.loss.SampledTeacher`
    (``ids``, ``counts``, ``num_draws`` from the batch's ``samples``, optional ``logprobs`` and
    ``temperature_lognorm``), aligned with ``batch["target_index"]``.
    """
    from logitcache.loss import SampledTeacher, TopKTeacher

    if any(k in batch for k in ("value_code", "logprob_code", *_ID_ARRAYS, "packed")):
        raise ConfigError(
            "the batch still holds codes: dequantise it first (make_loader does; or pass "
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
            num_draws=int(batch["samples"]),
            logprobs=None if lp is None else lp.float(),
            temperature_lognorm=temp,
        )
    raise ConfigError(f"batch kind must be 'topk' or 'sampled', got {kind!r}")
