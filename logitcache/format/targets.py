"""In-memory sparse targets: what a dump hands to a codec and what a codec gives back.

Both containers are plain numpy and hold a flat run of *positions* (the positions of one or more
rows whose ``loss_mask`` is 1, in row-major order). Values are always the teacher's log-probs at
temperature 1, normalised over the full vocabulary (temperature is never pre-applied); the mass
outside the stored ids is kept explicitly as ``tail_logprob`` so losses can use a tail bucket
without the cancellation of ``log(1 - sum p)``.

``temperature_lognorm[:, j]`` is ``log sum_v p_v ** (1 / T_j)`` over the *full* vocabulary for the
j-th recorded temperature, which makes the teacher's log-probs at that temperature exact:
``log p_T(i) = logprobs[i] / T_j - temperature_lognorm[j]``.

Padding: a top-k position that has fewer than k possible ids (k > real vocab) pads with id 0 and
log-prob ``-inf``; losses treat such entries as zero mass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from logitcache.errors import CodecError

__all__ = ["SampledTargets", "TopKTargets"]


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise CodecError(msg)


@dataclass(frozen=True, eq=False)
class TopKTargets:
    """The k most likely ids per position with their log-probs.

    ids: [P, k] int32; logprobs: [P, k] float32; tail_logprob: [P] float32 (log of the mass outside
    ``ids``, ``-inf`` when there is none); temperature_lognorm: [P, nT] float32 (nT may be 0).
    """

    ids: np.ndarray
    logprobs: np.ndarray
    tail_logprob: np.ndarray
    temperature_lognorm: np.ndarray

    def __post_init__(self) -> None:
        _check(self.ids.ndim == 2, f"top-k ids must be [positions, k], got shape {self.ids.shape}")
        p, k = self.ids.shape
        _check(
            self.logprobs.shape == (p, k),
            f"top-k logprobs shape {self.logprobs.shape} does not match ids shape {self.ids.shape}",
        )
        _check(
            self.tail_logprob.shape == (p,),
            f"tail_logprob must be [{p}], got shape {self.tail_logprob.shape}",
        )
        _check(
            self.temperature_lognorm.ndim == 2 and self.temperature_lognorm.shape[0] == p,
            f"temperature_lognorm must be [{p}, n_temperatures], "
            f"got shape {self.temperature_lognorm.shape}",
        )

    @property
    def num_positions(self) -> int:
        return int(self.ids.shape[0])

    @property
    def k(self) -> int:
        return int(self.ids.shape[1])


@dataclass(frozen=True, eq=False)
class SampledTargets:
    """Unique ids drawn in ``n`` draws from the teacher per position, with their counts (ragged).

    num_unique: [P] int32, entries per position (sum = E); ids: [E] int32, ascending within a
    position; counts: [E] int32, draws per id (each position's counts sum to n); logprobs: [E]
    float32 teacher log-probs of the drawn ids, or None when not stored; tail_logprob is not
    defined for samples. temperature_lognorm: [P, nT] float32 as for top-k.
    """

    num_unique: np.ndarray
    ids: np.ndarray
    counts: np.ndarray
    logprobs: np.ndarray | None
    temperature_lognorm: np.ndarray

    def __post_init__(self) -> None:
        _check(self.num_unique.ndim == 1, "num_unique must be 1-D [positions]")
        e = int(self.num_unique.sum())
        _check(
            self.ids.shape == (e,) and self.counts.shape == (e,),
            f"sampled ids/counts must be [{e}] (sum of num_unique), "
            f"got {self.ids.shape} and {self.counts.shape}",
        )
        _check(
            self.logprobs is None or self.logprobs.shape == (e,),
            f"sampled logprobs must be [{e}] or None",
        )
        p = self.num_unique.shape[0]
        _check(
            self.temperature_lognorm.ndim == 2 and self.temperature_lognorm.shape[0] == p,
            f"temperature_lognorm must be [{p}, n_temperatures], "
            f"got shape {self.temperature_lognorm.shape}",
        )

    @property
    def num_positions(self) -> int:
        return int(self.num_unique.shape[0])

    def offsets(self) -> np.ndarray:
        """[P + 1] int64 start of each position's entries in the flat arrays."""
        out = np.zeros(self.num_positions + 1, dtype=np.int64)
        np.cumsum(self.num_unique, out=out[1:])
        return out
