"""``uld``: the sorted-probability distance over sparse targets (loss/uld.py).

The registry-wide tests (test_losses.py, test_fused.py) already run ``uld`` against the dense
reference of loss_reference.py (fp32, bf16, gradcheck, all-masked, fused == plain); here are the
properties that are ULD's own: it is the paper's full distance when nothing is truncated, a lower
bound of it for every split of the teacher's tail, blind to ids (another vocabulary works),
deterministic at ties, and its masks.
"""

from __future__ import annotations

import math

import pytest
import torch
from loss_reference import dense_loss, teacher_dist, topk_teacher

from logitcache.errors import ConfigError
from logitcache.loss import SampledTeacher, TopKTeacher, fused_linear_kd_loss, kd_loss


def full_uld(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The paper's closed form per row: sorted vectors, zero-padded to one length, L1."""
    n = max(p.shape[1], q.shape[1])
    ps = torch.sort(p, dim=-1, descending=True).values
    qs = torch.sort(q, dim=-1, descending=True).values
    ps = torch.nn.functional.pad(ps, (0, n - ps.shape[1]))
    qs = torch.nn.functional.pad(qs, (0, n - qs.shape[1]))
    return (ps - qs).abs().sum(-1)


def _logits(n: int, v: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (2 * torch.randn(n, v, generator=g, dtype=torch.float64)).requires_grad_()


def test_whole_distribution_stored_gives_the_papers_distance() -> None:
    p = teacher_dist(9, 31, seed=1)
    z = _logits(9, 31, seed=2)
    total, count = kd_loss(z, topk_teacher(p, 31), loss="uld")
    ref = full_uld(p, torch.softmax(z, -1)).sum()
    torch.testing.assert_close(total, ref, rtol=1e-6, atol=1e-6)
    assert int(count) == 9


@pytest.mark.parametrize("k", [1, 4, 16])
def test_truncated_teacher_is_a_lower_bound_for_every_tail_split(k: int) -> None:
    """The true distribution is one split of the stored tail; others (uniform over the rest,
    all on one id) are too: the loss never exceeds the full distance of any of them."""
    v = 40
    p = teacher_dist(12, v, seed=k)
    z = _logits(12, v, seed=3)
    q = torch.softmax(z, -1).detach()
    total = kd_loss(z, topk_teacher(p, k), loss="uld")[0].detach()
    top = p.topk(k, dim=-1).values
    rest = 1 - top.sum(-1, keepdim=True)
    uniform = torch.cat([top, rest.expand(-1, v - k) / (v - k)], 1)
    lumped = torch.cat([top, torch.zeros(12, v - k, dtype=p.dtype)], 1)  # greedy: few big ids
    left = rest.squeeze(1).clone()
    for c in range(k, v):
        lumped[:, c] = torch.minimum(left, top[:, -1])
        left = left - lumped[:, c]
    for split in (p, uniform, lumped):
        assert float(total) <= float(full_uld(split, q).sum()) + 1e-6
    # and it is attained when the teacher's tail has the student's shape (where that shape
    # keeps the stored entries the largest)
    qs = torch.sort(q, -1, descending=True).values
    shaped = torch.cat([top, qs[:, k:] * rest / qs[:, k:].sum(-1, keepdim=True)], 1)
    ok = shaped[:, k] <= top[:, -1]
    assert int(ok.sum()) >= 3
    attained, _ = kd_loss(z, topk_teacher(p, k), loss="uld", mask=ok)
    torch.testing.assert_close(attained, full_uld(shaped, q)[ok].sum(), rtol=1e-6, atol=1e-6)


def test_ids_do_not_matter_and_vocabularies_may_differ() -> None:
    """Relabelling the teacher's ids changes nothing; a student with a different vocabulary size
    than the teacher's distribution is compared on sorted values only."""
    p = teacher_dist(6, 50, seed=4)  # a teacher vocabulary of 50
    t = topk_teacher(p, 8)
    shuffled = TopKTeacher(t.ids.flip(1), t.logprobs.flip(1), t.tail_logprob)
    z = _logits(6, 23, seed=5)  # a student vocabulary of 23: ids < 50 never gathered
    a, _ = kd_loss(z, TopKTeacher(t.ids % 23, t.logprobs, t.tail_logprob), loss="uld")
    b, _ = kd_loss(z, TopKTeacher(shuffled.ids % 7, shuffled.logprobs, t.tail_logprob), loss="uld")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    q = torch.softmax(z, -1).detach()
    qs = torch.sort(q, -1, descending=True).values
    ps = torch.sort(p, -1, descending=True).values[:, :8]
    ref = (ps - qs[:, :8]).abs().sum(-1) + (1 - ps.sum(-1) - qs[:, 8:].sum(-1)).abs()
    torch.testing.assert_close(a.detach(), ref.sum(), rtol=1e-6, atol=1e-6)


def test_identical_distributions_give_zero_and_the_minimum() -> None:
    z = _logits(5, 17, seed=6)
    p = torch.softmax(z, -1).detach()
    total = kd_loss(z, topk_teacher(p, 6), loss="uld")[0].detach()
    assert abs(float(total)) < 1e-6
    # a permutation of the student's logits is the same sorted vector: still zero
    total_perm = kd_loss(z[:, torch.randperm(17)], topk_teacher(p, 6), loss="uld")[0].detach()
    assert abs(float(total_perm)) < 1e-6


def test_ties_break_by_lower_id_like_a_stable_sort() -> None:
    """Equal logits (bf16 students tie often): the gradient goes to the lowest ids of a tied
    group, every time and on every path (topk alone leaves it unspecified)."""
    z = torch.tensor([[1.0, 3.0, 2.0, 3.0, 3.0, 0.0]], dtype=torch.float64, requires_grad=True)
    t = TopKTeacher(
        torch.tensor([[0, 1]]), torch.tensor([[math.log(0.7), math.log(0.2)]], dtype=torch.float64)
    )
    total, _ = kd_loss(z, t, loss="uld")
    (g,) = torch.autograd.grad(total, z)
    ref = dense_loss(z, t, "uld").sum()
    (g_ref,) = torch.autograd.grad(ref, z)
    torch.testing.assert_close(g, g_ref)
    hidden = z.detach().clone().requires_grad_()  # logits = hidden @ I: the fused path
    fused, _ = fused_linear_kd_loss(hidden, torch.eye(6, dtype=torch.float64), t, loss="uld")
    (g_fused,) = torch.autograd.grad(fused, hidden)
    torch.testing.assert_close(fused, total.detach())
    torch.testing.assert_close(g_fused, g)


def test_padding_entries_join_the_remainder_and_masks_select_rows() -> None:
    """A teacher row with m < k valid entries compares m sorted entries; the rest of the
    student's top-k belongs to its remainder. Masked positions cost nothing."""
    z = _logits(3, 12, seed=7)
    ids = torch.tensor([[4, 0, 0], [2, 5, 0], [1, 3, 7]])
    lp = torch.tensor([[-0.5, -math.inf, -math.inf], [-1.0, -0.7, -math.inf], [-1.0, -2, -3]])
    t = TopKTeacher(ids, lp.double())
    total, _ = kd_loss(z, t, loss="uld", mask=torch.tensor([True, True, False]))
    q = torch.softmax(z.detach(), -1)
    qs = torch.sort(q, -1, descending=True).values
    r0 = abs(math.exp(-0.5) - qs[0, 0]) + abs(1 - math.exp(-0.5) - qs[0, 1:].sum())
    p1 = sorted([math.exp(-1.0), math.exp(-0.7)], reverse=True)
    r1 = sum(abs(p1[i] - qs[1, i]) for i in range(2)) + abs(1 - sum(p1) - qs[1, 2:].sum())
    torch.testing.assert_close(total.detach(), torch.as_tensor(r0 + r1, dtype=torch.float64))


def test_alpha_mixes_cross_entropy_and_sampled_targets_are_refused() -> None:
    p = teacher_dist(4, 9, seed=8)
    z = _logits(4, 9, seed=9)
    labels = torch.tensor([1, 2, 3, 4])
    t = topk_teacher(p, 3)
    mixed, _ = kd_loss(z, t, labels, loss="uld", alpha=0.25)
    pure, _ = kd_loss(z, t, labels, loss="uld")
    ce = torch.nn.functional.cross_entropy(z, labels, reduction="sum")
    torch.testing.assert_close(mixed, 0.75 * pure + 0.25 * ce)
    sampled = SampledTeacher(
        torch.tensor([[1], [2], [3], [4]]), torch.ones(4, 1, dtype=torch.int32)
    )
    with pytest.raises(ConfigError, match="needs a TopKTeacher"):
        kd_loss(z, sampled, loss="uld")
