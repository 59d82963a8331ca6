"""Writer/reader round trips on both backends, resume, parts, and every kind of damage."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from synth import sampled_targets, topk_targets

from logitcache.errors import (
    CacheCorruptError,
    CacheIncompleteError,
    CacheNotFoundError,
    ChecksumMismatchError,
    CodecError,
    ConfigError,
    FormatVersionError,
    ManifestError,
    ShardMissingError,
    UnsafePathError,
    WriterError,
)
from logitcache.format import SampledCodec, TopKCodec
from logitcache.format.manifest import SourceInfo, TargetsInfo, content_digest
from logitcache.report import verify_cache
from logitcache.store import CacheHeader, CacheReader, CacheWriter, check_output, finalize_cache

BACKENDS = ["zarr", "arrow"]


def header(
    backend: str, k: int = 4, vocab: int = 50, seq_len: int = 8, **kw: object
) -> CacheHeader:
    values = str(kw.pop("values", "float32"))
    return CacheHeader(
        codec=TopKCodec(k=k, vocab_size=vocab, values=values),
        targets=TargetsInfo(method="topk", k=k),
        seq_len=seq_len,
        vocab_size=vocab,
        padded_vocab_size=vocab + 14,
        backend=backend,  # type: ignore[arg-type]
        teacher=SourceInfo(name="tiny", fingerprint="ab" * 32),
        **kw,  # type: ignore[arg-type]
    )


def make_batches(seed: int, n_batches: int, rows: int, seq_len: int, k: int, vocab: int):
    rng = np.random.default_rng(seed)
    out = []
    for b in range(n_batches):
        ids = rng.integers(0, vocab, (rows, seq_len))
        mask = rng.random((rows, seq_len)) > 0.3
        t = topk_targets(rng, int(mask.sum()), k, vocab)
        out.append((np.arange(b * rows, (b + 1) * rows) + 1000, ids, mask, t))
    return out


def write_cache(url: str, hdr: CacheHeader, batches, shard_bytes: int = 1500, **kw) -> None:
    with CacheWriter(url, hdr, shard_bytes=shard_bytes, **kw) as w:
        for rid, ids, mask, t in batches:
            w.write(rid, ids, mask, t)


def shard_file(cache: Path, reader_or_none=None) -> Path:
    """The biggest data file of the first shard (the one worth damaging)."""
    m = json.loads((cache / "manifest.json").read_text())
    files = m["shards"][0]["files"]
    return cache / max(files, key=lambda f: f["bytes"])["path"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_round_trip_many_shards(tmp_path: Path, backend: str) -> None:
    batches = make_batches(0, 6, 3, 8, 4, 50)
    url = str(tmp_path / "c")
    write_cache(url, header(backend), batches)
    r = CacheReader(url)
    assert r.num_rows == 18 and r.num_shards > 2
    rows = r.read_rows(0, 18)  # spans every shard
    assert np.array_equal(rows.row_id, np.concatenate([b[0] for b in batches]))
    assert np.array_equal(rows.input_ids, np.concatenate([b[1] for b in batches]))
    assert np.array_equal(rows.loss_mask, np.concatenate([b[2] for b in batches]))
    want_ids = np.concatenate([b[3].ids for b in batches])
    want_lp = np.concatenate([b[3].logprobs for b in batches])
    # the codec sorts ids within a position; compare as id -> logprob maps
    order = np.argsort(want_ids, axis=1)
    assert np.array_equal(rows.targets.ids, np.take_along_axis(want_ids, order, 1))
    assert np.array_equal(rows.targets.logprobs, np.take_along_axis(want_lp, order, 1))
    # sequential iteration equals random access
    it = list(r.iter_rows(batch_rows=2))
    assert np.array_equal(np.concatenate([x.row_id for x in it]), rows.row_id)
    # addressing by (row id, position)
    rid, pos = 1007, int(np.flatnonzero(batches[2][2][1])[0])
    one = r.targets_at(rid, pos)
    j = r.find(rid)
    p = int(rows.position_offsets[j]) + int(rows.loss_mask[j, :pos].sum())
    assert one is not None and np.array_equal(one.ids[0], rows.targets.ids[p])
    masked = np.flatnonzero(~batches[2][2][1])
    if masked.size:
        assert r.targets_at(rid, int(masked[0])) is None
    assert verify_cache(url).rows == 18


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampled_round_trip(tmp_path: Path, backend: str) -> None:
    rng = np.random.default_rng(1)
    hdr = CacheHeader(
        codec=SampledCodec(samples=20, vocab_size=60),
        targets=TargetsInfo(method="sampled", samples=20, tail="none"),
        seq_len=5,
        vocab_size=60,
        padded_vocab_size=64,
        backend=backend,  # type: ignore[arg-type]
    )
    batches = []
    for b in range(4):
        mask = rng.random((3, 5)) > 0.4
        batches.append(
            (
                np.arange(3) + 3 * b,
                rng.integers(0, 60, (3, 5)),
                mask,
                sampled_targets(rng, int(mask.sum()), 20, 60, with_logprobs=False),
            )
        )
    url = str(tmp_path / "s")
    write_cache(url, hdr, batches, shard_bytes=400)
    r = CacheReader(url)
    assert r.num_shards > 1
    t = r.read_rows(0, 12).targets
    assert np.array_equal(t.num_unique, np.concatenate([b[3].num_unique for b in batches]))
    assert np.array_equal(t.ids, np.concatenate([b[3].ids for b in batches]))
    assert np.array_equal(t.counts, np.concatenate([b[3].counts for b in batches]))
    # a run of rows in the middle carries exactly its entries
    mid = r.read_rows(4, 9).targets
    off = np.concatenate([[0], np.cumsum([b[2].sum() for b in batches])])
    assert mid.num_positions == int(r.read_rows(4, 9).loss_mask.sum())
    assert off[-1] == t.num_positions
    assert verify_cache(url).shards == r.num_shards


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    backend=st.sampled_from(BACKENDS),
    seq_len=st.integers(1, 6),
    rows=st.integers(0, 4),
    vocab=st.sampled_from([3, 17, 262_144]),
    k=st.integers(1, 3),
    mask_p=st.sampled_from([0.0, 0.5, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_round_trip_odd_shapes(
    tmp_path_factory: pytest.TempPathFactory,
    backend: str,
    seq_len: int,
    rows: int,
    vocab: int,
    k: int,
    mask_p: float,
    seed: int,
) -> None:
    rng = np.random.default_rng(seed)
    k = min(k, vocab)
    url = str(tmp_path_factory.mktemp("h") / "c")
    mask = rng.random((rows, seq_len)) < mask_p
    p = int(mask.sum())
    if vocab > 1000:  # large vocab: ids near the top, built without a dense softmax
        top = np.arange(vocab - 64, vocab)
        ids = np.zeros((p, k), int)
        for i in range(p):
            ids[i] = rng.choice(top, k, replace=False)
        lp = np.log(np.full((p, k), 0.9 / k))
        from logitcache.format.targets import TopKTargets

        t = TopKTargets(
            ids.astype(np.int32),
            lp.astype(np.float32),
            np.full(p, np.log(0.1), np.float32),
            np.zeros((p, 0), np.float32),
        )
    else:
        t = topk_targets(rng, p, k, vocab)
    hdr = header(backend, k=k, vocab=vocab, seq_len=seq_len)
    input_ids = rng.integers(0, vocab, (rows, seq_len))
    write_cache(url, hdr, [(np.arange(rows), input_ids, mask, t)])
    r = CacheReader(url)
    got = r.read_rows(0, rows)
    assert np.array_equal(got.input_ids, input_ids) and np.array_equal(got.loss_mask, mask)
    order = np.argsort(t.ids, axis=1)
    assert np.array_equal(got.targets.ids, np.take_along_axis(t.ids, order, 1))
    assert np.array_equal(got.targets.logprobs, np.take_along_axis(t.logprobs, order, 1))
    assert np.array_equal(got.targets.tail_logprob, t.tail_logprob)


@settings(
    max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    backend=st.sampled_from(BACKENDS),
    seq_len=st.integers(1, 5),
    rows=st.integers(0, 4),
    vocab=st.sampled_from([3, 17, 262_144]),
    n=st.integers(1, 40),
    mask_p=st.sampled_from([0.0, 0.5, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_sampled_round_trip_odd_shapes(
    tmp_path_factory: pytest.TempPathFactory,
    backend: str,
    seq_len: int,
    rows: int,
    vocab: int,
    n: int,
    mask_p: float,
    seed: int,
) -> None:
    rng = np.random.default_rng(seed)
    url = str(tmp_path_factory.mktemp("s") / "c")
    mask = rng.random((rows, seq_len)) < mask_p
    t = sampled_targets(rng, int(mask.sum()), n, vocab, with_logprobs=False)
    hdr = CacheHeader(
        codec=SampledCodec(samples=n, vocab_size=vocab),
        targets=TargetsInfo(method="sampled", samples=n, tail="none"),
        seq_len=seq_len,
        vocab_size=vocab,
        padded_vocab_size=vocab,
        backend=backend,  # type: ignore[arg-type]
    )
    write_cache(url, hdr, [(np.arange(rows), rng.integers(0, vocab, (rows, seq_len)), mask, t)])
    got = CacheReader(url).read_rows(0, rows).targets
    assert np.array_equal(got.num_unique, t.num_unique)
    assert np.array_equal(got.ids, t.ids) and np.array_equal(got.counts, t.counts)


def test_memory_url() -> None:
    url = "memory://logitcache-test/cache"
    write_cache(url, header("zarr"), make_batches(2, 2, 2, 8, 4, 50), overwrite=True)
    assert CacheReader(url).num_rows == 4


# -- failure and damage ------------------------------------------------------------------------


@pytest.fixture(params=BACKENDS)
def cache(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    url = tmp_path / "c"
    write_cache(str(url), header(request.param), make_batches(3, 4, 3, 8, 4, 50))
    return url


def test_flipped_byte_is_named(cache: Path) -> None:
    f = shard_file(cache)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x40
    f.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError, match=r"shard shards/00000\.\w+: file .* checksum"):
        CacheReader(str(cache)).read_rows(0, 1)
    with pytest.raises(CacheCorruptError, match=r"shards/00000"):
        verify_cache(str(cache))


def test_flipped_byte_without_verification_is_still_caught_on_zarr(tmp_path: Path) -> None:
    url = tmp_path / "c"
    write_cache(str(url), header("zarr"), make_batches(3, 4, 3, 8, 4, 50))
    f = shard_file(url)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x40
    f.write_bytes(bytes(data))
    # sizes still match, sha256 not checked: the file's CRC-32C catches it
    with pytest.raises(ChecksumMismatchError, match=r"shards/00000.zarr: file .* CRC-32C"):
        CacheReader(str(url), verify=False).read_rows(0, 1)
    _edit_manifest(url, _without_crc32c)
    # ... and in a cache from before format 1.2, the decoders' own checks
    with pytest.raises(CacheCorruptError, match=r"shards/00000.zarr: cannot decode"):
        CacheReader(str(url), verify=False).read_rows(0, 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_bug_in_our_decoder_is_not_reported_as_damage(
    tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the decoders' own errors mean damaged bytes; ours keep their type and traceback."""
    from logitcache.store import _arrow, _zarr

    url = tmp_path / "c"
    write_cache(str(url), header(backend), make_batches(3, 2, 3, 8, 4, 50))

    def bug(*args: object, **kw: object) -> None:
        raise TypeError("a bug in our decoder")

    monkeypatch.setattr(_zarr, "_fast_layout", bug)
    monkeypatch.setattr(_arrow, "_check_schema", bug)
    with pytest.raises(TypeError, match="a bug in our decoder"):
        CacheReader(str(url)).read_rows(0, 1)


