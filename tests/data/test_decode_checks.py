"""Ids and codes are range-checked where they are decoded, on the host, once per loaded shard
(``Collator.view``), never in the training step; the host and device decodes agree bit for bit."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from loader_cache import VOCAB, build_cache

from logitcache.data import RowSampler, StreamingLogitDataset, TargetDequantizer
from logitcache.data.collate import Collator
from logitcache.errors import CacheCorruptError
from logitcache.store import CacheReader
from logitcache.store.base import EncodedRows


def damaged(rows: EncodedRows, name: str, where: tuple[int, ...], value: int) -> EncodedRows:
    """A copy of the shard's arrays with one value changed (the file itself is left alone)."""
    enc = {n: a.copy() for n, a in rows.encoded.items()}
    if name == "input_ids":
        ids = rows.input_ids.copy()
        ids[where] = value
        return dataclasses.replace(rows, input_ids=ids)
    enc[name][where] = value
    return dataclasses.replace(rows, encoded=enc)


def first_target_row(rows: EncodedRows, position: int) -> int:
    """Row id of the row that owns stored position ``position``."""
    per_row = (rows.loss_mask != 0).sum(axis=1)
    return int(rows.row_id[np.searchsorted(np.cumsum(per_row), position, side="right")])


@pytest.mark.parametrize(
    ("kind", "name", "value", "what"),
    [
        ("topk", "id_hi_delta", 1, "teacher ids"),
        ("topk", "value_code", 250, "exceed levels"),
        ("sampled", "id_delta_hi", 1, "sampled ids"),
    ],
)
def test_a_shard_with_out_of_range_targets_is_refused_naming_shard_and_rows(
    tmp_path: Path, kind: str, name: str, value: int, what: str
) -> None:
    reader = CacheReader(build_cache(tmp_path / "c", kind=kind))
    collator = Collator(reader.manifest)
    rows = reader.load_shard(1)
    collator.view(1, rows)  # the pristine shard passes
    position = 5
    where = (position, -1) if rows.encoded[name].ndim == 2 else (position,)
    if kind == "sampled":  # the last entry of position 5
        ent = np.cumsum(rows.encoded["num_unique"].astype(np.int64))
        where = (int(ent[position]) - 1,)
    with pytest.raises(CacheCorruptError, match=what) as err:
        collator.view(1, damaged(rows, name, where, value))
    msg = str(err.value)
    assert reader.manifest.shards[1].path in msg and "shard 1" in msg
    assert f"row ids [{first_target_row(rows, position)}]" in msg
    assert "re-copy or re-dump" in msg


def test_input_ids_outside_the_padded_vocabulary_are_refused(tmp_path: Path) -> None:
    reader = CacheReader(build_cache(tmp_path / "c"))
    rows = reader.load_shard(0)
    bad = damaged(rows, "input_ids", (2, 3), VOCAB + 3)  # padded_vocab_size = VOCAB + 3
    with pytest.raises(CacheCorruptError, match=r"input_ids outside \[0, 100\)") as err:
        Collator(reader.manifest).view(0, bad)
    assert f"row ids [{int(rows.row_id[2])}]" in str(err.value)


def test_cpu_and_device_dequantisation_agree_bit_for_bit(tmp_path: Path) -> None:
    url = build_cache(tmp_path / "c", rows=40, k=8)
    reader = CacheReader(url)
    sampler = RowSampler([s.rows for s in reader.manifest.shards], 6, order="sequential")
    ds = StreamingLogitDataset(url, sampler)
    numpy_path, torch_path = TargetDequantizer(reader.codec), TargetDequantizer(reader.codec)
    torch_path.numpy_on_cpu = False  # the code path CUDA devices take
    for host in ds:
        a = numpy_path(dict(host))
        b = torch_path(host)
        for key in ("target_ids", "logprobs", "tail_logprob"):
            assert a[key].dtype == b[key].dtype
            assert a[key].numpy().tobytes() == b[key].numpy().tobytes(), key
    assert torch.equal(a["target_ids"], b["target_ids"])
