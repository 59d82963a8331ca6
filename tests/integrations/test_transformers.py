"""The Hugging Face Trainer adapter on tiny real models: it distils, it equals ``logitcache
train`` on the same rows, its normalisation survives gradient accumulation, resume continues the
data order, ``remove_unused_columns`` cannot drop the targets, and the refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from kd_cache import dump_tiny, llama, teacher
from transformers import LlamaForCausalLM, TrainingArguments

from logitcache.errors import CacheIncompleteError, ConfigError
from logitcache.integrations.rows import CacheCollator, CacheOrderSampler, CacheRowDataset
from logitcache.integrations.transformers import KDArguments, KDTrainer
from logitcache.train import TrainConfig, run_train

HELD_OUT = 0.25


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    url = tmp_path_factory.mktemp("hf") / "cache"
    dump_tiny(teacher(), url, rows=128, seed=0)
    return url


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("student") / "s"
    llama(7).save_pretrained(d)
    return d


class RecordingTrainer(KDTrainer):
    """Remembers the rows and the loss of every training micro-batch."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.rows: list[list[int]] = []

    def compute_loss(self, model: Any, inputs: dict[str, Any], *a: Any, **kw: Any) -> Any:
        if model.training:
            self.rows.append(inputs["row_id"].tolist())
        return super().compute_loss(model, inputs, *a, **kw)


def trainer(
    cache: Path,
    student_dir: Path,
    out: Path,
    *,
    kd: KDArguments | None = None,
    cls: type[KDTrainer] = RecordingTrainer,
    batch: int = 8,
    accum: int = 1,
    steps: int = 30,
    **args: Any,
) -> KDTrainer:
    """The Trainer set up like ``logitcache train``: AdamW on all parameters (weight decay
    0.01, not the Trainer's no-decay groups), cosine to 0.1 x lr, clip 1.0, seed 0."""
    model = LlamaForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    settings: dict[str, Any] = dict(
        output_dir=str(out),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum,
        max_steps=steps,
        learning_rate=5e-3,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1},
        max_grad_norm=1.0,
        seed=0,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
        remove_unused_columns=True,  # the Trainer's default, spelled out: it must not bite
    )
    settings.update(args)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.01)
    return cls(
        model=model,
        args=TrainingArguments(**settings),
        train_dataset=CacheRowDataset(str(cache), split=("train", HELD_OUT)),
        data_collator=CacheCollator(str(cache)),
        optimizers=(opt, None),
        kd=kd or KDArguments(order="random"),
    )


def step_losses(t: KDTrainer) -> list[float]:
    return [h["loss"] for h in t.state.log_history if "loss" in h]


def test_trainer_distils_like_logitcache_train(
    cache: Path, student_dir: Path, tmp_path: Path
) -> None:
    ref = run_train(
        TrainConfig(
            cache=str(cache),
            out=str(tmp_path / "lt"),
            student=str(student_dir),
            batch_size=8,
            max_steps=30,
            lr=5e-3,
            eval_fraction=HELD_OUT,
            order="random",
            progress=False,
        )
    )
    t = trainer(cache, student_dir, tmp_path / "hf")
    before = t.evaluate_cache(HELD_OUT)["kl"]
    t.train()
    after = t.evaluate_cache(HELD_OUT)
    assert after["kl"] < 0.8 * before, (before, after)
    assert after["positions"] == ref["eval"]["positions"]  # the same held-out rows
    assert after["kl"] / ref["eval"]["kl"] <= 1.02, (after, ref["eval"])
    assert step_losses(t) == pytest.approx(ref["losses"], rel=1e-3)


def test_order_sampler_is_logitcache_trains(cache: Path) -> None:
    from logitcache.data import make_loader

    ds = CacheRowDataset(str(cache), split=("train", HELD_OUT))
    sampler = CacheOrderSampler(ds, 8, order="random", seed=3)
    loader = make_loader(str(cache), 8, seed=3, order="random", split=("train", HELD_OUT))
    for epoch in range(2):
        sampler.set_epoch(epoch)
        ours = [ds[i] for i in sampler]
        steps = [set(b["row_id"][~b["is_pad"]].tolist()) for b in loader]
        # the collate groups a batch's rows by shard: compare each step's rows as a set
        assert [set(ours[i : i + 8]) for i in range(0, len(ours), 8)] == steps
        assert sorted(ours) == ds.rows.tolist()


def test_gradient_accumulation_normalises_over_the_step(
    cache: Path, student_dir: Path, tmp_path: Path
) -> None:
    """Two micro-batches of 4 == one batch of 8: the step's loss is the sum over its positions
    divided once (a plain mean per micro-batch would weigh the micro-batches, not positions)."""
    kd = KDArguments()  # the Trainer's sampler: its order does not depend on the batch size
    one = trainer(cache, student_dir, tmp_path / "a", kd=kd, batch=8, steps=4)
    one.train()
    two = trainer(cache, student_dir, tmp_path / "b", kd=kd, batch=4, accum=2, steps=4)
    two.train()
    assert [sorted(a + b) for a, b in zip(two.rows[::2], two.rows[1::2], strict=True)] == [
        sorted(r) for r in one.rows
    ]
    assert step_losses(two) == pytest.approx(step_losses(one), rel=1e-5)
    for p, q in zip(one.model.parameters(), two.model.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-5)


