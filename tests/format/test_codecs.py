"""Round trips, error bounds, refusals and damage for the top-k and sampled codecs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logitcache.errors import CodecError, ConfigError
from logitcache.format.codec import codec_from_dict
from logitcache.format.sampled import SampledCodec
from logitcache.format.targets import SampledTargets, TopKTargets
from logitcache.format.topk import TopKCodec

DATA = Path(__file__).resolve().parents[3] / "shared/data/smollm2_pydoc_top256.npz"
VOCABS = [1, 5, 300, 65536, 65537, 262_144]


# -- reference builders ---------------------------------------------------------------------------


def make_topk(seed: int, p: int, k: int, vocab: int, near_top: bool = False, nt: int = 0):
    """Normalised top-k targets (float64 probabilities alongside); pads with id 0 / -inf."""
    rng = np.random.default_rng(seed)
    real = min(k, vocab)
    ids = np.zeros((p, k), dtype=np.int32)
    logits = rng.normal(0, rng.uniform(0.1, 6), size=(p, real + 1))
    if real == vocab:
        logits[:, -1] = -np.inf  # nothing outside the stored ids
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    lp = np.full((p, k), -np.inf, dtype=np.float32)
    lo = max(0, vocab - 4 * k) if near_top else 0
    for i in range(p):
        ids[i, :real] = rng.choice(np.arange(lo, vocab), size=real, replace=False)
        perm = rng.permutation(k)
        ids[i], lp[i] = ids[i, perm], np.r_[np.log(probs[i, :real]), lp[i, real:]][perm]
    with np.errstate(divide="ignore"):
        tail = np.log(probs[:, -1]).astype(np.float32)
    tln = rng.normal(size=(p, nt)).astype(np.float32)
    return TopKTargets(ids, lp, tail, tln)


def make_sampled(seed: int, p: int, n: int, vocab: int, logprobs: bool, nt: int = 0):
    rng = np.random.default_rng(seed)
    nus, ids, counts, lps = [], [], [], []
    for _ in range(p):
        draws = (
            rng.integers(max(0, vocab - 50), vocab, size=n)
            if rng.random() < 0.3
            else (rng.zipf(1.3, size=n) % vocab)
        )
        u, c = np.unique(draws, return_counts=True)
        nus.append(len(u))
        ids.append(u)
        counts.append(c)
        lps.append(-rng.exponential(3, size=len(u)))
    cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)  # noqa: E731
    return SampledTargets(
        np.array(nus, dtype=np.int32),
        cat(ids, np.int32),
        cat(counts, np.int32),
        cat(lps, np.float32) if logprobs else None,
        rng.normal(size=(p, nt)).astype(np.float32),
    )


def by_id(ids: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Canonical entry order: by id, ties by value (padding entries share id 0)."""
    order = np.lexsort((values, ids), axis=1) if ids.size else np.zeros(ids.shape, dtype=np.intp)
    return np.take_along_axis(ids, order, 1), np.take_along_axis(values, order, 1)


def topk_kl(t: TopKTargets, d: TopKTargets) -> np.ndarray:
    """KL(exact || decoded) per position over the k ids plus the tail bucket."""
    _, lp = by_id(t.ids, t.logprobs.astype(np.float64))
    _, lq = by_id(d.ids, d.logprobs.astype(np.float64))
    with np.errstate(invalid="ignore"):
        terms = np.where(np.isinf(lp), 0.0, np.exp(lp) * (lp - lq))
        tp = t.tail_logprob.astype(np.float64)
        tail = np.where(np.isinf(tp), 0.0, np.exp(tp) * (tp - d.tail_logprob))
    return terms.sum(1) + tail


def roundtrip(codec, targets):
    arrays = codec.encode(targets)
    for spec in codec.array_specs():
        a = arrays[spec.name]
        assert a.dtype == np.dtype(spec.dtype) and a.shape[1:] == spec.inner_shape
    assert set(arrays) == {s.name for s in codec.array_specs()}
    return arrays, codec.decode(arrays)


