"""Teacher loading and on-device sparsification against a dense reference on the same rows."""

from __future__ import annotations

import copy
import textwrap
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import TINY_PADDED_VOCAB, build_tiny_llama

from logitcache.dump.sparsify import SparsifyConfig, sparsify_batch
from logitcache.dump.teacher import Teacher, load_teacher, teacher_from_model
from logitcache.errors import ConfigError, NonFiniteLogitsError, TeacherError

REAL = 300  # len(tiny_tokenizer); the model pads its output layer to TINY_PADDED_VOCAB
TEMPS = (0.5, 2.0)


@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir: Path) -> Teacher:
    return load_teacher(str(tiny_teacher_dir), dtype="fp32", device="cpu")


@pytest.fixture(scope="module")
def rows() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, REAL, size=(3, 23)).astype(np.int32)
    mask = rng.random((3, 23)) < 0.7
    mask[:, -1] = False
    mask[2] = False  # a row with no target at all
    return ids, mask, np.array([7, 3, 11], dtype=np.int64)


def _reference(model: Any, ids: np.ndarray, mask: np.ndarray) -> torch.Tensor:
    """Dense float64 log-probs over the real vocab at the masked positions, row-major."""
    with torch.no_grad():
        z = model(torch.as_tensor(ids, dtype=torch.long)).logits[..., :REAL].double()
    return torch.log_softmax(z[torch.as_tensor(mask)], dim=-1)


def test_topk_equals_dense_reference(teacher: Teacher, rows: Any) -> None:
    ids, mask, row_ids = rows
    assert (teacher.padded_vocab_size, teacher.real_vocab_size) == (TINY_PADDED_VOCAB, REAL)
    assert teacher.head is not None
    out = sparsify_batch(teacher, ids, mask, row_ids, SparsifyConfig(k=8, temperatures=TEMPS))
    ref = _reference(teacher.model, ids, mask)
    t = out.targets
    assert out.positions_per_row.tolist() == mask.sum(1).tolist()
    assert t.ids.dtype == np.int32 and t.logprobs.dtype == np.float32
    want_lp, want_ids = ref.topk(8, dim=-1)
    np.testing.assert_array_equal(t.ids, want_ids.numpy())
    np.testing.assert_allclose(t.logprobs, want_lp.numpy(), atol=2e-5)
    rest = ref.scatter(1, want_ids, float("-inf"))
    np.testing.assert_allclose(t.tail_logprob, torch.logsumexp(rest, 1).numpy(), atol=2e-5)
    np.testing.assert_allclose(out.stats.captured_mass, want_lp.exp().sum(1).numpy(), atol=1e-5)
    entropy = -(ref.exp() * ref).sum(1)
    np.testing.assert_allclose(out.stats.entropy, entropy.numpy(), atol=1e-4)
    with torch.no_grad():
        z = teacher.model(torch.as_tensor(ids, dtype=torch.long)).logits[..., :REAL].double()
    z = z[torch.as_tensor(mask)]
    for j, temp in enumerate(TEMPS):
        dense = torch.logsumexp(z / temp, 1) - torch.logsumexp(z, 1) / temp
        np.testing.assert_allclose(t.temperature_lognorm[:, j], dense.numpy(), atol=2e-5)


def test_chunked_equals_unchunked(teacher: Teacher, rows: Any) -> None:
    ids, mask, row_ids = rows
    for method in ("topk", "sampled"):
        outs = [
            sparsify_batch(
                teacher, ids, mask, row_ids, SparsifyConfig(method=method, k=5, chunk_tokens=c)
            )
            for c in (3, 10_000)
        ]
        a, b = outs[0].targets, outs[1].targets
        np.testing.assert_array_equal(a.ids, b.ids)
        # row sums may be split across threads differently for 3 vs 1348 rows: a few ulp apart
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)  # type: ignore[arg-type]


def test_padded_vocab_excluded(rows: Any) -> None:
    ids, mask, row_ids = rows
    model = build_tiny_llama()
    with torch.no_grad():  # padded rows that would win every top-k and dominate the normaliser
        model.lm_head.weight[REAL:] = model.lm_head.weight[:1] * 50
    teacher = teacher_from_model(model, None, real_vocab_size=REAL)
    for method in ("sampled", "topk"):
        out = sparsify_batch(teacher, ids, mask, row_ids, SparsifyConfig(method=method, k=8))
        assert out.targets.ids.max() < REAL
    ref = _reference(model, ids, mask)
    np.testing.assert_allclose(
        out.targets.logprobs,
        ref.gather(1, torch.as_tensor(out.targets.ids, dtype=torch.long)).numpy(),
        atol=2e-5,
    )  # normalised over real vocab


