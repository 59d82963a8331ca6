"""The chunked fused-linear loss against the plain logits path: values and gradients."""

from __future__ import annotations

import pytest
import torch
from loss_reference import sampled_teacher, teacher_dist, topk_teacher

from logitcache.errors import ConfigError
from logitcache.loss import (
    LOSS_NAMES,
    FusedLinearKDLoss,
    SparseKDLoss,
    default_chunk_size,
    fused_linear_kd_loss,
    kd_loss,
)

N, H, V = 47, 16, 123


def _case(loss: str, seed: int, dtype: torch.dtype = torch.float32, k: int = 9):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(V, H, generator=g).to(dtype).requires_grad_()
    bias = torch.randn(V, generator=g).to(dtype).requires_grad_()
    p = teacher_dist(N, V, seed=seed)
    if loss == "sampled-ce":
        teacher = sampled_teacher(p, 24, seed=seed, with_logprobs=True)
    else:
        teacher = topk_teacher(p, k, pad=2 if k > 2 else 0)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::7] = -100
    mask = torch.rand(N, generator=g) > 0.15
    return hidden, weight, bias, teacher, labels, mask


@pytest.mark.parametrize("loss", LOSS_NAMES)
@pytest.mark.parametrize(
    ("chunk", "temperature", "alpha", "k"),
    [(5, 1.0, 0.0, 9), (16, 2.0, 0.4, 9), (10, 1.0, 0.3, V), (100, 0.5, 0.0, 1)],
)
def test_fused_equals_plain(loss, chunk, temperature, alpha, k):
    hidden, weight, bias, teacher, labels, mask = _case(loss, seed=chunk, k=k)
    kw = {"loss": loss, "temperature": temperature, "alpha": alpha}
    plain, count = kd_loss(hidden @ weight.t() + bias, teacher, labels, mask, **kw)
    grads_plain = torch.autograd.grad(plain, (hidden, weight, bias))
    fused, count_f = fused_linear_kd_loss(
        hidden, weight, teacher, labels, mask, bias=bias, chunk_size=chunk, **kw
    )
    grads_fused = torch.autograd.grad(fused, (hidden, weight, bias))
    assert int(count) == int(count_f)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-4)
    for name, a, b in zip(("hidden", "weight", "bias"), grads_fused, grads_plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"grad of {name}")


def test_fused_module_without_bias_bf16_and_backward_scaling():
    hidden, weight, _, teacher, labels, mask = _case("kl", seed=3, dtype=torch.bfloat16)
    module = FusedLinearKDLoss("kl", temperature=2.0, alpha=0.2, chunk_size=8)
    out = module(hidden, weight, teacher, labels=labels, mask=mask)
    (3.0 * out).backward()
    assert out.dtype == torch.float32
    assert hidden.grad is not None and weight.grad is not None
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16
    h32 = hidden.detach().float().requires_grad_()
    w32 = weight.detach().float().requires_grad_()
    ref = SparseKDLoss("kl", temperature=2.0, alpha=0.2)(h32 @ w32.t(), teacher, labels, mask)
    (3.0 * ref).backward()
    assert h32.grad is not None and w32.grad is not None
    # bf16 logits vs fp32 logits: tolerance of bf16 rounding of the matmul, not of the loss.
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(hidden.grad.float(), h32.grad, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(weight.grad.float(), w32.grad, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("loss", ["kl", "jsd", "sampled-ce"])
def test_fused_gradcheck_float64(loss):
    n, h, v = 5, 3, 8
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(v, generator=g, dtype=torch.float64, requires_grad=True)
    p = teacher_dist(n, v, seed=1)
    teacher = (
        sampled_teacher(p, 6, seed=0, with_logprobs=True)
        if loss == "sampled-ce"
        else topk_teacher(p, 3, pad=1)
    )
    labels = torch.tensor([1, -100, 7, 0, 3])

    kw = {"loss": loss, "temperature": 2.0, "alpha": 0.3}

    def plain(hd, w, b):
        return kd_loss(hd @ w.t() + b, teacher, labels, **kw)[0]

    # gradcheck needs several backwards of one graph, which the fused Function refuses (it scales
    # its accumulators in place); so gradcheck the plain composition and pin fused to it in fp64.
    assert torch.autograd.gradcheck(plain, (hidden, weight, bias), eps=1e-6, atol=1e-5)
    fused = fused_linear_kd_loss(hidden, weight, teacher, labels, bias=bias, chunk_size=2, **kw)[0]
    grads = torch.autograd.grad(fused, (hidden, weight, bias))
    ref = torch.autograd.grad(plain(hidden, weight, bias), (hidden, weight, bias))
    torch.testing.assert_close(fused, plain(hidden, weight, bias), rtol=1e-12, atol=1e-12)
    for a, r in zip(grads, ref, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


def test_fused_second_backward_raises():
    hidden, weight, bias, teacher, _, _ = _case("kl", seed=6)
    total, _ = fused_linear_kd_loss(hidden, weight, teacher, bias=bias, chunk_size=9)
    total.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward"):
        total.backward()


def test_fused_all_masked_and_no_grad():
    hidden, weight, bias, teacher, _, _ = _case("kl", seed=4)
    out = FusedLinearKDLoss(chunk_size=7)(
        hidden, weight, teacher, mask=torch.zeros(N, dtype=torch.bool), bias=bias
    )
    out.backward()
    assert out.item() == 0.0
    for t in (hidden, weight, bias):
        assert t.grad is not None and torch.equal(t.grad, torch.zeros_like(t))
    with torch.no_grad():
        total, count = fused_linear_kd_loss(hidden, weight, teacher, bias=bias)
    assert torch.isfinite(total) and int(count) == N


def test_fused_config_errors_and_default_chunk():
    hidden, weight, bias, teacher, _, _ = _case("kl", seed=5)
    assert default_chunk_size(2**17) == 128 and default_chunk_size(10**9) == 1
    with pytest.raises(ConfigError, match="same H"):
        fused_linear_kd_loss(hidden, weight.t(), teacher)
    with pytest.raises(ConfigError, match="chunk_size"):
        fused_linear_kd_loss(hidden, weight, teacher, bias=bias, chunk_size=0)
    with pytest.raises(ConfigError, match="bias"):
        fused_linear_kd_loss(hidden, weight, teacher, bias=bias[:3])
