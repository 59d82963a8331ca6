"""``logitcache export``'s fast paths write what the plain ones did (issue 20's speed work).

The export orders each position's entries by decreasing log-prob with one sort of packed keys
instead of a stable argsort and two gathers, block by block; these tests pin that order bit for
bit against the argsort, and the written files (zstd, row groups bounded) against the cache.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import logitcache.transform.exporter as exporter
from logitcache.format.targets import TopKTargets
from logitcache.store import CacheReader
from logitcache.transform.exporter import export_cache
from logitcache.transform.importer import ImportConfig, import_cache

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "smollm2_pydoc_top256.npz"
VOCAB = 49152


def _reference(ids: np.ndarray, lp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-lp, axis=1, kind="stable")
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(lp, order, axis=1)


def test_most_likely_first_is_the_stable_argsort_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exporter, "_SORT_POSITIONS", 5)  # several blocks, a short last one
    rng = np.random.default_rng(0)
    for trial in range(120):
        p, k = int(rng.integers(0, 40)), int(rng.integers(1, 33))
        ids = np.sort(rng.integers(0, 1 << 24, (p, k)), axis=1).astype(np.int32)
        lp = np.log(rng.dirichlet(np.full(k, 0.3), size=p)).astype(np.float32)
        if trial % 4 == 0:
            lp[:, : k // 2] = -np.inf  # padding entries
        elif trial % 4 == 1:
            lp = np.round(lp) - np.float32(1.0)  # many ties: broken by increasing id
        elif trial % 4 == 2:
            lp[:, 0], lp[:, -1] = 0.0, 3e-8  # one certain entry, a rounding just above zero
        if trial % 5 == 3:
            ids = rng.integers(0, 1000, (p, k)).astype(np.int32)  # not ascending: gather path
        want_ids, want_lp = _reference(ids, lp)
        got_ids, got_lp = exporter._most_likely_first(ids, lp)
        assert got_ids.dtype == np.int32 and got_lp.dtype == np.float32
        assert np.array_equal(got_ids, want_ids)
        assert np.array_equal(got_lp.view(np.int32), want_lp.view(np.int32))  # bit for bit


def _source(path: Path, rows: int, seq: int, k: int) -> None:
    rng = np.random.default_rng(1)
    n = rows * seq
    if DATA.exists():
        d = np.load(DATA)
        ids = d["topk_ids"][:n, :k].astype(np.int32)
        lp = (d["topk_logits"][:n, :k] - d["logsumexp"][:n, None]).astype(np.float32)
    else:
        z = rng.standard_normal((n, 256)) * 3
        lp_all = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        ids = np.argsort(-lp_all, axis=1)[:, :k].astype(np.int32)
        lp = np.take_along_axis(lp_all, ids, axis=1).astype(np.float32)

    def nested(flat: np.ndarray) -> pa.Array:
        inner = pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * k),
                                         pa.array(flat.reshape(-1)))  # fmt: skip
        return pa.ListArray.from_arrays(pa.array(np.arange(rows + 1, dtype=np.int32) * seq), inner)

    table = pa.table(
        {
            "input_ids": rng.integers(0, VOCAB, (rows, seq)).tolist(),
            "topk_ids": nested(ids),
            "topk_logprobs": nested(lp),
        }
    )
    pq.write_table(table, path)


def test_export_is_zstd_with_bounded_row_groups_and_the_cache_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src.parquet"
    _source(src, rows=12, seq=40, k=16)
    cache = str(tmp_path / "cache")
    import_cache(ImportConfig(str(src), cache, layout="rlve", vocab_size=VOCAB))
    monkeypatch.setattr(exporter, "_ROW_GROUP_BYTES", 3 * 40 * 16 * 8 + 3 * 40 * 16)
    monkeypatch.setattr(exporter, "_SORT_POSITIONS", 7)
    out = tmp_path / "out"
    res = export_cache(cache, str(out), layout="plain")
    pf = pq.ParquetFile(out / "part-00000.parquet")
    meta = pf.metadata
    assert meta.num_row_groups == 4 and all(
        meta.row_group(g).num_rows == 3 for g in range(meta.num_row_groups)
    )
    assert {meta.row_group(0).column(c).compression for c in range(meta.num_columns)} == {"ZSTD"}
    table = pf.read()
    ids = np.asarray(table.column("target_token_ids").combine_chunks().flatten().flatten())
    lps = np.asarray(table.column("target_logprobs").combine_chunks().flatten().flatten())
    targets = [r.targets for r in CacheReader(cache).iter_rows()]
    assert all(isinstance(t, TopKTargets) for t in targets)
    want_ids, want_lp = _reference(
        np.concatenate([t.ids for t in targets]),  # type: ignore[union-attr]
        np.concatenate([t.logprobs for t in targets]),  # type: ignore[union-attr]
    )
    assert res.positions == len(want_ids)
    assert np.array_equal(ids.reshape(want_ids.shape), want_ids)
    assert np.array_equal(lps.reshape(want_lp.shape), want_lp)
