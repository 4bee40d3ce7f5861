"""``prefalign sft``: supervised fine-tuning with the loss on completion tokens only.

The usual way to make the starting policy for DPO and PPO. Data: prompt/completion rows, or preference
data (its chosen side is the completion).

Examples::

    prefalign sft --data sft.jsonl --output runs/sft
    prefalign sft --data pairs.jsonl --lora-r 16 --learning-rate 1e-4 --max-steps 200 --output runs/sft
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from prefalign.cli._args import train_command
    from prefalign.trainers.sft import SFTConfig, SFTTrainer

    return train_command(SFTConfig, SFTTrainer, argv, "prefalign sft", __doc__, keys=("loss",), prefixes=("eval/",))
