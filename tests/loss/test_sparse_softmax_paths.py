"""The one-exponential fast path of the sparse log-softmax and its exact fallback (a student whose
mass outside the teacher's support is tiny) both match the dense reference, values and gradients;
the fallback is really taken, and the fast path is what a normal batch uses."""

from __future__ import annotations

import pytest
import torch
from loss_reference import dense_loss, teacher_dist, topk_teacher

from logitcache.loss import TopKTeacher, fused_linear_kd_loss, kd_loss
from logitcache.loss import _sparse_softmax as sps

N, V, K = 7, 123, 9


def _peaked_on_support(z: torch.Tensor, t: TopKTeacher, boost: float) -> torch.Tensor:
    """``z`` with ``boost`` added at the teacher's real ids: Q_tail ~ exp(-boost)."""
    add = torch.where(torch.isfinite(t.logprobs), boost, 0.0).to(z.dtype)
    return z.scatter_add(1, t.ids.long(), add)


@pytest.mark.parametrize("boost, exact", [(0.0, False), (60.0, True)])
@pytest.mark.parametrize("loss", ["kl", "reverse-kl", "jsd"])
def test_fast_and_exact_paths_match_dense(
    loss: str, boost: float, exact: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = sps._exact_grad
    monkeypatch.setattr(sps, "_exact_grad", lambda *a: calls.append(1) or real(*a))
    t = topk_teacher(teacher_dist(N, V, seed=1), K, pad=2)
    g = torch.Generator().manual_seed(2)
    z = _peaked_on_support(torch.randn(N, V, generator=g), t, boost).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g)
    total, _ = kd_loss(z, t, labels, loss=loss, alpha=0.25)
    ref = dense_loss(z.double(), t, loss, 1.0, 0.25, labels=labels).sum()
    torch.testing.assert_close(total.double(), ref, rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad(total, z)
    (grad_ref,) = torch.autograd.grad(ref, z)
    torch.testing.assert_close(grad.double(), grad_ref.double(), rtol=1e-4, atol=1e-6)
    assert bool(calls) == exact


def test_fused_path_with_tiny_tail_matches_plain() -> None:
    t = topk_teacher(teacher_dist(N, V, seed=3), K)
    g = torch.Generator().manual_seed(4)
    h = torch.randn(N, 16, generator=g, requires_grad=True)
    w = torch.randn(V, 16, generator=g)
    w[t.ids[0].long()] += 8.0  # row 0's support dominates: a tiny tail there
    w.requires_grad_()
    plain, _ = kd_loss(h @ w.T, t)
    fused, _ = fused_linear_kd_loss(h, w, t)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    ga = torch.autograd.grad(plain, (h, w))
    gb = torch.autograd.grad(fused, (h, w))
    for a, b in zip(ga, gb, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