topk_case = st.tuples(
    st.integers(0, 2**32 - 1),
    st.integers(0, 7),
    st.integers(1, 9),
    st.sampled_from(VOCABS),
    st.booleans(),
    st.integers(0, 2),
)


# -- top-k ----------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    case=topk_case,
    mode=st.sampled_from(["float32", "float16", "sqrt"]),
    layout=st.sampled_from(["hi-delta", "delta"]),
)
def test_topk_roundtrip(case, mode, layout):
    seed, p, k, vocab, near_top, nt = case
    t = make_topk(seed, p, k, vocab, near_top, nt)
    codec = TopKCodec(k=k, vocab_size=vocab, num_temperatures=nt, values=mode, id_layout=layout)
    _, d = roundtrip(codec, t)
    ids, lp = by_id(t.ids, t.logprobs)
    dids, dlp = by_id(d.ids, d.logprobs)
    np.testing.assert_array_equal(dids, ids)
    assert d.ids.dtype == np.int32 and d.logprobs.dtype == np.float32
    assert np.all(np.diff(d.ids, axis=1) >= 0)  # decoded entries are sorted by id
    np.testing.assert_array_equal(d.temperature_lognorm, t.temperature_lognorm)
    np.testing.assert_array_equal(np.isneginf(dlp), np.isneginf(lp))  # padding stays -inf
    if mode == "float32":
        np.testing.assert_array_equal(dlp, lp)
        np.testing.assert_array_equal(d.tail_logprob, t.tail_logprob)
    elif mode == "float16":
        np.testing.assert_allclose(dlp, lp, rtol=2**-11, atol=1e-7)
        np.testing.assert_array_equal(d.tail_logprob, t.tail_logprob)
    else:
        np.testing.assert_array_equal(np.isneginf(d.tail_logprob), np.isneginf(t.tail_logprob))
        total = np.exp(d.logprobs.astype(np.float64)).sum(1) + np.exp(d.tail_logprob)
        np.testing.assert_allclose(total, 1.0, rtol=1e-5)
        assert np.all(topk_kl(t, d) <= codec.kl_bound() * 1.001 + 1e-6)


@settings(max_examples=40, deadline=None)
@given(case=topk_case)
def test_topk_sqrt_codes_within_half_step(case):
    seed, p, k, vocab, near_top, nt = case
    t = make_topk(seed, p, k, vocab, near_top, nt)
    codec = TopKCodec(k=k, vocab_size=vocab, num_temperatures=nt, levels=37)
    arrays = codec.encode(t)
    table = codec.value_table()
    assert table[0] == -np.inf and np.all(np.isfinite(table[1:]))
    lp = np.take_along_axis(t.logprobs, np.argsort(t.ids, axis=1, kind="stable"), 1)
    for codes, exact in ((arrays["value_code"], lp), (arrays["tail_code"], t.tail_logprob)):
        u_hat = np.exp(table[codes].astype(np.float64) / 2)
        u = np.exp(exact.astype(np.float64) / 2)
        assert np.all(np.abs(u - u_hat) <= 0.5 / codec.levels + 1e-6)
        assert np.all((codes == 0) == np.isneginf(exact))


def test_topk_zero_positions_and_k_equals_vocab():
    for codec in (TopKCodec(k=3, vocab_size=10), TopKCodec(k=3, vocab_size=10, values="float16")):
        t = make_topk(0, 0, 3, 10)
        _, d = roundtrip(codec, t)
        assert d.ids.shape == (0, 3) and d.tail_logprob.shape == (0,)
    t = make_topk(1, 4, 5, 5)  # k = vocab: every id stored, no tail
    _, d = roundtrip(TopKCodec(k=5, vocab_size=5), t)
    assert np.all(np.isneginf(d.tail_logprob))
    np.testing.assert_array_equal(d.ids, np.tile(np.arange(5), (4, 1)))


