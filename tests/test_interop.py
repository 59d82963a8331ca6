"""A cache read with nothing but json + zarr / pyarrow + numpy, following docs/format.md and
docs/codecs.md, gives the same values as logitcache's own reader.

The reference decoder below deliberately imports nothing from logitcache: if the docs and the
code drift apart, this test fails.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import zarr
from synth import sampled_targets, topk_targets

from logitcache.format import SampledCodec, SourceInfo, TargetsInfo, TopKCodec
from logitcache.store import CacheHeader, CacheReader, CacheWriter

# -- the plain reader (docs only) --------------------------------------------------------------


def plain_shards(root: Path) -> tuple[dict, list[dict[str, np.ndarray]]]:
    """Manifest + per shard {array name: numpy array} (row arrays and targets/<name> arrays)."""
    m = json.loads((root / "manifest.json").read_text())
    if m["format"] != "logitcache" or m["format_version"].split(".")[0] != "1":
        raise ValueError("not a version-1 logitcache cache")
    out = []
    for shard in m["shards"]:
        path = root / shard["path"]
        arrays: dict[str, np.ndarray] = {}
        if m["backend"] == "zarr":
            g = zarr.open_group(str(path), mode="r")
            for name in ("row_id", "input_ids", "loss_mask"):
                arrays[name] = g[name][...]
            for name in g["targets"].array_keys():
                arrays[f"targets/{name}"] = g[f"targets/{name}"][...]
        else:
            t = pa.ipc.open_file(str(path)).read_all()
            s = m["seq_len"]
            arrays["row_id"] = t.column("row_id").to_numpy()
            for name in ("input_ids", "loss_mask"):
                flat = t.column(name).combine_chunks().flatten().to_numpy()
                arrays[name] = flat.reshape(-1, s)
            for name in t.column_names:
                if name.startswith("targets/"):
                    arrays[name] = t.column(name).combine_chunks().flatten().to_numpy()
        out.append(arrays)
    return m, out


def plain_ids(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return lo.astype(np.int64) | (hi.astype(np.int64) << 8)


def plain_topk_ids(codec: dict, a: dict[str, np.ndarray], positions: int) -> np.ndarray:
    """docs/codecs.md, "Id layouts": no ``id_layout`` in the codec entry means "delta"."""
    k = codec["k"]
    if codec.get("id_layout", "delta") == "delta":
        d = plain_ids(a["targets/id_delta_lo"], a["targets/id_delta_hi"]).reshape(positions, k)
        return np.cumsum(d, axis=1)
    h = a["targets/id_hi_delta"].astype(np.int64)
    if "targets/id_hi_delta_top" in a:
        h = h | (a["targets/id_hi_delta_top"].astype(np.int64) << 8)
    h, lo = h.reshape(positions, k), a["targets/id_lo"].reshape(positions, k)
    return (np.cumsum(h, axis=1) << 8) | lo


def plain_topk(codec: dict, a: dict[str, np.ndarray], positions: int) -> dict[str, np.ndarray]:
    k = codec["k"]
    out = {"ids": plain_topk_ids(codec, a, positions)}
    if codec["values"] == "sqrt":
        L = codec["levels"]
        table = np.log(((np.arange(L + 1) - 0.5) / L) ** 2).astype(np.float32)
        table[0] = -np.inf
        sq = (2 * np.arange(L + 1, dtype=np.int64) - 1) ** 2
        sq[0] = 0
        value_code = a["targets/value_code"].reshape(positions, k)
        tail_code = a["targets/tail_code"].reshape(positions)
        s = sq[value_code].sum(axis=1) + sq[tail_code]
        lognorm = (np.log(s.astype(np.float64)) - np.log(4.0 * L * L)).astype(np.float32)
        out["logprobs"] = table[value_code] - lognorm[:, None]
        out["tail_logprob"] = table[tail_code] - lognorm
    else:
        out["logprobs"] = a["targets/logprobs"].reshape(positions, k).astype(np.float32)
        out["tail_logprob"] = a["targets/tail_logprob"].reshape(positions)
    return out


def plain_sampled(a: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    num_unique = a["targets/num_unique"]  # as stored: uint8 here
    offsets = np.concatenate([[0], np.cumsum(num_unique, dtype=np.int64)])
    cs = np.cumsum(plain_ids(a["targets/id_delta_lo"], a["targets/id_delta_hi"]))
    ids = cs - np.repeat(np.concatenate([[0], cs])[offsets[:-1]], num_unique.astype(np.int64))
    return {"num_unique": num_unique, "ids": ids, "counts": a["targets/count_minus1"] + 1}


# -- the comparison -----------------------------------------------------------------------------


def build(url: Path, backend: str, codec: object, method: str, vocab: int = 300) -> None:
    rng = np.random.default_rng(7)
    hdr = CacheHeader(
        codec=codec,  # type: ignore[arg-type]
        targets=TargetsInfo(
            method=method,
            k=getattr(codec, "k", None),  # type: ignore[arg-type]
            samples=getattr(codec, "samples", None),
            tail="bucket" if method == "topk" else "none",
        ),
        seq_len=9,
        vocab_size=vocab,
        padded_vocab_size=vocab + 20,
        backend=backend,  # type: ignore[arg-type]
        teacher=SourceInfo(name="synthetic"),
    )
    with CacheWriter(str(url), hdr, shard_bytes=3000) as w:
        for b in range(5):
            mask = rng.random((4, 9)) > 0.25
            p = int(mask.sum())
            t = (
                topk_targets(rng, p, 16, vocab)
                if method == "topk"
                else sampled_targets(rng, p, 30, vocab, with_logprobs=False)
            )
            w.write(np.arange(4) + 4 * b, rng.integers(0, 300, (4, 9)), mask, t)


@pytest.mark.parametrize("backend", ["zarr", "arrow"])
@pytest.mark.parametrize(
    ("values", "vocab", "layout"),
    [
        ("sqrt", 300, "hi-delta"),
        ("float16", 300, "hi-delta"),
        ("float32", 300, "hi-delta"),
        ("sqrt", 70_000, "hi-delta"),  # with the id_hi_delta_top plane
        ("sqrt", 70_000, "delta"),  # the layout of caches before format 1.2
    ],
)
def test_plain_topk_reader_matches(
    tmp_path: Path, backend: str, values: str, vocab: int, layout: str
) -> None:
    url = tmp_path / "c"
    codec = TopKCodec(k=16, vocab_size=vocab, values=values, id_layout=layout)
    build(url, backend, codec, "topk", vocab)
    m, shards = plain_shards(url)
    reader = CacheReader(str(url))
    assert len(shards) == reader.num_shards > 1
    for i, arrays in enumerate(shards):
        rows = reader.read_rows(
            int(reader.shard_row_offsets[i]), int(reader.shard_row_offsets[i + 1])
        )
        assert np.array_equal(arrays["row_id"], rows.row_id)
        assert np.array_equal(arrays["input_ids"], rows.input_ids)
        assert np.array_equal(arrays["loss_mask"].astype(bool), rows.loss_mask)
        positions = int(arrays["loss_mask"].sum())
        assert positions == m["shards"][i]["positions"]
        got = plain_topk(m["codec"], arrays, positions)
        t = rows.targets
        assert np.array_equal(got["ids"], t.ids)
        np.testing.assert_allclose(got["logprobs"], t.logprobs, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(got["tail_logprob"], t.tail_logprob, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["zarr", "arrow"])
def test_plain_sampled_reader_matches(tmp_path: Path, backend: str) -> None:
    url = tmp_path / "c"
    build(url, backend, SampledCodec(samples=30, vocab_size=300), "sampled")
    _, shards = plain_shards(url)
    reader = CacheReader(str(url))
    for i, arrays in enumerate(shards):
        t = reader.read_rows(
            int(reader.shard_row_offsets[i]), int(reader.shard_row_offsets[i + 1])
        ).targets
        got = plain_sampled(arrays)
        assert np.array_equal(got["num_unique"], t.num_unique)
        assert np.array_equal(got["ids"], t.ids)
        assert np.array_equal(got["counts"], t.counts)


def test_row_and_position_addressing_as_documented(tmp_path: Path) -> None:
    """docs/format.md: target of (row r, position t) is position off[r] + loss_mask[r, :t].sum()."""
    url = tmp_path / "c"
    build(url, "zarr", TopKCodec(k=16, vocab_size=300, values="float32"), "topk")
    m, shards = plain_shards(url)
    arrays = shards[0]
    mask = arrays["loss_mask"].astype(bool)
    off = np.concatenate([[0], np.cumsum(mask.sum(axis=1))])
    dec = plain_topk(m["codec"], arrays, int(mask.sum()))
    reader = CacheReader(str(url))
    for r in range(mask.shape[0]):
        for t in np.flatnonzero(mask[r]):
            p = off[r] + mask[r, :t].sum()
            one = reader.targets_at(int(arrays["row_id"][r]), int(t))
            assert one is not None and np.array_equal(one.ids[0], dec["ids"][p])