def test_sampling_reproducible_and_batch_independent(teacher: Teacher, rows: Any) -> None:
    ids, mask, row_ids = rows
    cfg = SparsifyConfig(method="sampled", samples=32, seed=5)
    both = sparsify_batch(teacher, ids[:2], mask[:2], row_ids[:2], cfg)
    swapped = sparsify_batch(teacher, ids[[1, 0]], mask[[1, 0]], row_ids[[1, 0]], cfg)
    alone = sparsify_batch(teacher, ids[1:2], mask[1:2], row_ids[1:2], cfg)
    t = both.targets
    off = t.offsets()
    n0 = int(mask[0].sum())
    row1 = slice(int(off[n0]), int(off[-1]))
    np.testing.assert_array_equal(alone.targets.ids, t.ids[row1])
    np.testing.assert_array_equal(alone.targets.counts, t.counts[row1])
    so = swapped.targets.offsets()
    np.testing.assert_array_equal(swapped.targets.ids[: so[int(mask[1].sum())]], t.ids[row1])
    again = sparsify_batch(teacher, ids[:2], mask[:2], row_ids[:2], cfg).targets
    np.testing.assert_array_equal(again.ids, t.ids)
    other = sparsify_batch(
        teacher,
        ids[:2],
        mask[:2],
        row_ids[:2],
        SparsifyConfig(method="sampled", samples=32, seed=6),
    ).targets
    assert not np.array_equal(other.ids, t.ids)
    # structure: ascending unique ids per position, counts sum to n, log-probs are the teacher's
    for p in range(t.num_positions):
        seg = t.ids[off[p] : off[p + 1]]
        assert (np.diff(seg) > 0).all() and t.counts[off[p] : off[p + 1]].sum() == 32
    ref = _reference(teacher.model, ids[:2], mask[:2])
    owner = np.repeat(np.arange(t.num_positions), t.num_unique)
    np.testing.assert_allclose(t.logprobs, ref[owner, t.ids].numpy(), atol=2e-5)  # type: ignore[arg-type]


def test_sampling_frequencies_match_teacher(teacher: Teacher, rows: Any) -> None:
    ids, mask, _ = rows
    one = np.zeros_like(mask[:1])
    one[0, 4] = True
    cfg = SparsifyConfig(method="sampled", samples=40_000, seed=1)
    t = sparsify_batch(teacher, ids[:1], one, np.array([0]), cfg).targets
    p = _reference(teacher.model, ids[:1], one)[0].exp().numpy()
    freq = np.zeros(REAL)
    freq[t.ids] = t.counts / 40_000
    assert 0.5 * np.abs(freq - p).sum() < 0.03  # total variation