@pytest.mark.parametrize("layout", ["hi-delta", "delta"])
def test_topk_large_vocab_ids_near_top(layout):
    t = make_topk(3, 5, 16, 262_144, near_top=True)
    t.ids[0, 0] = 262_143
    t.ids[1, 0] = 0
    arrays, d = roundtrip(TopKCodec(k=16, vocab_size=262_144, id_layout=layout), t)
    if layout == "delta":
        assert arrays["id_delta_hi"].dtype == np.uint16
    else:
        assert {arrays[n].dtype for n in ("id_lo", "id_hi_delta", "id_hi_delta_top")} == {
            np.dtype(np.uint8)
        }
    np.testing.assert_array_equal(by_id(d.ids, d.logprobs)[0], np.sort(t.ids, axis=1))


@pytest.mark.parametrize("mode", ["sqrt", "float16", "float32"])
def test_topk_subrun_decodes_like_slice(mode):
    t = make_topk(7, 12, 6, 70_000, nt=2)
    codec = TopKCodec(k=6, vocab_size=70_000, num_temperatures=2, values=mode)
    arrays = codec.encode(t)
    full = codec.decode(arrays)
    part = codec.decode({name: a[3:8] for name, a in arrays.items()})
    for name in ("ids", "logprobs", "tail_logprob", "temperature_lognorm"):
        np.testing.assert_array_equal(getattr(part, name), getattr(full, name)[3:8])


def test_topk_error_bound_on_real_data():
    if not DATA.exists():
        pytest.skip(f"{DATA} not present")
    d = np.load(DATA)
    lp = (d["topk_logits"] - d["logsumexp"][:, None]).astype(np.float32)
    for k in (12, 64):
        p = np.exp(lp[:, :k].astype(np.float64))
        tail = np.log(np.maximum(1 - p.sum(1), 1e-12)).astype(np.float32)
        t = TopKTargets(
            d["topk_ids"][:, :k].copy(), lp[:, :k].copy(), tail, np.zeros((len(lp), 0), np.float32)
        )
        codec = TopKCodec(k=k, vocab_size=int(d["vocab_size"]))
        kl = topk_kl(t, codec.decode(codec.encode(t)))
        assert kl.mean() <= codec.expected_kl() * 1.1, (k, kl.mean(), codec.expected_kl())
        assert kl.mean() <= 1e-3 and kl.max() <= codec.kl_bound()


# -- sampled --------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    p=st.integers(0, 6),
    n=st.sampled_from([1, 3, 50, 256, 257, 70_000]),
    vocab=st.sampled_from(VOCABS),
    mode=st.sampled_from(["none", "uint8", "float16"]),
    nt=st.integers(0, 2),
)
def test_sampled_roundtrip(seed, p, n, vocab, mode, nt):
    t = make_sampled(seed, p, n, vocab, logprobs=mode != "none", nt=nt)
    codec = SampledCodec(samples=n, vocab_size=vocab, num_temperatures=nt, logprobs=mode)
    _, d = roundtrip(codec, t)
    for name in ("num_unique", "ids", "counts", "temperature_lognorm"):
        np.testing.assert_array_equal(getattr(d, name), getattr(t, name))
    if mode == "none":
        assert d.logprobs is None
    elif mode == "float16":
        np.testing.assert_allclose(d.logprobs, t.logprobs, rtol=2**-11, atol=1e-7)
    else:
        assert t.logprobs is not None and d.logprobs is not None
        inside = t.logprobs >= codec.logprob_floor
        step = -codec.logprob_floor / 255
        err = np.abs(d.logprobs - t.logprobs)[inside]
        assert np.all(err <= step / 2 + 1e-5)
        assert np.all(d.logprobs[~inside] == codec.value_table()[1])


