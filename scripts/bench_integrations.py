"""The Hugging Face Trainer adapter against ``logitcache train``, same rows, side by side.

One tiny top-k cache of a peaked tiny Llama teacher (``tests/integrations/kd_cache.py``), one
saved student; then, in the same process:

1. ``logitcache train`` (``run_train``): ``--steps`` steps, batch 8, AdamW lr 5e-3 (weight decay
   0.01 on every parameter), cosine to 0.1 x lr, clip 1.0, ``order="random"``, seed 0, 25% of
   the rows held out; its final held-out KL;
2. ``KDTrainer`` (``logitcache.integrations.transformers``) on the same rows in the same order
   (``KDArguments(order="random")``: the trainer's own sampler), the same optimizer (passed in:
   the Trainer's default groups exempt norms from weight decay), the Trainer's
   ``cosine_with_min_lr`` schedule (the same formula), ``max_grad_norm=1.0``, seed 0,
   ``remove_unused_columns=True``; its final held-out KL measured by the same function on the
   same rows (``KDTrainer.evaluate_cache``).

``hf_trainer_kl_ratio`` = (2) / (1), target <= 1.02. On CPU both runs are deterministic and the
step losses agree to float32 rounding, so the ratio is 1.000 (measured). Also reported: the
first KL before training (the drop shows that both distil), the largest relative step-loss
difference, and both runs' steps/s (the Trainer's overheads at this tiny size are per-step
Python, not the loss).

Usage: ``python scripts/bench_integrations.py [--steps 30]``; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaForCausalLM, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integrations"))
from kd_cache import dump_tiny, llama, teacher

from logitcache.integrations.rows import CacheCollator, CacheRowDataset
from logitcache.integrations.transformers import KDArguments, KDTrainer
from logitcache.train import TrainConfig, run_train

HELD_OUT, BATCH, LR = 0.25, 8, 5e-3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rows", type=int, default=128)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        cache, student = d / "cache", d / "student"
        dump_tiny(teacher(), cache, rows=a.rows, seed=0)
        llama(7).save_pretrained(student)

        t0 = time.perf_counter()
        ref = run_train(
            TrainConfig(
                cache=str(cache),
                out=str(d / "lt"),
                student=str(student),
                batch_size=BATCH,
                max_steps=a.steps,
                lr=LR,
                eval_fraction=HELD_OUT,
                order="random",
                progress=False,
            )
        )
        lt_s = time.perf_counter() - t0

        model = LlamaForCausalLM.from_pretrained(student, dtype=torch.float32)
        args = TrainingArguments(
            output_dir=str(d / "hf"),
            per_device_train_batch_size=BATCH,
            max_steps=a.steps,
            learning_rate=LR,
            lr_scheduler_type="cosine_with_min_lr",
            lr_scheduler_kwargs={"min_lr_rate": 0.1},
            max_grad_norm=1.0,
            seed=0,
            report_to=[],
            save_strategy="no",
            logging_steps=1,
            use_cpu=True,
            disable_tqdm=True,
            remove_unused_columns=True,
        )
        trainer = KDTrainer(
            model=model,
            args=args,
            train_dataset=CacheRowDataset(str(cache), split=("train", HELD_OUT)),
            data_collator=CacheCollator(str(cache)),
            optimizers=(torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01), None),
            kd=KDArguments(loss="kl", order="random"),
        )
        before = trainer.evaluate_cache(HELD_OUT)["kl"]
        t0 = time.perf_counter()
        trainer.train()
        hf_s = time.perf_counter() - t0
        after = trainer.evaluate_cache(HELD_OUT)["kl"]
    hf_losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    rel = max(abs(x - y) / abs(y) for x, y in zip(hf_losses, ref["losses"], strict=True))
    lt_kl = ref["eval"]["kl"]
    print(f"held-out KL before training      {before:.5f}")
    print(f"logitcache train, {a.steps} steps       {lt_kl:.5f}   {a.steps / lt_s:.1f} steps/s")
    print(f"HF Trainer adapter, {a.steps} steps     {after:.5f}   {a.steps / hf_s:.1f} steps/s")
    print(
        json.dumps(
            {
                "hf_trainer_kl_ratio": round(after / lt_kl, 5),
                "hf_trainer_final_kl": after,
                "logitcache_train_final_kl": lt_kl,
                "kl_before": before,
                "step_loss_max_rel_diff": rel,
                "steps": a.steps,
                "hf_steps_per_s": a.steps / hf_s,
                "logitcache_steps_per_s": a.steps / lt_s,
                "device": "cpu",
            }
        )
    )


if __name__ == "__main__":
    main()
