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

import sys
from typing import Any

import numpy as np
import torch

from logitcache.data._packing import unpack
from logitcache.data.prefetch import Batch
from logitcache.errors import CacheCorruptError, ConfigError
from logitcache.format._sparse import join_planes, sqrt_tables
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
    """Prefetch transform: compact targets -> ``target_ids`` int32 and float32 ``logprobs``.

    - ``id_delta_lo`` + ``id_delta_hi`` (byte planes of the id differences) -> ``target_ids``:
      one cumulative sum per position;
    - ``value_code`` + ``tail_code`` (sqrt codes of the k entries and the tail) -> ``logprobs``,
      ``tail_logprob``: the per-position normaliser ``log(sum q(code) + q(tail_code))`` over the
      k + 1 buckets (a sum of the probability table, i.e. the log-sum-exp of the log table without
      an ``exp``), then one gather of the log table and one subtraction; a batch with
      ``keep_tail=False`` drops ``tail_logprob`` afterwards;
    - ``value_code`` + ``value_lognorm`` (a ``top_k`` cut: normaliser computed on the host) ->
      ``logprobs``; ``logprob_code`` -> ``logprobs`` (sampled); float16 ``logprobs`` -> float32.

    Tables are copied to each device once. Codes must come from this cache's codec.
    ``numpy_on_cpu`` (default True) decodes CPU tensors with numpy (several times faster than
    torch's CPU kernels for these shapes) and checks that codes and ids are in range, raising
    :class:`~logitcache.errors.CacheCorruptError`; tests set it to False to run the torch path
    that devices take (unchecked there: a check would synchronise the stream). The two paths give
    identical ids and codes and log-probs equal up to float32 summation order (~1e-7).
    """

    numpy_on_cpu = True

    def __init__(self, codec: TargetCodec) -> None:
        table: np.ndarray | None = None
        self._probt_np: np.ndarray | None = None
        self._levels = 0
        if isinstance(codec, TopKCodec) and codec.values == "sqrt":
            table = codec.value_table()
            self._levels = codec.quant_levels
            self._probt_np = np.array(sqrt_tables(self._levels)[1], dtype=np.float32)
        elif isinstance(codec, SampledCodec) and codec.logprobs == "uint8":
            table = codec.value_table()
        self._vocab = codec.vocab_size if isinstance(codec, TopKCodec | SampledCodec) else 0
        self._table_np = None if table is None else np.array(table, dtype=np.float32)
        self._on_device: dict[tuple[str, torch.device], torch.Tensor] = {}
        self._pairs: tuple[np.ndarray, np.ndarray] | None = None

    def _table(self, device: torch.device, which: str = "log") -> tuple[np.ndarray, torch.Tensor]:
        host = self._table_np if which == "log" else self._probt_np
        if host is None:
            raise ConfigError(
                "the batch holds value codes but this cache's codec stores no code table; "
                "build the TargetDequantizer from the cache the batch came from"
            )
        key = (which, device)
        if key not in self._on_device:
            self._on_device[key] = torch.from_numpy(host).to(device)
        return host, self._on_device[key]

    def _numpy(self, t: torch.Tensor) -> bool:
        return self.numpy_on_cpu and t.device.type == "cpu"

    def __call__(self, batch: Batch) -> Batch:
        out = unpack(batch)
        keep_tail = out.pop("keep_tail", True)
        if "id_delta_lo" in out:
            out["target_ids"] = self._decode_ids(out.pop("id_delta_lo"), out.pop("id_delta_hi"))
        if "tail_code" in out:
            logprobs, tail = self._decode_sqrt(out.pop("value_code"), out.pop("tail_code"))
            out["logprobs"] = logprobs
            if keep_tail:
                out["tail_logprob"] = tail
        elif "value_code" in out:
            codes = out.pop("value_code")
            lognorm = out.pop("value_lognorm").to(torch.float32)
            table_np, table = self._table(codes.device)
            logq = _gather(table_np, table, codes, self.numpy_on_cpu)
            if self._numpy(logq):  # torch's CPU broadcast subtract is ~10x slower
                np.subtract(logq.numpy(), lognorm.numpy()[:, None], out=logq.numpy())
            else:
                logq.sub_(lognorm[:, None])
            out["logprobs"] = logq
        elif "logprob_code" in out:
            codes = out.pop("logprob_code")
            table_np, table = self._table(codes.device)
            out["logprobs"] = _gather(table_np, table, codes, self.numpy_on_cpu)
        elif isinstance(lp := out.get("logprobs"), torch.Tensor) and lp.dtype != torch.float32:
            out["logprobs"] = lp.float()
        return out

    def _decode_ids(self, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        if not self._numpy(lo):
            d = lo.to(torch.int32) | (hi.to(torch.int32) << 8)
            return torch.cumsum(d, dim=1, dtype=torch.int32)
        ids = np.empty(tuple(lo.shape), dtype=np.int32)
        np.cumsum(join_planes(lo.numpy(), hi.numpy()), axis=1, out=ids)
        if ids.size and int(ids[:, -1].max()) >= self._vocab:
            raise CacheCorruptError(
                f"decoded target id {int(ids[:, -1].max())} >= vocab_size {self._vocab}: a "
                "shard's id arrays are damaged; run `logitcache verify` and re-copy or re-dump "
                "the cache"
            )
        return torch.from_numpy(ids)

    def _pair_tables(
        self, codes: np.ndarray, logt: np.ndarray, probt: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Tables indexed by two adjacent uint8 codes read as one little-endian uint16.

        ``(log pair [65536] float64 whose two float32 halves are (log q(a), log q(b)), prob pair
        sum [65536] float32 q(a) + q(b))`` for a code pair ``a + 256 b``. numpy's gather costs per
        index (the index array is widened to intp first), so one gather per two codes halves the
        dequantisation on the CPU (768 KiB of tables: they stay in cache). None for codes that do
        not pair up (uint16 codes, an odd k, a non-contiguous array).
        """
        if codes.dtype != np.uint8 or codes.ndim != 2 or codes.shape[1] % 2:
            return None
        if not codes.flags.c_contiguous or sys.byteorder != "little":
            return None
        if self._pairs is None:
            pair = np.arange(1 << 16)
            a, b = pair & 0xFF, pair >> 8
            a, b = np.minimum(a, len(logt) - 1), np.minimum(b, len(logt) - 1)  # codes <= levels
            log_pair = np.empty((1 << 16, 2), dtype=np.float32)
            log_pair[:, 0], log_pair[:, 1] = logt[a], logt[b]
            prob_pair = (probt[a] + probt[b]).astype(np.float32)
            self._pairs = (log_pair.view(np.float64).reshape(-1), prob_pair)
        return self._pairs

    def _decode_sqrt(
        self, codes: torch.Tensor, tail_codes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logt_np, logt = self._table(codes.device, "log")
        probt_np, probt = self._table(codes.device, "prob")
        if not self._numpy(codes):
            flat = codes.reshape(-1).to(torch.int32)
            tail_flat = tail_codes.to(torch.int32)
            z = torch.index_select(probt, 0, flat).view(codes.shape).sum(dim=1)
            lognorm = z.add_(torch.index_select(probt, 0, tail_flat)).log_()
            logq = torch.index_select(logt, 0, flat).view(codes.shape).sub_(lognorm[:, None])
            return logq, torch.index_select(logt, 0, tail_flat).sub_(lognorm)
        c, tc = codes.numpy(), tail_codes.numpy()
        if c.size and max(int(c.max()), int(tc.max())) > self._levels:
            raise CacheCorruptError(
                f"value codes exceed levels={self._levels}: a shard's value arrays are damaged; "
                "run `logitcache verify` and re-copy or re-dump the cache"
            )
        pairs = self._pair_tables(c, logt_np, probt_np)
        if pairs is None:
            p, logq_np = np.take(probt_np, c), np.take(logt_np, c)
        else:  # two codes per lookup: half the gathers (see _pair_tables)
            c2 = c.view(np.uint16)
            p = np.take(pairs[1], c2)
            logq_np = np.take(pairs[0], c2).view(np.float32)
        # einsum sums the k probabilities ~4x faster than ndarray.sum(axis=1), and unlike a BLAS
        # matrix-vector product it starts no threads (which spin on a busy host)
        z_np = np.einsum("ij->i", p)
        z_np += np.take(probt_np, tc)
        with np.errstate(divide="ignore"):
            lognorm_np = np.log(z_np)
        np.subtract(logq_np, lognorm_np[:, None], out=logq_np)
        tail_np = np.take(logt_np, tc)
        tail_np -= lognorm_np
        return torch.from_numpy(logq_np), torch.from_numpy(tail_np)


def teacher_targets(batch: Batch) -> Any:
    """The loss library's teacher bundle for a dequantised batch (see :class:`TargetDequantizer`).

    Returns a :class:`~logitcache.loss.TopKTeacher` (``ids``, ``logprobs``, optional
    ``tail_logprob`` and ``temperature_lognorm``) or a :class:`~logitcache.loss.SampledTeacher`
    (``ids``, ``counts``, ``num_draws``, optional ``logprobs`` and ``temperature_lognorm``),
    aligned with ``batch["target_index"]``.
    """
    from logitcache.loss import SampledTeacher, TopKTeacher

    if any(k in batch for k in ("value_code", "logprob_code", "id_delta_lo", "packed")):
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
            num_draws=int(batch["num_draws"]),
            logprobs=None if lp is None else lp.float(),
            temperature_lognorm=temp,
        )
    raise ConfigError(f"batch kind must be 'topk' or 'sampled', got {kind!r}")
