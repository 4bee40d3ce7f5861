"""TRL 1.16 side of ``bench.quality`` (run with ``.bench/trl-1.16/bin/python``): one epoch, the final model saved.

    python bench/quality_trl.py --kind reward --train train.jsonl --model rm-init --out DIR --precision bf16 \
        --max-length 256 --threads 2

Same settings as the speed race's TRL runner (bench/run_trl.py: no gradient checkpointing, linear decay, no
warmup, no weight decay, clipping at 1.0) except that it runs ``num_train_epochs=1`` in TRL's own (shuffled,
seeded) order and saves ``DIR/final`` (the reward model, or the LoRA adapter). Prints ``BENCH_RESULT`` with
``train_rows`` (pairs TRL trained on after its length filter), ``losses`` and ``train_seconds``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# the repo root replaces this script's own folder on the path: bench/*.py must not shadow stdlib modules
sys.path[0] = str(Path(__file__).resolve().parent.parent)
from bench.common import HPARAMS, emit, quiet, setup_process, trl_training_args  # noqa: E402


def main(argv=None) -> None:
    quiet()
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", required=True, choices=("reward", "dpo_lora"))
    ap.add_argument("--train", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--precision", required=True, choices=("fp32", "bf16"))
    ap.add_argument("--max-length", type=int, required=True)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    setup_process(args.threads)
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    rows = [json.loads(line) for line in Path(args.train).read_text(encoding="utf-8").splitlines() if line.strip()]
    ds = Dataset.from_list(rows)
    common = dict(
        output_dir=str(Path(args.out) / "trainer"),
        per_device_train_batch_size=HPARAMS["batch_size"],
        gradient_accumulation_steps=1,
        num_train_epochs=1,
        max_length=args.max_length,
        **trl_training_args(args.precision),
    )
    tok = AutoTokenizer.from_pretrained(args.model)
    if args.kind == "reward":
        from trl import RewardConfig, RewardTrainer

        model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=1, dtype=torch.float32)
        cfg = RewardConfig(learning_rate=HPARAMS["lr_reward"], **common)
        trainer = RewardTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok)
    else:
        from peft import LoraConfig
        from trl import DPOConfig, DPOTrainer

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        cfg = DPOConfig(learning_rate=HPARAMS["lr_dpo_lora"], beta=HPARAMS["beta"], loss_type=["sigmoid"], **common)
        peft = LoraConfig(
            r=HPARAMS["lora_r"],
            lora_alpha=HPARAMS["lora_alpha"],
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
        trainer = DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=peft)
    train_rows = len(trainer.train_dataset)
    t = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t
    trainer.save_model(str(Path(args.out) / "final"))
    tok.save_pretrained(str(Path(args.out) / "final"))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    emit({"side": "trl", "kind": args.kind, "train_rows": train_rows, "losses": losses, "train_seconds": seconds})


if __name__ == "__main__":
    main()
