"""The import's fast paths give the cache the slow ones would (issue 20's speed work).

The import converts each read batch in pieces of about ``_CHUNK_BYTES``, checks a piece with
whole-array reductions before looking for the rows at fault, sorts each position's ids itself
(the codec then skips its own sort) and writes at ``IMPORT_COMPRESSION_LEVEL``. Each test pins
one of those against the plain way, on real SmolLM2 distributions when ``../shared/data`` has
them (else synthetic ones of the same shapes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import logitcache.transform.importer as importer
from logitcache.cli import cli
from logitcache.format.targets import TopKTargets
from logitcache.format.topk import TopKCodec
from logitcache.report import verify_cache
from logitcache.store import CacheReader
from logitcache.transform.importer import IMPORT_COMPRESSION_LEVEL, ImportConfig, import_cache
from logitcache.transform.layouts import Layout

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "smollm2_pydoc_top256.npz"
VOCAB = 49152
K = 12
ROWS = 14


def _positions(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """[n, 20] ids and full-vocabulary log-probs (float32), real when available."""
    if DATA.exists():
        d = np.load(DATA)
        ids = d["topk_ids"][:n, :20].astype(np.int64)
        lp = d["topk_logits"][:n, :20] - d["logsumexp"][:n, None]
        return ids, lp.astype(np.float32)
    z = rng.standard_normal((n, 512)) * 3
    lp_all = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    ids = np.argsort(-lp_all, axis=1)[:, :20]
    return ids, np.take_along_axis(lp_all, ids, axis=1).astype(np.float32)


@pytest.fixture(scope="module")
def ragged_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Rows of 3..40 tokens, positions holding 0..20 entries (some padded with -inf), a loss
    mask, and bad rows: an id outside the vocabulary, a NaN, a repeated id, a sum above one."""
    rng = np.random.default_rng(3)
    lengths = rng.integers(3, 41, ROWS)
    lengths[0] = 3  # the first row is the shortest: seq_len must come from the whole read batch
    ids, lp = _positions(int(lengths.sum()), rng)
    widths = rng.integers(K - 2, 21, len(ids))
    widths[5] = 0
    lp[7, 17:] = -np.inf
    off = np.concatenate([[0], np.cumsum(lengths)])
    ids[off[2] + 1, 0] = VOCAB + 3
    lp[off[4], 1] = np.nan
    ids[off[6] + 2, 3] = ids[off[6] + 2, 0]
    lp[off[9] + 1, :] = 0.0

    def nested(a: np.ndarray, typ: pa.DataType) -> pa.Array:
        rows = [
            [a[i, : widths[i]].tolist() for i in range(off[r], off[r + 1])] for r in range(ROWS)
        ]
        return pa.array(rows, pa.list_(pa.list_(typ)))

    table = pa.table(
        {
            "input_ids": [rng.integers(0, VOCAB, n).tolist() for n in lengths],
            "target_token_ids": nested(ids, pa.int32()),
            "target_logprobs": nested(lp, pa.float32()),
            "target_mask": [(rng.random(n) > 0.2).astype(np.uint8).tolist() for n in lengths],
        }
    )
    path = tmp_path_factory.mktemp("src") / "ragged.parquet"
    pq.write_table(table, path, row_group_size=5)
    return path


def _import(src: Path, out: Path, **kw: Any) -> Any:
    config = ImportConfig(
        str(src), str(out), layout="axolotl", vocab_size=VOCAB, skip_bad_rows=True, **kw
    )
    return import_cache(config)


def _decoded(url: str) -> dict[str, np.ndarray]:
    rows = list(CacheReader(url).iter_rows())
    targets = [r.targets for r in rows]
    assert all(isinstance(t, TopKTargets) for t in targets)
    return {
        "row_id": np.concatenate([r.row_id for r in rows]),
        "input_ids": np.concatenate([r.input_ids for r in rows]),
        "loss_mask": np.concatenate([r.loss_mask for r in rows]),
        "ids": np.concatenate([t.ids for t in targets]),  # type: ignore[union-attr]
        "logprobs": np.concatenate([t.logprobs for t in targets]),  # type: ignore[union-attr]
        "tail": np.concatenate([t.tail_logprob for t in targets]),  # type: ignore[union-attr]
    }


@pytest.mark.parametrize("values", ["sqrt", "float32"])
def test_pieces_of_one_row_give_the_cache_of_one_piece(
    tmp_path: Path, ragged_source: Path, monkeypatch: pytest.MonkeyPatch, values: str
) -> None:
    whole = _import(ragged_source, tmp_path / "whole", values=values, k=K)
    monkeypatch.setattr(importer, "_CHUNK_BYTES", 1)  # every piece one row
    pieces = _import(ragged_source, tmp_path / "pieces", values=values, k=K)
    assert whole.skipped_rows == pieces.skipped_rows == 4
    assert whole.manifest.content_digest == pieces.manifest.content_digest
    a, b = _decoded(str(tmp_path / "whole")), _decoded(str(tmp_path / "pieces"))
    for name in a:
        assert np.array_equal(a[name], b[name]), name
    assert verify_cache(str(tmp_path / "pieces")).rows == ROWS - 4


