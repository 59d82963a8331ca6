"""The trainer warns when the cache's sqrt-quantised values are a visible part of the loss."""

from __future__ import annotations

from logitcache.format import TargetsInfo, TopKCodec
from logitcache.format.manifest import Coverage, Manifest
from logitcache.store import CacheHeader
from logitcache.train.student import quantisation_note


def _manifest(values: str) -> Manifest:
    header = CacheHeader(
        codec=TopKCodec(k=4, vocab_size=50, values=values),
        targets=TargetsInfo("topk", k=4),
        seq_len=8,
        vocab_size=50,
        padded_vocab_size=50,
    )
    return header.manifest((), Coverage())


def test_note_only_for_sqrt_values_and_a_small_loss() -> None:
    note = quantisation_note(_manifest("sqrt"), 0.05)
    assert note is not None and "--values float16" in note
    assert quantisation_note(_manifest("sqrt"), 0.5) is None
    assert quantisation_note(_manifest("float16"), 0.05) is None
    assert quantisation_note(_manifest("sqrt"), None) is None