def test_resume_from_checkpoint_continues_the_data_order(
    cache: Path, student_dir: Path, tmp_path: Path
) -> None:
    """The Trainer's own sampler (kd.order=None): its resume replays the epoch and skips."""
    kd = KDArguments()
    kw: dict[str, Any] = dict(kd=kd, steps=10, save_strategy="steps", save_steps=5, batch=4)
    straight = trainer(cache, student_dir, tmp_path / "a", **kw)
    straight.train()
    first = trainer(cache, student_dir, tmp_path / "b", **kw)
    first.train()  # writes checkpoint-5 and checkpoint-10
    resumed = trainer(cache, student_dir, tmp_path / "b", **kw)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-5"))
    assert first.rows == straight.rows
    assert resumed.rows == straight.rows[5:]
    assert step_losses(resumed)[-5:] == pytest.approx(step_losses(straight)[5:], rel=1e-5)


def test_fused_matches_plain(cache: Path, student_dir: Path, tmp_path: Path) -> None:
    plain = trainer(cache, student_dir, tmp_path / "p", steps=3)
    plain.train()
    fused = trainer(
        cache, student_dir, tmp_path / "f", steps=3, kd=KDArguments(order="random", fused=True)
    )
    fused.train()
    assert step_losses(fused) == pytest.approx(step_losses(plain), rel=1e-4)


@pytest.mark.parametrize("loss", ["kl-renorm", "reverse-kl", "jsd"])
def test_other_losses_and_alpha_train(
    cache: Path, student_dir: Path, tmp_path: Path, loss: str
) -> None:
    t = trainer(
        cache, student_dir, tmp_path, steps=2, kd=KDArguments(loss=loss, alpha=0.3, temperature=2.0)
    )
    t.train()
    assert all(x == x and x > 0 for x in step_losses(t))


def test_truncated_student_trains_like_logitcache_train(tmp_path: Path) -> None:
    """A student with fewer ids than the teacher (80 of 96): the teacher's mass on ids 80..95
    joins the tail on the device, as in ``logitcache train`` (the same step losses); a cache
    whose rows hold a token the student lacks is refused at its first batch, naming it."""
    low = tmp_path / "low"
    dump_tiny(teacher(), low, rows=64, seed=1, input_vocab=80)
    small = tmp_path / "small"
    llama(5, vocab=80).save_pretrained(small)
    ref = run_train(
        TrainConfig(cache=str(low), out=str(tmp_path / "lt"), student=str(small), batch_size=8,
                    max_steps=4, lr=5e-3, eval_fraction=HELD_OUT, order="random", progress=False)
    )  # fmt: skip
    t = trainer(low, small, tmp_path / "hf", steps=4)
    assert t.kd_vocab_limit == 80
    t.train()
    assert step_losses(t) == pytest.approx(ref["losses"], rel=1e-3)
    assert 0 <= t.evaluate_cache(HELD_OUT)["kl"] < float("inf")
    wide = trainer(cache_of_all_tokens(tmp_path), small, tmp_path / "wide", steps=1)
    with pytest.raises(ConfigError, match=r"holds token [89]\d, but the student has 80 ids"):
        wide.train()


def cache_of_all_tokens(tmp_path: Path) -> Path:
    url = tmp_path / "all"
    dump_tiny(teacher(), url, rows=16, seed=2)
    return url


def test_refusals(cache: Path, student_dir: Path, tmp_path: Path) -> None:
    short = tmp_path / "short"
    llama(1, context=8).save_pretrained(short)
    with pytest.raises(ConfigError, match=r"seq_len 16 but the student .* context of 8"):
        trainer(cache, short, tmp_path / "o")
    (tmp_path / "incomplete" / "shards").mkdir(parents=True)
    with pytest.raises(CacheIncompleteError):
        trainer(tmp_path / "incomplete", student_dir, tmp_path / "o")
    with pytest.raises(ConfigError, match="needs sampled targets"):
        trainer(cache, student_dir, tmp_path / "o", kd=KDArguments(loss="sampled-ce"))
    with pytest.raises(ConfigError, match="unknown loss"):
        KDArguments(loss="nope")
    with pytest.raises(ConfigError, match="data_collator=CacheCollator"):
        KDTrainer(
            model=LlamaForCausalLM.from_pretrained(student_dir),
            args=TrainingArguments(output_dir=str(tmp_path / "o"), use_cpu=True, report_to=[]),
            train_dataset=CacheRowDataset(str(cache)),
        )


def test_unknown_tail_refuses_tail_losses(student_dir: Path, tmp_path: Path) -> None:
    url = tmp_path / "imported"
    dump_tiny(teacher(), url, rows=32, seed=1, tail="unknown")
    for loss in ("kl", "reverse-kl", "jsd"):
        with pytest.raises(ConfigError, match=r"tail is 'unknown'.*kl-renorm"):
            trainer(url, student_dir, tmp_path / "o", kd=KDArguments(loss=loss))
    ok = trainer(url, student_dir, tmp_path / "o", kd=KDArguments(loss="kl-renorm"), steps=2)
    ok.train()
    assert len(step_losses(ok)) == 2


def test_remove_unused_columns_keeps_row_ids_of_a_datasets_dataset(
    cache: Path, student_dir: Path, tmp_path: Path
) -> None:
    """A ``datasets.Dataset`` of row ids (what TRL takes): its column survives the filter."""
    pytest.importorskip("datasets")
    t = trainer(cache, student_dir, tmp_path, steps=2, kd=KDArguments())
    t.train_dataset = CacheRowDataset(str(cache), split=("train", HELD_OUT)).to_hf()
    t.train()
    assert len(t.rows) == 2 and all(len(r) == 8 for r in t.rows)
