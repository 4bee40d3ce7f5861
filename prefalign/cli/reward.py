"""``prefalign reward``: train a reward model (a scalar head on --model) on preference pairs.

The reward is read at the completion's last token before its EOS (training hides the final EOS): the token that
Hugging Face's own sequence-classification forward pools when pad == EOS, and the last token of the decoded text
that PPO, prefs and eval score. `prefalign.rewards` (``--reward <output>/final``) pools the last real token, so
give it completions without the EOS text.

Examples::

    prefalign reward --data pairs.jsonl --output runs/rm                      # embedded default model
    prefalign reward --data ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz --eval-split 0.1 \\
        --center-rewards-coef 0.01 --max-steps 200 --output runs/rm-hh
    prefalign reward --data pairs.jsonl --lora-r 16 --learning-rate 1e-4 --merge-lora --output runs/rm-lora
    prefalign reward --config reward.yaml --resume latest
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from prefalign.cli._args import train_command
    from prefalign.trainers.reward import RewardConfig, RewardTrainer

    return train_command(
        RewardConfig,
        RewardTrainer,
        argv,
        "prefalign reward",
        __doc__,
        keys=("loss", "accuracy", "margin"),
        prefixes=("eval/",),
    )
