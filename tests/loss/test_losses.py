"""Sparse KD losses against plain dense references (loss_reference.py), plus numerics edge cases."""

from __future__ import annotations

import math

import pytest
import torch
from loss_reference import dense_loss, sampled_teacher, teacher_dist, topk_teacher

from logitcache.errors import ConfigError
from logitcache.loss import (
    LOSS_NAMES,
    SampledTeacher,
    SparseKDLoss,
    TopKTeacher,
    kd_loss,
    tail_logprob_from_logprobs,
)

TOPK = ["kl", "kl-renorm", "reverse-kl", "jsd"]
N, V = 47, 123


def _teacher(loss: str, p: torch.Tensor, k: int, pad: int = 0, lognorm_t: float | None = None):
    if loss == "sampled-ce":
        return sampled_teacher(p, 32, seed=1, with_logprobs=True)
    return topk_teacher(p, k, pad=pad, temperature=lognorm_t)


def _logits(n: int, v: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(n, v, generator=g)).to(dtype).requires_grad_()


@pytest.mark.parametrize("loss", LOSS_NAMES)
@pytest.mark.parametrize(
    ("k", "pad", "temperature", "lognorm", "alpha"),
    [
        (1, 0, 1.0, False, 0.0),
        (17, 3, 1.0, False, 0.3),
        (17, 0, 2.0, True, 0.0),
        (17, 2, 0.7, False, 0.5),
        (V, 0, 1.0, False, 0.0),
        (V, 0, 2.0, True, 0.2),
    ],
)
def test_matches_dense_reference_fp32(loss, k, pad, temperature, lognorm, alpha):
    p = teacher_dist(N, V, seed=k)
    t = _teacher(loss, p, k, pad, temperature if lognorm else None)
    z = _logits(N, V, seed=3)
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(4))
    labels[::5] = -100
    total, count = kd_loss(z, t, labels, loss=loss, temperature=temperature, alpha=alpha)
    keep = labels != -100
    ref = dense_loss(z, t, loss, temperature, alpha, labels=labels.clamp(min=0))[keep].sum()
    assert int(count) == int(keep.sum())
    assert torch.isfinite(total)
    torch.testing.assert_close(total.double(), ref, rtol=1e-5, atol=1e-4)
    (g,) = torch.autograd.grad(total, z)
    (g_ref,) = torch.autograd.grad(ref, z)
    torch.testing.assert_close(g.double(), g_ref.double(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_bf16_logits_computed_in_fp32(loss):
    p = teacher_dist(N, V, seed=0)
    t = _teacher(loss, p, 9, pad=2)
    z = _logits(N, V, seed=5, dtype=torch.bfloat16)
    total, _ = kd_loss(z, t, loss=loss, temperature=2.0)
    assert total.dtype == torch.float32
    ref = dense_loss(z.detach().float(), t, loss, 2.0).sum()
    # Inputs are the same bf16 values; only rounding of the fp32 maths differs.
    torch.testing.assert_close(total.double(), ref, rtol=1e-4, atol=1e-3)
    (g,) = torch.autograd.grad(total, z)
    assert g.dtype == torch.bfloat16 and torch.isfinite(g.float()).all()
    zf = z.detach().double().requires_grad_()
    (g_ref,) = torch.autograd.grad(dense_loss(zf, t, loss, 2.0).sum(), zf)
    torch.testing.assert_close(g.double(), g_ref, rtol=2e-2, atol=2e-3)  # bf16 gradient rounding


def test_tail_bucket_kl_equals_dense_kl_when_k_is_vocab():
    p = teacher_dist(N, V, seed=7)
    t = topk_teacher(p, V)
    z = _logits(N, V, seed=8)
    total, _ = kd_loss(z, t, loss="kl")
    dense = torch.nn.functional.kl_div(
        torch.log_softmax(z.double(), -1), p, reduction="sum", log_target=False
    )
    torch.testing.assert_close(total.double(), dense, rtol=1e-5, atol=1e-4)


def test_renormalised_topk_equals_dense_kl_of_renormalised_distributions():
    p = teacher_dist(N, V, seed=9)
    k = 11
    t = topk_teacher(p, k)
    z = _logits(N, V, seed=10)
    total, _ = kd_loss(z, t, loss="kl-renorm")
    inside = torch.zeros(N, V, dtype=torch.bool).scatter_(1, t.ids.long(), True)
    pr = torch.where(inside, p, 0.0)
    pr = pr / pr.sum(-1, keepdim=True)
    qr = torch.where(inside, torch.softmax(z.double(), -1), 0.0)
    qr = qr / qr.sum(-1, keepdim=True)
    dense = (torch.xlogy(pr, pr) - torch.xlogy(pr, torch.where(inside, qr, 1.0))).sum()
    torch.testing.assert_close(total.double(), dense, rtol=1e-5, atol=1e-4)


def test_sampled_estimator_mean_converges_to_dense_cross_entropy():
    n, v, draws, seeds = 8, 50, 16, 400
    p = teacher_dist(n, v, seed=11, sharp=1.0)
    z = _logits(n, v, seed=12).detach()
    logq = torch.log_softmax(z.double(), -1)
    ce = -(p * logq).sum(-1)  # H(p, q) per position
    # Per-position variance of one draw's -log q; the estimator averages `draws` of them.
    var = (p * logq**2).sum(-1) - ce**2
    estimates = torch.stack(
        [
            kd_loss(z, sampled_teacher(p, draws, seed=s), loss="sampled-ce")[0].double()
            for s in range(seeds)
        ]
    )
    # Sum over positions: mean over seeds has std sqrt(sum var / draws / seeds). 5 sigma.
    std = math.sqrt(float(var.sum()) / draws / seeds)
    assert abs(float(estimates.mean()) - float(ce.sum())) < 5 * std
    assert std < 0.05 * float(ce.sum())  # the test has power: 5 sigma is < 25% of the value
    kl = (p * (torch.log(p) - logq)).sum()
    entropy = -(p * torch.log(p)).sum()
    torch.testing.assert_close(ce.sum(), kl + entropy)  # E[sampled-ce] = KL + H(p)


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_all_masked_batch_gives_zero_loss_and_zero_grad(loss):
    p = teacher_dist(6, 20, seed=0)
    t = _teacher(loss, p, 5, pad=1)
    z = _logits(6, 20, seed=1)
    module = SparseKDLoss(loss, temperature=2.0, alpha=0.5)
    labels = torch.full((6,), -100)
    out = module(z, t, labels=labels, mask=torch.zeros(6, dtype=torch.bool))
    out.backward()
    assert out.item() == 0.0
    assert z.grad is not None and torch.equal(z.grad, torch.zeros_like(z))


@pytest.mark.parametrize("loss", TOPK)
def test_no_nan_for_padding_only_rows_and_inf_tails(loss):
    v = 10
    ids = torch.tensor([[3, 0, 0], [0, 0, 0], [1, 2, 0]], dtype=torch.int32)
    lp = torch.tensor([[0.0, -math.inf, -math.inf], [-math.inf] * 3, [-0.1, -3.0, -math.inf]])
    for tail in (None, torch.tensor([-math.inf, 0.0, -math.inf])):
        t = TopKTeacher(ids, lp, tail)
        z = _logits(3, v, seed=2)
        total, _ = kd_loss(z, t, loss=loss, temperature=1.5)
        (g,) = torch.autograd.grad(total, z)
        assert torch.isfinite(total) and torch.isfinite(g).all()


def test_padded_student_vocab_and_tail_from_logprobs():
    p = teacher_dist(5, 30, seed=3)
    t_given = topk_teacher(p, 30)
    t_computed = TopKTeacher(t_given.ids, t_given.logprobs)  # tail computed from the log-probs
    z = _logits(5, 40, seed=4)  # student head padded beyond the teacher's 30 ids
    # Not reverse-kl: there a tail of exactly 0 (given) vs ~1e-7 (rounding) is a real difference,
    # log 0 being floored at LOG_FLOOR.
    for loss in ("kl", "kl-renorm", "jsd"):
        a, _ = kd_loss(z, t_given, loss=loss)
        b, _ = kd_loss(z, t_computed, loss=loss)
        assert torch.isfinite(a) and torch.isfinite(b)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(tail_logprob_from_logprobs(t_given.logprobs)).sum() <= 5


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_gradcheck_float64(loss):
    n, v = 4, 7
    p = teacher_dist(n, v, seed=5)
    if loss == "sampled-ce":
        t: TopKTeacher | SampledTeacher = sampled_teacher(p, 6, seed=2, with_logprobs=True)
    else:
        t = topk_teacher(p, 3, pad=1)
        t = TopKTeacher(t.ids, t.logprobs.double(), None, None)
    labels = torch.tensor([1, -100, 6, 0])
    z = torch.randn(n, v, dtype=torch.float64, requires_grad=True)
    for temperature, alpha in ((1.0, 0.3), (2.0, 0.4)):

        def f(x, temperature=temperature, alpha=alpha):
            return kd_loss(x, t, labels, loss=loss, temperature=temperature, alpha=alpha)[0]

        assert torch.autograd.gradcheck(f, (z,), eps=1e-6, atol=1e-5)


def test_module_mean_and_config_errors():
    p = teacher_dist(8, 12, seed=6)
    t = topk_teacher(p, 4)
    z = _logits(8, 12, seed=7)
    mask = torch.arange(8) % 2 == 0
    total, count = kd_loss(z, t, mask=mask)
    torch.testing.assert_close(SparseKDLoss()(z, t, mask=mask), total / 4)
    assert int(count) == 4
    with pytest.raises(ConfigError, match="unknown loss"):
        SparseKDLoss("mse")
    with pytest.raises(ConfigError, match="beta"):
        SparseKDLoss("jsd", beta=1.0)
    with pytest.raises(ConfigError, match="SampledTeacher"):
        kd_loss(z, t, loss="sampled-ce")
    with pytest.raises(ConfigError, match="no labels"):
        kd_loss(z, t, alpha=0.5)
    with pytest.raises(ConfigError, match="positions"):
        kd_loss(z[:4], t)
    with pytest.raises(ConfigError, match="shape"):
        TopKTeacher(t.ids, t.logprobs[:, :2])
    with pytest.raises(ConfigError, match="log-probs"):
        kd_loss(z, SampledTeacher(t.ids, torch.ones(8, 4)), loss="sampled-ce", temperature=2.0)


def test_loss_package_imports_only_torch_and_errors():
    import subprocess
    import sys

    code = (
        "import sys, logitcache.loss; "
        "print(','.join(m for m in sys.modules if m.startswith('logitcache.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    mods = set(out.stdout.strip().split(","))
    assert {m for m in mods if not m.startswith("logitcache.loss")} <= {"logitcache.errors"}