def test_sampled_subrun_decodes_like_slice():
    t = make_sampled(5, 10, 50, 300_000 // 2, logprobs=True, nt=1)
    codec = SampledCodec(samples=50, vocab_size=150_000, num_temperatures=1, logprobs="uint8")
    arrays = codec.encode(t)
    full, off = codec.decode(arrays), t.offsets()
    sub = {}
    for spec in codec.array_specs():
        a = arrays[spec.name]
        sub[spec.name] = a[2:7] if spec.level == "position" else a[off[2] : off[7]]
    part = codec.decode(sub)
    np.testing.assert_array_equal(part.num_unique, full.num_unique[2:7])
    np.testing.assert_array_equal(part.ids, full.ids[off[2] : off[7]])
    np.testing.assert_array_equal(part.counts, full.counts[off[2] : off[7]])
    assert part.logprobs is not None and full.logprobs is not None
    np.testing.assert_array_equal(part.logprobs, full.logprobs[off[2] : off[7]])


# -- parameters, refusals, damage -----------------------------------------------------------------


@pytest.mark.parametrize(
    "codec",
    [
        TopKCodec(k=64, vocab_size=49_152),
        TopKCodec(k=1, vocab_size=262_144, num_temperatures=3, values="float16"),
        TopKCodec(k=8, vocab_size=100, values="sqrt", levels=1000),
        SampledCodec(samples=50, vocab_size=49_152),
        SampledCodec(
            samples=300,
            vocab_size=262_144,
            num_temperatures=2,
            logprobs="uint8",
            logprob_floor=-12.5,
        ),
    ],
)
def test_from_dict_to_dict_identity(codec):
    d = codec.to_dict()
    assert type(codec).from_dict(d) == codec
    assert codec_from_dict(d) == codec
    assert codec_from_dict(dict(d)).to_dict() == d
    with pytest.raises(ConfigError, match="unknown fields"):
        codec_from_dict({**d, "zstd_dict": [1, 2]})


def test_default_levels_follow_kl_budget():
    assert TopKCodec(k=64, vocab_size=10).levels == 105
    for k in (1, 12, 64, 128, 1000):
        assert TopKCodec(k=k, vocab_size=10).expected_kl() <= 1e-3


@pytest.mark.parametrize(
    "kwargs",
    [
        {"k": 0, "vocab_size": 10},
        {"k": 4, "vocab_size": 0},
        {"k": True, "vocab_size": 10},
        {"k": 4, "vocab_size": 10, "values": "int4"},
        {"k": 4, "vocab_size": 10, "levels": 0},
        {"k": 4, "vocab_size": 10, "levels": 70_000},
        {"k": 4, "vocab_size": 10, "values": "float16", "levels": 10},
        {"k": 4, "vocab_size": 10, "num_temperatures": -1},
    ],
)
def test_topk_bad_params(kwargs):
    with pytest.raises(ConfigError):
        TopKCodec(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"samples": 0, "vocab_size": 10},
        {"samples": 4, "vocab_size": 0},
        {"samples": 4, "vocab_size": 10, "logprobs": "sqrt"},
        {"samples": 4, "vocab_size": 10, "logprob_floor": float("nan")},
        {"samples": 4, "vocab_size": 10, "logprob_floor": 1.0},
    ],
)
def test_sampled_bad_params(kwargs):
    with pytest.raises(ConfigError):
        SampledCodec(**kwargs)


def test_encode_refuses_bad_targets():
    t = make_topk(0, 3, 4, 1000)
    codec = TopKCodec(k=4, vocab_size=1000)
    for bad_id in (1000, -1, 2**31 - 1):
        ids = t.ids.copy()
        ids[1, 2] = bad_id
        with pytest.raises(CodecError, match="vocab_size"):
            codec.encode(TopKTargets(ids, t.logprobs, t.tail_logprob, t.temperature_lognorm))
    with pytest.raises(CodecError, match="k=4"):
        TopKCodec(k=5, vocab_size=1000).encode(t)
    lp = t.logprobs.copy()
    lp[0, 0] = np.nan
    with pytest.raises(CodecError, match="NaN"):
        codec.encode(TopKTargets(t.ids, lp, t.tail_logprob, t.temperature_lognorm))
    s = make_sampled(0, 3, 10, 100, logprobs=False)
    with pytest.raises(CodecError, match="vocab_size"):
        SampledCodec(samples=10, vocab_size=50).encode(s)
    with pytest.raises(CodecError, match="sum to samples"):
        SampledCodec(samples=11, vocab_size=100).encode(s)
    with pytest.raises(CodecError, match="TopKTargets"):
        codec.encode(s)  # type: ignore[arg-type]
    with pytest.raises(CodecError, match="lack"):
        SampledCodec(samples=10, vocab_size=100, logprobs="uint8").encode(s)
    unsorted = SampledTargets(
        s.num_unique, s.ids[::-1].copy(), s.counts[::-1].copy(), None, s.temperature_lognorm
    )
    if s.num_unique.max() > 1:
        with pytest.raises(CodecError):
            SampledCodec(samples=10, vocab_size=100).encode(unsorted)


