"""TRL's ``SFTTrainer`` with :class:`KDTrainerMixin`: a ``datasets.Dataset`` of row ids (the only
kind SFTTrainer takes), ``skip_prepare_dataset``, and the tokenizer check through the Trainer's
``processing_class``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("trl")

from conftest import build_tiny_tokenizer
from kd_cache import dump_tiny, llama, teacher
from trl import SFTConfig, SFTTrainer

from logitcache.errors import ConfigError
from logitcache.format import SourceInfo
from logitcache.format.fingerprint import tokenizer_fingerprint
from logitcache.integrations.rows import CacheCollator, CacheRowDataset
from logitcache.integrations.transformers import KDArguments, KDTrainerMixin


class KDSFTTrainer(KDTrainerMixin, SFTTrainer):  # type: ignore[misc]
    pass


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    url = tmp_path_factory.mktemp("sft") / "cache"
    tok = SourceInfo(name="tiny", fingerprint=tokenizer_fingerprint(tokenizer))
    dump_tiny(teacher(), url, rows=64, seed=0, tokenizer=tok)
    return url


def sft(cache: Path, out: Path, tokenizer: Any, steps: int = 20) -> KDSFTTrainer:
    args = SFTConfig(
        output_dir=str(out),
        per_device_train_batch_size=8,
        max_steps=steps,
        learning_rate=5e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        remove_unused_columns=True,
        dataset_kwargs={"skip_prepare_dataset": True},  # the rows are tokenized already
    )
    return KDSFTTrainer(
        model=llama(7),
        args=args,
        train_dataset=CacheRowDataset(str(cache), split=("train", 0.25)).to_hf(),
        data_collator=CacheCollator(str(cache)),
        processing_class=tokenizer,
        kd=KDArguments(loss="kl"),
    )


def test_sft_trainer_distils(cache: Path, tmp_path: Path, tokenizer: Any) -> None:
    t = sft(cache, tmp_path, tokenizer)
    before = t.evaluate_cache(0.25)["kl"]
    t.train()
    after = t.evaluate_cache(0.25)["kl"]
    assert after < 0.9 * before, (before, after)


def test_sft_trainer_refuses_another_tokenizer(cache: Path, tmp_path: Path) -> None:
    other = build_tiny_tokenizer(vocab_size=280)
    with pytest.raises(ConfigError, match="tokenizer mismatch"):
        sft(cache, tmp_path, other)