def test_truncated_shard(cache: Path) -> None:
    f = shard_file(cache)
    f.write_bytes(f.read_bytes()[:-7])
    with pytest.raises(ChecksumMismatchError, match="bytes but the manifest says"):
        CacheReader(str(cache), verify=False).read_rows(0, 1)


def test_deleted_shard(cache: Path) -> None:
    f = shard_file(cache)
    if f.is_file() and f.suffix == ".arrow":
        f.unlink()
    else:
        shutil.rmtree(cache / "shards" / "00000.zarr")
    with pytest.raises(ShardMissingError, match=r"shards/00000.*missing"):
        CacheReader(str(cache)).read_rows(0, 1)


def test_deleted_manifest_reads_as_incomplete(cache: Path) -> None:
    (cache / "manifest.json").unlink()
    with pytest.raises(CacheIncompleteError, match="incomplete cache"):
        CacheReader(str(cache))


def test_missing_cache(tmp_path: Path) -> None:
    with pytest.raises(CacheNotFoundError, match="does not exist"):
        CacheReader(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CacheNotFoundError, match=r"manifest\.json is missing"):
        CacheReader(str(tmp_path / "empty"))


def test_corrupt_manifest_json(cache: Path) -> None:
    m = cache / "manifest.json"
    m.write_text(m.read_text()[:-40])
    with pytest.raises(ManifestError, match="not valid JSON"):
        CacheReader(str(cache))