def test_corrupted_arrays_raise():
    legacy = TopKCodec(k=4, vocab_size=1000, id_layout="delta")
    arrays = legacy.encode(make_topk(0, 3, 4, 1000))
    for name, value in (("id_delta_hi", 4), ("id_delta_hi", 255), ("value_code", 200)):
        bad = {n: a.copy() for n, a in arrays.items()}
        bad[name][1, -1] = value
        with pytest.raises(CodecError):
            legacy.decode(bad)
    codec = TopKCodec(k=4, vocab_size=1000)
    arrays = codec.encode(make_topk(0, 3, 4, 1000))
    for name, value in (("id_hi_delta", 4), ("id_hi_delta", 255), ("value_code", 200)):
        bad = {n: a.copy() for n, a in arrays.items()}
        bad[name][1, -1] = value
        with pytest.raises(CodecError):
            codec.decode(bad)
    bad = {n: a.copy() for n, a in arrays.items()}
    bad["value_code"][:] = 0
    bad["tail_code"][:] = 0
    with pytest.raises(CodecError, match="zero total mass"):
        codec.decode(bad)
    with pytest.raises(CodecError, match="missing"):
        codec.decode({n: a for n, a in arrays.items() if n != "tail_code"})
    with pytest.raises(CodecError, match="should be uint8"):
        codec.decode({**arrays, "value_code": arrays["value_code"].astype(np.int32)})
    big = TopKCodec(k=4, vocab_size=262_144, id_layout="delta")
    arrays = big.encode(make_topk(0, 3, 4, 262_144))
    arrays["id_delta_hi"][0, 0] = 1024
    with pytest.raises(CodecError, match="vocab_size"):
        big.decode(arrays)
    big = TopKCodec(k=4, vocab_size=262_144)
    arrays = big.encode(make_topk(0, 3, 4, 262_144))
    arrays["id_hi_delta_top"][0, 0] = 4  # 4 << 16 = 262,144: one past the last id
    with pytest.raises(CodecError, match="vocab_size"):
        big.decode(arrays)

    scodec = SampledCodec(samples=10, vocab_size=100)
    sarr = scodec.encode(make_sampled(1, 4, 10, 100, logprobs=False))
    for name, value in (("id_delta_hi", 1), ("count_minus1", 9)):
        bad = {n: a.copy() for n, a in sarr.items()}
        bad[name][-1] = value
        with pytest.raises(CodecError):
            scodec.decode(bad)
    bad = {n: a.copy() for n, a in sarr.items()}
    bad["num_unique"][0] += 1
    with pytest.raises(CodecError):
        scodec.decode(bad)


# -- id layouts, shared decode arithmetic ---------------------------------------------------------


def real_topk(k: int, vocab: int | None = None) -> tuple[TopKTargets, int]:
    """The real SmolLM2 top-k; ``vocab`` > 49,152 spreads the ids with a fixed order-preserving
    random injective map into ``[0, vocab)`` (a large vocabulary's spread)."""
    if not DATA.exists():
        pytest.skip(f"{DATA} not present")
    d = np.load(DATA)
    lp = (d["topk_logits"][:, :k] - d["logsumexp"][:, None]).astype(np.float32)
    tail = np.log(np.maximum(1 - np.exp(lp.astype(np.float64)).sum(1), 1e-12)).astype(np.float32)
    ids, v0 = d["topk_ids"][:, :k].astype(np.int64), int(d["vocab_size"])
    if vocab is not None and vocab > v0:
        ids = np.sort(np.random.default_rng(vocab).choice(vocab, v0, replace=False))[ids]
    t = TopKTargets(ids.astype(np.int32), lp, tail, np.zeros((len(lp), 0), np.float32))
    return t, vocab or v0


