"""``prefalign ppo``: optimise a policy with PPO against a reward model, a judge or a Python function.

Examples::

    prefalign ppo --prompts prompts.txt --reward runs/rm/final --output runs/ppo  # reward model from `prefalign reward`
    prefalign ppo --prompts ../shared/data/rt-polarity/rt-polarity.neg --reward vader \\
        --max-new-tokens 24 --rollout-batch-size 8 --max-steps 20 --output runs/ppo-vader
    prefalign ppo --prompts prompts.jsonl --reward mymodule:score --lora-r 16 --learning-rate 1e-4 --output runs/ppo
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from prefalign.cli._args import train_command
    from prefalign.trainers.ppo import PPOConfig, PPOTrainer

    return train_command(
        PPOConfig,
        PPOTrainer,
        argv,
        "prefalign ppo",
        __doc__,
        keys=("objective/scores", "objective/kl", "objective/rlhf_reward", "val/num_eos"),
        online=True,
    )