def _edit_manifest(cache: Path, fn, rehash: bool = False) -> None:
    """Edit manifest.json with ``fn``; ``rehash``: also store the edited content's digest, as a
    faulty tool would (only the cross-field checks can catch those edits)."""
    m = cache / "manifest.json"
    d = json.loads(m.read_text())
    fn(d)
    if rehash and "content_digest" in d:
        d["content_digest"] = content_digest(d)
    m.write_text(json.dumps(d))


@pytest.mark.parametrize("bad", ["../outside.zarr", "/etc/passwd", "shards/../../x", "s3://b/x"])
def test_unsafe_paths_refused(cache: Path, bad: str) -> None:
    def edit(d: dict) -> None:
        d["shards"][0]["files"][0]["path"] = bad

    _edit_manifest(cache, edit, rehash=True)
    with pytest.raises(UnsafePathError, match="not a plain relative path"):
        CacheReader(str(cache))


def test_unknown_major_version_refused(cache: Path) -> None:
    _edit_manifest(cache, lambda d: d.update(format_version="2.0"))
    with pytest.raises(FormatVersionError, match=r"format version 2.0 is not readable"):
        CacheReader(str(cache))


def test_newer_minor_version_with_extra_fields_reads(cache: Path) -> None:
    _edit_manifest(cache, lambda d: d.update(format_version="1.9", future_field={"x": 1}))
    assert CacheReader(str(cache)).num_rows == 12


