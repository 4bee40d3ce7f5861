"""``prefalign dpo``: align a policy with DPO on preference pairs, no reward model.

Examples::

    prefalign dpo --data pairs.jsonl --output runs/dpo                        # embedded default model
    prefalign dpo --data ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz --eval-split 0.1 \\
        --lora-r 16 --learning-rate 5e-5 --max-steps 100 --output runs/dpo-hh
    prefalign dpo --data pairs.jsonl --loss-type reference_free --beta 1 --output runs/dpo-rf
    prefalign dpo --data pairs.jsonl --loss-type simpo --beta 2 --simpo-gamma 1 --output runs/simpo
    prefalign dpo --data pairs.jsonl --loss-type orpo --orpo-lambda 0.1 --output runs/orpo
    prefalign dpo --config dpo.yaml --resume latest
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from prefalign.cli._args import train_command
    from prefalign.trainers.dpo import DPOConfig, DPOTrainer

    return train_command(
        DPOConfig,
        DPOTrainer,
        argv,
        "prefalign dpo",
        __doc__,
        keys=("loss", "rewards/accuracies", "rewards/margins"),
        prefixes=("eval/",),
    )