def test_seq_len_and_k_come_from_the_first_read_batch(
    tmp_path: Path, ragged_source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Row 0 is 3 tokens long: with one-row pieces, taking the first *piece* would refuse the
    longer rows that follow; the whole first read batch (here all rows) sets the shape."""
    monkeypatch.setattr(importer, "_CHUNK_BYTES", 1)
    res = _import(ragged_source, tmp_path / "c")
    table = pq.read_table(ragged_source)
    lengths = [len(x) for x in table.column("input_ids").to_pylist()]
    widths = [len(p) for row in table.column("target_token_ids").to_pylist() for p in row]
    assert res.manifest.seq_len == max(lengths) and res.manifest.targets.k == max(widths)


def test_padding_entries_keep_no_id(tmp_path: Path) -> None:
    """A position padded with id -1 (or past the vocabulary) at log-prob -inf is padding, not an
    id outside the vocabulary: it imports (it used to reach the codec and fail there)."""
    rng = np.random.default_rng(0)
    ids, lp = _positions(10, rng)
    ids, lp = ids[:, :4].copy(), lp[:, :4].copy()
    ids[:, 3], lp[:, 3] = -1, -np.inf
    ids[2, 2], lp[2, 2] = VOCAB + 10, -np.inf
    table = pa.table(
        {
            "input_ids": [list(range(10))],
            "target_token_ids": pa.array([ids.tolist()], pa.list_(pa.list_(pa.int64()))),
            "target_logprobs": pa.array([lp.tolist()], pa.list_(pa.list_(pa.float32()))),
        }
    )
    src = tmp_path / "padded.parquet"
    pq.write_table(table, src)
    out = tmp_path / "c"
    layout = Layout(ids="target_token_ids", values="target_logprobs")
    import_cache(
        ImportConfig(str(src), str(out), layout=layout, vocab_size=VOCAB, values="float32")
    )
    got = _decoded(str(out))
    finite = np.isfinite(got["logprobs"])
    assert finite.sum(axis=1).tolist() == [3, 3, 2] + [3] * 7
    assert np.all(got["ids"][finite] >= 0)
    want = np.sort(np.where(np.isfinite(lp), ids, -1), axis=1)
    assert np.array_equal(np.sort(np.where(finite, got["ids"], -1), axis=1), want)


def test_sorted_ids_from_the_import_encode_to_the_codec_own_bytes() -> None:
    """The import hands the codec ids sorted per position and the codec then skips its sort;
    the bytes must be those of encoding the unsorted targets, and those of the stable argsort
    the codec used before (hi-delta and delta layouts, sqrt and float values, repeated ids)."""
    rng = np.random.default_rng(1)
    for trial in range(40):
        p, k = int(rng.integers(1, 60)), int(rng.integers(1, 40))
        vocab = int(rng.choice([300, VOCAB, 1 << 20]))
        ids = rng.integers(0, vocab, (p, k)).astype(np.int32)
        if trial % 3 == 0 and k > 1:
            ids[:, 1] = ids[:, 0]  # repeats: the stable order must hold among equal ids
        probs = rng.dirichlet(np.ones(k + 1), size=p)
        lp = np.log(probs).astype(np.float32)
        unsorted = TopKTargets(ids, lp[:, :k].copy(), lp[:, k].copy(), np.zeros((p, 0), np.float32))
        order = np.argsort(ids, axis=1, kind="stable")
        presorted = TopKTargets(
            np.take_along_axis(ids, order, axis=1),
            np.take_along_axis(unsorted.logprobs, order, axis=1),
            unsorted.tail_logprob,
            unsorted.temperature_lognorm,
        )
        for layout in ("hi-delta", "delta"):
            for values in ("sqrt", "float16"):
                codec = TopKCodec(k=k, vocab_size=vocab, values=values, id_layout=layout)
                a, b = codec.encode(unsorted), codec.encode(presorted)
                assert a.keys() == b.keys()
                for name in a:
                    assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name])


def test_import_zstd_level_default_and_flag(tmp_path: Path, ragged_source: Path) -> None:
    res = _import(ragged_source, tmp_path / "default")
    assert IMPORT_COMPRESSION_LEVEL < 15  # the dump's level is not the import's
    assert res.manifest.to_dict()["compression"] == {
        "name": "zstd",
        "level": IMPORT_COMPRESSION_LEVEL,
    }
    out = tmp_path / "nine"
    r = CliRunner().invoke(
        cli,
        ["import", str(ragged_source), "--out", str(out), "--layout", "axolotl", "--vocab-size",
         str(VOCAB), "--skip-bad-rows", "--zstd-level", "9"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    manifest = CacheReader(str(out)).manifest
    assert manifest.to_dict()["compression"] == {"name": "zstd", "level": 9}
    a, b = _decoded(str(tmp_path / "default")), _decoded(str(out))  # same content, other bytes
    assert all(np.array_equal(a[name], b[name]) for name in a)
    r = CliRunner().invoke(cli, ["import", "--help"])
    assert "--zstd-level" in r.output and "--compression-level" in r.output
