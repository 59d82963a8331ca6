"""One KDTrainer run, for ``test_ddp.py``: ``python ddp_worker.py CACHE OUT BATCH`` (or under
torchrun); rank 0 writes the logged step losses to ``OUT/losses.json``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kd_cache import llama
from transformers import TrainingArguments

from logitcache.integrations.rows import CacheCollator, CacheRowDataset
from logitcache.integrations.transformers import KDArguments, KDTrainer


def main() -> None:
    cache, out, batch = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=batch,
        max_steps=6,
        learning_rate=5e-3,
        seed=0,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    t = KDTrainer(
        model=llama(7),
        args=args,
        train_dataset=CacheRowDataset(cache),
        data_collator=CacheCollator(cache),
        kd=KDArguments(),
    )
    t.train()
    if t.accelerator.is_main_process:
        losses = [h["loss"] for h in t.state.log_history if "loss" in h]
        (out / "losses.json").write_text(json.dumps(losses))


if __name__ == "__main__":
    main()