def test_codec_entry_without_id_layout_reads_the_old_layout():
    """A manifest written before format 1.2 has no ``id_layout``: its arrays are id delta planes,
    built here with the formula docs/codecs.md gave for them."""
    t = make_topk(4, 6, 5, 70_000)
    old = {"name": "topk", "k": 5, "vocab_size": 70_000, "num_temperatures": 0, "values": "float32"}
    codec = codec_from_dict(old)
    assert isinstance(codec, TopKCodec) and codec.id_layout == "delta"
    assert codec.to_dict() == old  # re-serialised unchanged: older readers still read it
    order = np.argsort(t.ids, axis=1, kind="stable")
    d = np.diff(np.take_along_axis(t.ids, order, 1).astype(np.int64), axis=1, prepend=0)
    arrays = {
        "id_delta_lo": (d & 0xFF).astype(np.uint8),
        "id_delta_hi": (d >> 8).astype(np.uint16),
        "logprobs": np.take_along_axis(t.logprobs, order, 1),
        "tail_logprob": t.tail_logprob,
    }
    got = codec.decode(arrays)
    np.testing.assert_array_equal(got.ids, np.sort(t.ids, axis=1))
    new = TopKCodec(k=5, vocab_size=70_000, values="float32")
    assert new.to_dict()["id_layout"] == "hi-delta"
    with pytest.raises(ConfigError, match="id_layout"):
        TopKCodec(k=5, vocab_size=10, id_layout="nibbles")


def test_sampled_codec_keeps_the_on_disk_key_n():
    codec = SampledCodec(samples=7, vocab_size=100)
    assert codec.to_dict()["n"] == 7 and "samples" not in codec.to_dict()
    assert codec_from_dict(codec.to_dict()).samples == 7


@pytest.mark.parametrize("vocab", [None, 262_144])
@pytest.mark.parametrize("layout", ["hi-delta", "delta"])
def test_numpy_and_torch_decodes_agree_bit_for_bit(vocab, layout):
    """One formula, two twins (format/_decode.py): same ids, same float32 bits, on real data."""
    torch = pytest.importorskip("torch")
    from logitcache.format._decode import (
        decode_ids_torch,
        sqrt_dequantize_torch,
        sqrt_device_tables,
    )

    t, v = real_topk(64, vocab)
    codec = TopKCodec(k=64, vocab_size=v, id_layout=layout)
    arrays = codec.encode(t)
    ref = codec.decode(arrays)
    planes = {n: torch.from_numpy(a) for n, a in arrays.items() if n.startswith("id_")}
    ids = decode_ids_torch(planes)
    assert ids.dtype == torch.int32
    np.testing.assert_array_equal(ids.numpy(), ref.ids)
    logt, sq, scale = sqrt_device_tables(codec.quant_levels, codec.k)
    lp, tail = sqrt_dequantize_torch(
        torch.from_numpy(arrays["value_code"]),
        torch.from_numpy(arrays["tail_code"]),
        torch.from_numpy(logt),
        torch.from_numpy(sq),
        scale,
    )
    assert lp.numpy().tobytes() == ref.logprobs.tobytes()
    assert tail.numpy().tobytes() == ref.tail_logprob.tobytes()


def test_hi_delta_layout_is_smaller_on_real_distributions():
    """The issue's 262k case: the old layout's uint16 high plane cost ~0.4 B/entry."""
    from numcodecs import Zstd

    def size(codec: TopKCodec, t: TopKTargets) -> int:
        z = Zstd(level=15)
        return sum(len(z.encode(a.tobytes())) for n, a in codec.encode(t).items())

    for vocab in (None, 262_144):
        t, v = real_topk(64, vocab)
        old, new = (TopKCodec(k=64, vocab_size=v, id_layout=x) for x in ("delta", "hi-delta"))
        assert size(new, t) < size(old, t) * (0.97 if vocab else 0.995), vocab
