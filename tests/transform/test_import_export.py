"""``logitcache import`` / ``export``: published layouts into caches and back.

Sources are Parquet/JSONL files written here in each preset's layout from real SmolLM2
distributions (../shared/data) when available, else from synthetic peaked distributions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from logitcache.cli import cli
from logitcache.errors import ConfigError, InputError
from logitcache.format.targets import TopKTargets
from logitcache.report import verify_cache
from logitcache.store import CacheReader
from logitcache.train.student import check_loss_fits
from logitcache.transform.exporter import export_cache
from logitcache.transform.importer import ImportConfig, import_cache
from logitcache.transform.layouts import Layout

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "smollm2_pydoc_top256.npz"
VOCAB = 49152
K = 16
SEQ = 24
ROWS = 10


def _distributions(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[ROWS*SEQ, K] ids, full-vocabulary log-probs and logits of the top K, real if we can."""
    n = ROWS * SEQ
    if DATA.exists():
        d = np.load(DATA)
        ids = d["topk_ids"][:n, :K].astype(np.int64)
        logits = d["topk_logits"][:n, :K].astype(np.float64)
        lp = logits - d["logsumexp"][:n, None]
        return ids, lp, logits
    z = rng.standard_normal((n, 512)) * 3
    lp_all = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    ids = np.argsort(-lp_all, axis=1)[:, :K]
    return ids, np.take_along_axis(lp_all, ids, axis=1), np.take_along_axis(z, ids, axis=1)


@pytest.fixture(scope="module")
def dists() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    ids, lp, logits = _distributions(rng)
    tokens = rng.integers(0, VOCAB, size=(ROWS, SEQ))
    return {"ids": ids, "lp": lp, "logits": logits, "tokens": tokens}


def _nested(flat: np.ndarray, n_pos: int) -> list[list[list[Any]]]:
    return [flat[r * SEQ : r * SEQ + n_pos].tolist() for r in range(ROWS)]


def _write(path: Path, columns: dict[str, Any]) -> Path:
    if path.suffix == ".jsonl":
        with path.open("w") as f:
            for r in range(ROWS):
                f.write(json.dumps({c: v[r] for c, v in columns.items()}) + "\n")
    else:
        pq.write_table(pa.table(columns), path, row_group_size=4)
    return path