def test_manifest_row_counts_must_agree(cache: Path) -> None:
    _edit_manifest(cache, lambda d: d.update(num_rows=999))
    with pytest.raises(ManifestError, match="num_rows: says 999"):
        CacheReader(str(cache))


def test_shard_rows_disagreeing_with_manifest(cache: Path) -> None:
    def edit(d: dict) -> None:
        d["shards"][0]["rows"] += 1
        d.pop("num_rows")

    _edit_manifest(cache, edit, rehash=True)
    with pytest.raises(CacheCorruptError, match=r"shards/00000.*manifest says"):
        CacheReader(str(cache)).read_rows(0, 1)


# -- writer protocol ------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_interrupted_writer_leaves_no_manifest_and_resume_is_identical(
    tmp_path: Path, backend: str
) -> None:
    batches = make_batches(4, 8, 3, 8, 4, 50)
    hdr = header(backend)
    straight = tmp_path / "straight"
    write_cache(str(straight), hdr, batches)

    broken = tmp_path / "broken"
    with (
        pytest.raises(RuntimeError, match="boom") as exc,
        CacheWriter(str(broken), hdr, shard_bytes=1500) as w,
    ):
        for i, (rid, ids, mask, t) in enumerate(batches):
            if i == 5:
                raise RuntimeError("boom")
            w.write(rid, ids, mask, t)
    assert any("NOT committed" in n for n in getattr(exc.value, "__notes__", []))
    assert not (broken / "manifest.json").exists()
    with pytest.raises(CacheIncompleteError):
        CacheReader(str(broken))
    with pytest.raises(CacheIncompleteError, match="--resume"):
        CacheWriter(str(broken), hdr, shard_bytes=1500)

    with CacheWriter(str(broken), hdr, shard_bytes=1500, resume=True) as w:
        done = w.resumed_rows
        assert 0 < done < 15
        rows = [np.concatenate(x) for x in zip(*[(b[0], b[1], b[2]) for b in batches], strict=True)]
        all_t = [b[3] for b in batches]
        # re-feed the stream from the first row not committed, in differently sized batches
        pos = np.concatenate([[0], np.cumsum([t.num_positions for t in all_t])])
        from logitcache.format.targets import TopKTargets

        cat = TopKTargets(
            *(
                np.concatenate([getattr(t, f) for t in all_t])
                for f in ("ids", "logprobs", "tail_logprob", "temperature_lognorm")
            )
        )
        pos_per_row = rows[2].sum(axis=1)
        row_pos = np.concatenate([[0], np.cumsum(pos_per_row)])
        for s in range(done, len(rows[0]), 5):
            e = min(s + 5, len(rows[0]))
            p0, p1 = row_pos[s], row_pos[e]
            w.write(
                rows[0][s:e],
                rows[1][s:e],
                rows[2][s:e],
                TopKTargets(
                    cat.ids[p0:p1],
                    cat.logprobs[p0:p1],
                    cat.tail_logprob[p0:p1],
                    cat.temperature_lognorm[p0:p1],
                ),
            )
        assert pos[-1] == row_pos[-1]
    a = json.loads((straight / "manifest.json").read_text())
    b = json.loads((broken / "manifest.json").read_text())
    assert [s["files"] for s in a["shards"]] == [s["files"] for s in b["shards"]]


