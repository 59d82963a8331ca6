"""The loss registry: every name the library, the trainer and the CLI know comes from
``OBJECTIVES``; an entry added there works through both paths; the function and module of each
path take their arguments in one order; ids are not range-checked inside the step."""

from __future__ import annotations

import inspect

import pytest
import torch
from loss_reference import teacher_dist, topk_teacher

from logitcache.errors import ConfigError
from logitcache.loss import (
    LOSS_NAMES,
    OBJECTIVES,
    FusedLinearKDLoss,
    KDConfig,
    Objective,
    SparseKDLoss,
    fused_linear_kd_loss,
    kd_loss,
)


def test_names_come_from_the_registry() -> None:
    assert tuple(OBJECTIVES) == LOSS_NAMES
    assert all(o.name == name and o.help for name, o in OBJECTIVES.items())
    import click

    from logitcache.cli.train import train

    params = train.get_params(click.Context(train))
    (loss_opt,) = [p for p in params if p.name == "loss"]
    assert tuple(loss_opt.type.choices) == LOSS_NAMES  # type: ignore[attr-defined]


def _l1(cfg: KDConfig, lp: torch.Tensor, lq: torch.Tensor, exists: torch.Tensor) -> torch.Tensor:
    return (torch.exp(lp) - torch.exp(lq)).abs()


def test_one_registry_entry_is_a_working_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new loss is one ``Objective``: config, plain and fused paths all accept it."""
    monkeypatch.setitem(OBJECTIVES, "l1", Objective("l1", "total variation x2", _l1, tail=True))
    p = teacher_dist(11, 29, seed=2)
    t = topk_teacher(p, 5)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(11, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(29, 8, generator=g, dtype=torch.float64, requires_grad=True)
    plain, n = kd_loss(h @ w.t(), t, loss="l1")
    fused, n_f = fused_linear_kd_loss(h, w, t, loss="l1", chunk_size=4)
    q = torch.softmax(h @ w.t(), -1)
    ids = t.ids.long()
    tail_q = 1 - q.gather(1, ids).sum(-1)
    tail_p = 1 - p.gather(1, ids).sum(-1)
    ref = (p.gather(1, ids) - q.gather(1, ids)).abs().sum(-1) + (tail_p - tail_q).abs()
    torch.testing.assert_close(plain, ref.sum(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused, plain, rtol=1e-10, atol=1e-10)
    assert int(n) == int(n_f) == 11
    with pytest.raises(ConfigError, match=r"unknown loss 'l2'; expected one of .*l1"):
        KDConfig("l2")


def test_objective_check_is_applied() -> None:
    with pytest.raises(ConfigError, match=r"beta must be in \(0, 1\)"):
        KDConfig("jsd", beta=0.0)
    KDConfig("kl", beta=0.0)  # beta only matters to jsd


def _positional(fn: object, skip: int = 0) -> list[str]:
    params = list(inspect.signature(fn).parameters.values())[skip:]  # type: ignore[arg-type]
    return [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]


def test_function_and_module_take_one_order() -> None:
    assert _positional(kd_loss) == ["logits", "teacher", "labels", "mask"]
    assert _positional(SparseKDLoss.forward, skip=1) == _positional(kd_loss)
    fused = _positional(fused_linear_kd_loss)
    assert fused == ["hidden", "weight", "teacher", "labels", "mask"]
    assert _positional(FusedLinearKDLoss.forward, skip=1) == fused
    assert "bias" in inspect.signature(FusedLinearKDLoss.forward).parameters
    h, w = torch.randn(3, 4), torch.randn(6, 4)
    with pytest.raises(ConfigError, match=r"fused_linear_kd_loss\(hidden, weight, teacher"):
        fused_linear_kd_loss(h, w, None, topk_teacher(teacher_dist(3, 6, seed=0), 2))  # type: ignore[arg-type]


def test_no_host_sync_on_ids_in_the_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loss never reads id values back to the host (a sync per step on a GPU): ids are
    checked where they are decoded and the student against the cache before training (see
    tests/data/test_dataset.py and tests/train/test_train.py::test_refusals)."""
    p = teacher_dist(7, 13, seed=1)
    t = topk_teacher(p, 4)
    calls: list[str] = []
    for name in ("min", "max", "item"):
        orig = getattr(torch.Tensor, name)

        def spy(self: torch.Tensor, *a: object, _orig: object = orig, _n: str = name) -> object:
            if self.dtype in (torch.int32, torch.int64):
                calls.append(_n)
            return _orig(self, *a)  # type: ignore[operator]

        monkeypatch.setattr(torch.Tensor, name, spy)
    kd_loss(torch.randn(7, 13), t)
    fused_linear_kd_loss(torch.randn(7, 5), torch.randn(13, 5), t)
    assert calls == []