def _cache_targets(url: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids sorted, log-probs in the same order, tails) of every position of the cache."""
    ids, lps, tails = [], [], []
    for rows in CacheReader(url).iter_rows():
        t = rows.targets
        assert isinstance(t, TopKTargets)
        order = np.argsort(-t.logprobs, axis=1, kind="stable")
        ids.append(np.take_along_axis(t.ids, order, axis=1))
        lps.append(np.take_along_axis(t.logprobs, order, axis=1))
        tails.append(t.tail_logprob)
    return np.concatenate(ids), np.concatenate(lps), np.concatenate(tails)


def _check_values(url: str, dists: dict[str, Any], n_pos: int, renorm: bool) -> None:
    ids, lps, tails = _cache_targets(url)
    sel = np.concatenate([np.arange(r * SEQ, r * SEQ + n_pos) for r in range(ROWS)])
    want_lp = dists["lp"][sel]
    if renorm:
        want_lp = want_lp - np.log(np.exp(want_lp).sum(axis=1, keepdims=True))
    p_have, p_want = np.exp(lps), np.exp(want_lp)
    # imported with values="float32": exact up to float32 rounding
    assert np.abs(p_have - p_want).max() < 1e-6
    top = p_want > 0.05  # ties among tiny values may swap places
    assert np.array_equal(ids[top], dists["ids"][sel][top])
    if renorm:
        assert np.all(np.isneginf(tails))
    else:
        want_tail = 1 - p_want.sum(axis=1)
        assert np.abs(np.exp(tails) - want_tail).max() < 1e-5


@pytest.mark.parametrize("fmt", [".parquet", ".jsonl"])
def test_axolotl_and_rlve_style_logprobs_import_exactly(
    tmp_path: Path, dists: dict[str, Any], fmt: str
) -> None:
    n_pos = SEQ - 1
    src = _write(
        tmp_path / f"src{fmt}",
        {
            "input_ids": dists["tokens"].tolist(),
            "topk_ids": _nested(dists["ids"], n_pos),
            "topk_logprobs": _nested(dists["lp"], n_pos),
        },
    )
    out = str(tmp_path / "cache")
    res = import_cache(
        ImportConfig(str(src), out, layout="rlve", vocab_size=VOCAB, values="float32")
    )
    assert res.rows == ROWS and res.positions == ROWS * n_pos
    m = CacheReader(out).manifest
    assert m.targets.tail == "bucket" and m.targets.k == K and m.seq_len == SEQ
    assert verify_cache(out).rows == ROWS
    _check_values(out, dists, n_pos, renorm=False)


def test_arcee_logits_are_renormalised_and_tail_marked_unknown(
    tmp_path: Path, dists: dict[str, Any]
) -> None:
    src = _write(
        tmp_path / "arcee.parquet",
        {
            "input_ids": dists["tokens"].tolist(),
            "token_ids": _nested(dists["ids"], SEQ),
            "top_values": _nested(dists["logits"], SEQ),
        },
    )
    out = str(tmp_path / "cache")
    import_cache(ImportConfig(str(src), out, layout="arcee", vocab_size=VOCAB, values="float32"))
    manifest = CacheReader(out).manifest
    assert manifest.targets.tail == "unknown"
    _check_values(out, dists, SEQ, renorm=True)
    # the tail-bucket losses refuse it, naming the loss that works; kl-renorm and hard labels pass
    with pytest.raises(ConfigError, match="use --loss kl-renorm"):
        check_loss_fits(manifest, "kl", 0.0, "cache x")
    check_loss_fits(manifest, "kl-renorm", 0.0, "cache x")
    check_loss_fits(manifest, "kl", 1.0, "cache x")


def test_llamakd_pairs_and_vllm_records(tmp_path: Path, dists: dict[str, Any]) -> None:
    pairs = [
        [[dists["ids"][i].tolist(), dists["lp"][i].tolist()] for i in range(r * SEQ, (r + 1) * SEQ)]
        for r in range(ROWS)
    ]
    src = _write(tmp_path / "kd.parquet", {"input_ids": dists["tokens"].tolist(), "targets": pairs})
    layout = Layout(pairs="targets", value_kind="logprob", normalized=True)
    out = str(tmp_path / "kd")
    import_cache(ImportConfig(str(src), out, layout=layout, vocab_size=VOCAB, values="float32"))
    _check_values(out, dists, SEQ, renorm=False)

    records = [
        [
            [{"token": f"token_id:{t}", "logprob": v} for t, v in zip(ids_, lps_, strict=True)]
            for ids_, lps_ in zip(
                dists["ids"][r * SEQ : (r + 1) * SEQ].tolist(),
                dists["lp"][r * SEQ : (r + 1) * SEQ].tolist(),
                strict=True,
            )
        ]
        for r in range(ROWS)
    ]
    src2 = _write(
        tmp_path / "vllm.jsonl", {"input_ids": dists["tokens"].tolist(), "logprobs": records}
    )
    out2 = str(tmp_path / "vllm")
    import_cache(ImportConfig(str(src2), out2, layout="vllm", vocab_size=VOCAB, values="float32"))
    _check_values(out2, dists, SEQ, renorm=False)


def test_roundtrip_export_import(tmp_path: Path, dists: dict[str, Any]) -> None:
    n_pos = SEQ - 1
    src = _write(
        tmp_path / "src.parquet",
        {
            "input_ids": dists["tokens"].tolist(),
            "topk_ids": _nested(dists["ids"], n_pos),
            "topk_logprobs": _nested(dists["lp"], n_pos),
        },
    )
    first = str(tmp_path / "first")
    import_cache(ImportConfig(str(src), first, layout="rlve", vocab_size=VOCAB))
    for layout in ("plain", "axolotl"):
        exported = tmp_path / f"export-{layout}"
        res = export_cache(first, str(exported), layout=layout)  # type: ignore[arg-type]
        assert res.rows == ROWS and (exported / "README.md").exists()
        meta = pq.ParquetFile(exported / "part-00000.parquet").schema_arrow.metadata
        ident = json.loads(meta[b"logitcache.cache"])
        assert ident["content_digest"] == CacheReader(first).manifest.content_digest
        again = str(tmp_path / f"again-{layout}")
        import_cache(ImportConfig(str(exported), again, layout=layout, vocab_size=VOCAB))
        a_ids, a_lp, a_tail = _cache_targets(first)
        b_ids, b_lp, b_tail = _cache_targets(again)
        assert np.array_equal(a_ids, b_ids)
        # re-quantising decoded sqrt values: each sqrt(p) moves by at most half a level
        levels = CacheReader(first).manifest.codec.to_dict()["levels"]
        assert np.abs(np.sqrt(np.exp(a_lp)) - np.sqrt(np.exp(b_lp))).max() <= 1 / levels
        if layout == "plain":
            assert np.abs(np.sqrt(np.exp(a_tail)) - np.sqrt(np.exp(b_tail))).max() <= 1 / levels


def test_bad_rows_are_named_or_skipped(tmp_path: Path, dists: dict[str, Any]) -> None:
    ids = _nested(dists["ids"], SEQ)
    lps = _nested(dists["lp"], SEQ)
    ids[3][5][0] = VOCAB + 7  # outside the vocabulary
    lps[6][2] = [0.0] * K  # probabilities summing to K
    lps[8][1][0] = float("nan")
    src = _write(
        tmp_path / "bad.parquet",
        {"input_ids": dists["tokens"].tolist(), "topk_ids": ids, "topk_logprobs": lps},
    )
    out = str(tmp_path / "cache")
    with pytest.raises(InputError, match=r"source row 3, column 'topk_ids'.*vocabulary"):
        import_cache(ImportConfig(str(src), out, layout="rlve", vocab_size=VOCAB))
    res = import_cache(
        ImportConfig(str(src), out, layout="rlve", vocab_size=VOCAB, skip_bad_rows=True)
    )
    assert res.skipped_rows == 3 and res.rows == ROWS - 3
    kept = [int(r) for rows in CacheReader(out).iter_rows() for r in rows.row_id]
    assert kept == [0, 1, 2, 4, 5, 7, 9]


def test_killed_import_resumes_to_the_same_cache(tmp_path: Path, dists: dict[str, Any]) -> None:
    src = _write(
        tmp_path / "src.parquet",
        {
            "input_ids": dists["tokens"].tolist(),
            "topk_ids": _nested(dists["ids"], SEQ),
            "topk_logprobs": _nested(dists["lp"], SEQ),
        },
    )
    kw: dict[str, Any] = dict(layout="rlve", vocab_size=VOCAB, shard_bytes=2000)
    full = str(tmp_path / "full")
    import_cache(ImportConfig(str(src), full, **kw))

    class Killed(Exception):
        pass

    def kill_after_first_batches(rows: int) -> None:
        if rows >= 8:
            raise Killed

    cut = str(tmp_path / "cut")
    with pytest.raises(Killed):
        import_cache(ImportConfig(str(src), cut, **kw), progress=kill_after_first_batches)
    assert not (Path(cut) / "manifest.json").exists()
    res = import_cache(ImportConfig(str(src), cut, resume=True, **kw))
    assert res.resumed_rows > 0
    a, b = CacheReader(full).manifest, CacheReader(cut).manifest
    assert [s.to_dict()["files"] for s in a.shards] == [s.to_dict()["files"] for s in b.shards]


def test_refusals_are_clear(tmp_path: Path, dists: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="vocabulary"):
        ImportConfig("x.parquet", str(tmp_path / "o"))
    with pytest.raises(ConfigError, match="names its targets once"):
        Layout(ids="a")
    src = _write(tmp_path / "s.parquet", {"input_ids": dists["tokens"].tolist()})
    with pytest.raises(InputError, match=r"no column\(s\) \['token_ids', 'top_values'\]"):
        import_cache(ImportConfig(str(src), str(tmp_path / "o"), layout="arcee", vocab_size=9))


def test_cli_import_then_export(tmp_path: Path, dists: dict[str, Any]) -> None:
    src = _write(
        tmp_path / "src.parquet",
        {
            "input_ids": dists["tokens"].tolist(),
            "token_ids": _nested(dists["ids"], SEQ),
            "top_values": _nested(dists["logits"], SEQ),
        },
    )
    out = tmp_path / "cache"
    r = CliRunner().invoke(
        cli,
        ["import", str(src), "--out", str(out), "--layout", "arcee", "--vocab-size", str(VOCAB),
         "--teacher", "arcee-405b"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "bytes/token" in r.output and CacheReader(str(out)).manifest.teacher.name == "arcee-405b"
    r = CliRunner().invoke(cli, ["export", str(out), "--out", str(tmp_path / "e")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["import", str(src), "--out", str(tmp_path / "x")])
    assert r.exit_code == 1 and r.output.startswith("error:") and "Traceback" not in r.output