def test_resume_refuses_changed_settings(tmp_path: Path) -> None:
    url = str(tmp_path / "c")
    with pytest.raises(RuntimeError), CacheWriter(url, header("zarr"), shard_bytes=1500) as w:
        for rid, ids, mask, t in make_batches(5, 3, 3, 8, 4, 50):
            w.write(rid, ids, mask, t)
        raise RuntimeError("crash")
    with pytest.raises(ConfigError, match=r"codec changed"):
        CacheWriter(url, header("zarr", values="float16"), shard_bytes=1500, resume=True)


def test_existing_cache_is_refused_then_overwritten(cache: Path) -> None:
    hdr = header(CacheReader(str(cache)).manifest.backend)
    with pytest.raises(WriterError, match="already holds a committed cache"):
        CacheWriter(str(cache), hdr)
    write_cache(str(cache), hdr, make_batches(9, 1, 2, 8, 4, 50), overwrite=True)
    assert CacheReader(str(cache)).num_rows == 2


def test_writer_validates_input(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    w = CacheWriter(str(tmp_path / "c"), header("zarr"))
    mask = np.ones((2, 8), bool)
    t = topk_targets(rng, 16, 4, 50)
    with pytest.raises(WriterError, match=r"input_ids must be \[rows=2, seq_len=8\]"):
        w.write(np.arange(2), np.zeros((2, 7), int), mask, t)
    with pytest.raises(WriterError, match="targets hold 16 positions but loss_mask selects 15"):
        m2 = mask.copy()
        m2[0, 0] = False
        w.write(np.arange(2), np.zeros((2, 8), int), m2, t)
    with pytest.raises(WriterError, match=r"input_ids must lie in \[0, 64\)"):
        w.write(np.arange(2), np.full((2, 8), 64), mask, t)
    bad = topk_targets(rng, 16, 4, 50)
    bad.ids[0, 0] = 50
    with pytest.raises(CodecError, match="50"):
        w.write(np.arange(2), np.zeros((2, 8), int), mask, bad)
    w.abort()
    assert not (tmp_path / "c" / "manifest.json").exists()


@pytest.mark.parametrize("backend", BACKENDS)
def test_parts_finalize_in_order(tmp_path: Path, backend: str) -> None:
    url = str(tmp_path / "c")
    hdr = header(backend)
    b0, b1 = make_batches(6, 2, 2, 8, 4, 50), make_batches(7, 3, 2, 8, 4, 50)
    write_cache(url, hdr, b1, part="rank00001")
    with pytest.raises(CacheIncompleteError, match="part 'rank00000' has not completed"):
        finalize_cache(url, ["rank00000", "rank00001"])
    with pytest.raises(CacheIncompleteError):
        CacheReader(url)
    write_cache(url, hdr, b0, part="rank00000")
    m = finalize_cache(url, ["rank00000", "rank00001"])
    assert m.num_rows == 10
    r = CacheReader(url)
    want = np.concatenate([b[0] for b in b0 + b1])
    assert np.array_equal(r.read_rows(0, 10).row_id, want)
    assert all(os.path.basename(s.path).startswith("rank0000") for s in m.shards)


def test_finalize_refuses_disagreeing_parts(tmp_path: Path) -> None:
    url = str(tmp_path / "c")
    write_cache(url, header("zarr"), make_batches(6, 1, 2, 8, 4, 50), part="a")
    write_cache(url, header("zarr", k=3), make_batches(6, 1, 2, 8, 3, 50), part="b")
    with pytest.raises(
        ConfigError, match=r"part 'b' differs from part 'a' in targets\.k \('a' has 4, 'b' has 3\)"
    ):
        finalize_cache(url, ["a", "b"])


def _crash(url: str, **kw: object) -> None:
    with pytest.raises(RuntimeError), CacheWriter(url, header("zarr"), shard_bytes=1500, **kw) as w:
        for rid, ids, mask, t in make_batches(5, 3, 3, 8, 4, 50):
            w.write(rid, ids, mask, t)
        raise RuntimeError("crash")


@pytest.mark.parametrize(
    ("state", "kw", "error", "message"),
    [
        ("committed", {}, WriterError, "already holds a committed cache"),
        ("unfinished", {}, CacheIncompleteError, "unfinished dump; pass resume=True"),
        ("unfinished-part", {"part": "r1"}, CacheIncompleteError, "unfinished dump by r1"),
        ("empty", {"overwrite": True, "resume": True}, ConfigError, "exclude each other"),
    ],
)
def test_check_output_and_the_writer_refuse_alike(
    tmp_path: Path, state: str, kw: dict, error: type, message: str
) -> None:
    """One implementation of the refusals: the early check and the writer say the same."""
    url = str(tmp_path / "c")
    if state == "committed":
        write_cache(url, header("zarr"), make_batches(1, 1, 2, 8, 4, 50))
    elif state == "unfinished":
        _crash(url)
    elif state == "unfinished-part":
        _crash(url, part="r1")
    with pytest.raises(error, match=message):
        check_output(url, **kw)
    with pytest.raises(error, match=message):
        CacheWriter(url, header("zarr"), shard_bytes=1500, **kw)


def test_zarr_fast_path_equals_zarr(tmp_path: Path) -> None:
    """Our direct decode of the sharded layout gives exactly what zarr itself reads."""
    import zarr

    from logitcache.store._zarr import _read_fast

    url = tmp_path / "c"
    # input_ids spans two ~1 MiB inner chunks, the first all zeros (zarr leaves it unwritten)
    rng = np.random.default_rng(11)
    rows, seq = 2100, 128
    input_ids = rng.integers(1, 50, (rows, seq))
    input_ids[:2048] = 0
    mask = np.zeros((rows, seq), bool)
    mask[2048:, :4] = True
    t = topk_targets(rng, int(mask.sum()), 8, 50)
    hdr = header("zarr", k=8, seq_len=seq, values="sqrt")
    write_cache(str(url), hdr, [(np.arange(rows), input_ids, mask, t)], shard_bytes=1 << 30)
    shard = url / "shards" / "00000.zarr"
    files = {str(p.relative_to(shard)): p.read_bytes() for p in shard.rglob("*") if p.is_file()}
    g = zarr.open_group(str(shard), mode="r")
    names = ["row_id", "input_ids", "loss_mask"]
    names += [f"targets/{s.name}" for s in hdr.codec.array_specs()]
    for name in names:
        fast = _read_fast(files, name)
        assert fast is not None, name
        assert np.array_equal(fast, g[name][...]), name
    # a damaged chunk index is caught by its crc32c
    assert (
        json.loads(files["input_ids/zarr.json"])["codecs"][0]["configuration"]["chunk_shape"][0]
        < rows
    )
    key = "loss_mask/c/0/0"
    blob = bytearray(files[key])
    blob[-10] ^= 0xFF
    with pytest.raises(CacheCorruptError, match=r"(?i)checksum|crc"):
        _read_fast({**files, key: bytes(blob)}, "loss_mask")


def test_one_spelling_for_encoded_arrays(cache: Path) -> None:
    """A shard as stored (EncodedRows) and rows as served (Rows) both call the codec's arrays
    ``encoded``; only Rows has decoded ``targets``."""
    from logitcache.store import EncodedRows, Rows

    r = CacheReader(str(cache))
    stored = r.load_shard(0)
    rows = r.read_rows(0, stored.num_rows)
    assert isinstance(stored, EncodedRows) and isinstance(rows, Rows)
    assert not hasattr(stored, "targets")
    for name, arr in stored.encoded.items():
        assert np.array_equal(rows.encoded[name], arr)
    assert rows.targets.num_positions == int(stored.loss_mask.sum())


def _stats(batches) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(42)
    return [(rng.random(b[3].num_positions), rng.random(b[3].num_positions) * 5) for b in batches]


def test_coverage_after_a_resume_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    """Rows buffered (not yet in a shard) when the writer died are counted once, not twice."""
    from logitcache.format.targets import TopKTargets

    batches = make_batches(4, 8, 3, 8, 4, 50)
    stats = _stats(batches)
    straight, broken = str(tmp_path / "straight"), str(tmp_path / "broken")
    with CacheWriter(straight, header("arrow"), shard_bytes=1500) as w:
        for (rid, ids, mask, t), (mass, ent) in zip(batches, stats, strict=True):
            w.write(rid, ids, mask, t, captured_mass=mass, entropy=ent)
    with pytest.raises(RuntimeError), CacheWriter(broken, header("arrow"), shard_bytes=1500) as w:
        for (rid, ids, mask, t), (mass, ent) in list(zip(batches, stats, strict=True))[:5]:
            w.write(rid, ids, mask, t, captured_mass=mass, entropy=ent)
        assert w.rows_written > sum(s.rows for s in w._shards)  # some rows only buffered
        raise RuntimeError("killed")
    # the stream again, from the first row not in a committed shard
    rid, ids, mask = (np.concatenate([b[i] for b in batches]) for i in range(3))
    mass, ent = (np.concatenate([s[i] for s in stats]) for i in range(2))
    cat = TopKTargets(
        *(
            np.concatenate([getattr(b[3], f) for b in batches])
            for f in ("ids", "logprobs", "tail_logprob", "temperature_lognorm")
        )
    )
    with CacheWriter(broken, header("arrow"), shard_bytes=1500, resume=True) as w:
        done = w.resumed_rows
        p0 = int(mask[:done].sum())
        w.write(
            rid[done:],
            ids[done:],
            mask[done:],
            TopKTargets(
                *(
                    a[p0:]
                    for a in (cat.ids, cat.logprobs, cat.tail_logprob, cat.temperature_lognorm)
                )
            ),
            captured_mass=mass[p0:],
            entropy=ent[p0:],
        )
    a, b = CacheReader(straight).manifest, CacheReader(broken).manifest
    assert b.coverage.positions == a.coverage.positions == a.num_positions
    assert b.coverage.captured_mass == pytest.approx(a.coverage.captured_mass, rel=1e-12)
    assert b.coverage.entropy == pytest.approx(a.coverage.entropy, rel=1e-12)
    assert a.coverage.captured_mass == pytest.approx(float(mass.mean()), rel=1e-12)
    verify_cache(broken)


def test_verify_checks_coverage_against_the_shards(cache: Path) -> None:
    verify_cache(str(cache))

    def double_count(d: dict) -> None:  # a 1.1 cache (no per-shard sums) resumed by the old bug
        for s in d["shards"]:
            s.pop("coverage")
        d.update(format_version="1.1", content_digest=None)
        d.pop("content_digest")
        d["coverage"]["positions"] = d["num_positions"] + 7

    _edit_manifest(cache, double_count)
    with pytest.raises(CacheCorruptError, match=r"coverage counts \d+ positions but the shards"):
        verify_cache(str(cache))


def test_coverage_that_disagrees_with_the_shard_records_is_refused(cache: Path) -> None:
    _edit_manifest(cache, lambda d: d["coverage"].update(positions=d["num_positions"] + 7))
    with pytest.raises(ManifestError, match=r"coverage\.positions: is \d+ but the shard records"):
        CacheReader(str(cache))


@pytest.mark.parametrize("content", [b"", b"{not json", b"[1, 2]"])
def test_an_old_unreadable_lock_is_stale(tmp_path: Path, content: bytes) -> None:
    """A kill between creating the lock and writing it must not block every later run."""
    from logitcache.errors import CacheLockedError

    url = tmp_path / "c"
    lock = url / "_locks" / "main.json"
    lock.parent.mkdir(parents=True)
    lock.write_bytes(content)
    with pytest.raises(CacheLockedError, match="being written by another dump"):
        CacheWriter(str(url), header("zarr"))  # fresh: it may be being written right now
    old = lock.stat().st_mtime - 60
    os.utime(lock, (old, old))
    write_cache(str(url), header("zarr"), make_batches(1, 1, 2, 8, 4, 50))
    assert CacheReader(str(url)).num_rows == 2 and not lock.exists()


def test_damage_without_verification_never_decodes_to_wrong_numbers(tmp_path: Path) -> None:
    """verify=False skips the sha256, not the per-file CRC-32C: byte flips anywhere in an Arrow
    shard and two same-size Zarr chunk objects swapped between shards are refused."""
    arrow, zarr_url = tmp_path / "a", tmp_path / "z"
    write_cache(str(arrow), header("arrow"), make_batches(3, 4, 3, 8, 4, 50))
    f = shard_file(arrow)
    clean = f.read_bytes()
    for at in np.linspace(0, len(clean) - 1, 14).astype(int).tolist():
        data = bytearray(clean)
        data[at] ^= 0x01
        f.write_bytes(bytes(data))
        with pytest.raises(ChecksumMismatchError, match="fails its CRC-32C"):
            CacheReader(str(arrow), verify=False).read_rows(0, 1)
    f.write_bytes(clean)
    assert CacheReader(str(arrow), verify=False).read_rows(0, 1).num_rows == 1

    # one row per shard: every row_id object holds one int64, so all are the same size
    write_cache(str(zarr_url), header("zarr"), make_batches(3, 1, 3, 8, 4, 50), shard_bytes=1)
    m = json.loads((zarr_url / "manifest.json").read_text())
    a, b = (
        next(x for x in m["shards"][i]["files"] if x["path"].endswith("row_id/c/0")) for i in (0, 1)
    )
    assert a["bytes"] == b["bytes"]  # same-size objects: only their content tells them apart
    pa_, pb = zarr_url / a["path"], zarr_url / b["path"]
    da, db = pa_.read_bytes(), pb.read_bytes()
    pa_.write_bytes(db)
    pb.write_bytes(da)
    with pytest.raises(ChecksumMismatchError, match="fails its CRC-32C"):
        CacheReader(str(zarr_url), verify=False).read_rows(0, 1)


def _without_crc32c(d: dict) -> None:
    """A manifest as a writer before format 1.2 would have written the same shards."""
    for s in d["shards"]:
        for f in s["files"]:
            f.pop("crc32c")
    d["content_digest"] = content_digest(d)


def test_caches_without_crc32c_still_read(cache: Path) -> None:
    _edit_manifest(cache, _without_crc32c)
    assert CacheReader(str(cache), verify=False).read_rows(0, 12).num_rows == 12


def test_resume_removes_interrupted_progress_records(tmp_path: Path) -> None:
    url = tmp_path / "c"
    _crash(str(url))
    leftover = url / "_writers" / f".tmp-{'a' * 32}-main.json"
    other = url / "_writers" / f".tmp-{'b' * 32}-main2.json"  # another writer's: kept
    leftover.write_text("{")
    other.write_text("{")
    with CacheWriter(str(url), header("zarr"), shard_bytes=1500, resume=True):
        pass
    assert not leftover.exists() and other.exists()