def test_full_logits_fallback_and_factory(tmp_path: Path, rows: Any, monkeypatch: Any) -> None:
    ids, mask, row_ids = rows
    (tmp_path / "tiny_factory.py").write_text(
        textwrap.dedent("""
        import torch
        class Plain(torch.nn.Module):
            def __init__(self):
                super().__init__()
                torch.manual_seed(0)
                self.emb = torch.nn.Embedding(50, 16)
                self.out = torch.nn.Linear(16, 64)
            def forward(self, ids):
                return self.out(torch.tanh(self.emb(ids)).cumsum(1))
        class NaNs(Plain):
            def forward(self, ids):
                z = super().forward(ids)
                if z.shape[0] > 1:  # not in the 1-row load probe
                    z[1, 2, 5] = float("nan")
                return z
        def make(): return Plain(), None
        def bad(): return NaNs(), None
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(UserWarning, match="full logits"):
        plain = load_teacher("tiny_factory:make", device="cpu", real_vocab_size=40)
    assert plain.head is None and plain.identity.source == "factory"
    with pytest.warns(UserWarning, match="full logits"):
        again = load_teacher("tiny_factory:make", device="cpu", real_vocab_size=40)
    assert plain.identity.weights_sha256 == again.identity.weights_sha256
    small = ids % 50
    out = sparsify_batch(plain, small, mask, row_ids, SparsifyConfig(k=4))
    with torch.no_grad():
        z = plain.model(torch.as_tensor(small, dtype=torch.long))[..., :40].double()
    ref = torch.log_softmax(z[torch.as_tensor(mask)], -1).topk(4, -1)
    np.testing.assert_array_equal(out.targets.ids, ref.indices.numpy())
    with pytest.warns(UserWarning):
        bad = load_teacher("tiny_factory:bad", device="cpu")
    with pytest.raises(NonFiniteLogitsError, match=r"row\(s\) \[3\]"):
        sparsify_batch(bad, small, mask, row_ids, SparsifyConfig(k=4))


def test_softcap_and_tied_heads_split(rows: Any) -> None:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    ids, mask, row_ids = rows
    cfg = Gemma2Config(
        vocab_size=REAL,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        final_logit_softcapping=3.0,
        initializer_range=0.5,
    )
    torch.manual_seed(0)
    models = [Gemma2ForCausalLM(cfg).eval(), build_tiny_llama(tie_word_embeddings=True)]
    for model in models:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback warning: the head splits
            teacher = teacher_from_model(model, None, real_vocab_size=REAL)
        assert teacher.head is not None
        out = sparsify_batch(teacher, ids, mask, row_ids, SparsifyConfig(k=6))
        ref = _reference(model, ids, mask).topk(6, -1)
        np.testing.assert_array_equal(out.targets.ids, ref.indices.numpy())
        np.testing.assert_allclose(out.targets.logprobs, ref.values.numpy(), atol=2e-5)


def test_head_with_unapplied_config_falls_back(rows: Any) -> None:
    model = copy.deepcopy(build_tiny_llama())
    model.config.final_logit_softcapping = 1.0  # the Llama forward ignores it: probe must notice
    with pytest.warns(UserWarning, match="full logits"):
        teacher = teacher_from_model(model, None, real_vocab_size=REAL)
    assert teacher.head is None


def test_load_errors_and_identity(tiny_teacher_dir: Path, teacher: Teacher, rows: Any) -> None:
    assert teacher.identity.source == "hf" and teacher.tokenizer is not None
    assert len(teacher.identity.weights_sha256 or "") == 64
    with pytest.raises(TeacherError, match="neither a directory"):
        load_teacher(str(tiny_teacher_dir / "missing"))
    with pytest.raises(TeacherError, match="not found"):
        load_teacher(str(tiny_teacher_dir), teacher_file="model.gguf")
    with pytest.raises(TeacherError, match="cannot import"):
        load_teacher("no_such_module_xyz:make")
    ids, mask, row_ids = rows
    long_ids = np.zeros((1, 300), dtype=np.int32)
    with pytest.raises(ConfigError, match="exceeds the teacher's context"):
        sparsify_batch(teacher, long_ids, long_ids.astype(bool), row_ids[:1], SparsifyConfig())
    with pytest.raises(ConfigError):
        SparsifyConfig(temperatures=(0.0,))
    big_k = sparsify_batch(teacher, ids, mask, row_ids, SparsifyConfig(k=REAL + 4)).targets
    assert np.isneginf(big_k.logprobs[:, REAL:]).all() and np.isneginf(big_k.tail_logprob).all()


def test_entropy_and_nll_equal_dense_reference(teacher: Teacher, rows: Any) -> None:
    ids, mask, row_ids = rows
    for method in ("topk", "sampled"):
        out = sparsify_batch(teacher, ids, mask, row_ids, SparsifyConfig(method=method, k=8))
        ref = _reference(teacher.model, ids, mask)
        want_h = -(ref.exp() * ref).sum(1)
        np.testing.assert_allclose(out.stats.entropy, want_h.numpy(), atol=2e-5)
        b, t = np.nonzero(mask)
        labels = torch.as_tensor(ids[b, t + 1], dtype=torch.long)
        want_nll = -ref.gather(1, labels[:, None]).squeeze(1)
        np.testing.assert_allclose(out.stats.nll, want_nll.numpy(), atol=2e-5)


def test_blocks_of_rows_equal_one_block(
    teacher: Teacher, rows: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CPU processes a chunk a few rows at a time (cache-sized blocks): same results."""
    import logitcache.dump.sparsify as sp

    ids, mask, row_ids = rows
    for method in ("topk", "sampled"):
        cfg = SparsifyConfig(method=method, k=8, temperatures=TEMPS)
        one = sparsify_batch(teacher, ids, mask, row_ids, cfg)
        monkeypatch.setattr(sp, "_CPU_BLOCK_BYTES", 3 * REAL * 4)  # 3 rows per block
        blocks = sparsify_batch(teacher, ids, mask, row_ids, cfg)
        monkeypatch.undo()
        for name in ("ids", "logprobs", "temperature_lognorm"):
            np.testing.assert_array_equal(getattr(one.targets, name), getattr(blocks.targets, name))
        for name in ("captured_mass", "entropy", "nll"):
            np.testing.assert_array_equal(getattr(one.stats, name), getattr(blocks.stats, name))


@pytest.mark.parametrize("vocab", [49_152, 50_257, 151_665, 100])
def test_segmented_topk_equals_topk(vocab: int) -> None:
    """The CPU top-k through segment maxima gives torch.topk's values and ids (no exact ties
    here), also for a vocabulary that is not a multiple of the segment, and keeps a NaN."""
    from logitcache.dump.sparsify import _topk

    gen = torch.Generator().manual_seed(vocab)
    z = torch.randn(7, vocab, generator=gen) * 4
    z[2, 5:50] += 30.0  # a row whose top k crowd into one segment
    want = z.topk(64, dim=1, sorted=True)
    vals, ids = _topk(z, 64)
    assert torch.equal(vals, want.values) and torch.equal(ids, want.indices)
    z[4, vocab // 2] = float("nan")
    assert torch.isnan(_topk(z, 64)[0][4, 0])
