"""``prefalign rl``: critic-free online RL (GRPO, Dr. GRPO, RLOO, REINFORCE++; DAPO's clip-higher, dynamic
sampling and overlong reward shaping) against one or more reward sources, K completions per prompt, no value model.

Examples::

    prefalign rl --estimator grpo --num-generations 4 --prompts prompts.txt --reward runs/rm/final --output runs/grpo
    prefalign rl --estimator dr_grpo --kl-in-loss --prompts prompts.txt --reward vader --output runs/dr-grpo
    prefalign rl --estimator rloo --prompts prompts.jsonl --reward vader --reward mymod:fn --reward-weights 1.0 0.5 \\
        --output runs/rloo
    prefalign rl --estimator grpo --clip-eps-low 0.2 --clip-eps-high 0.28 --loss-agg token_mean \\
        --dynamic-sampling --overlong-buffer 16 --prompts prompts.txt --reward mymod:fn --output runs/dapo  # DAPO
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from prefalign.cli._args import train_command
    from prefalign.trainers.rl import RLConfig, RLTrainer

    return train_command(
        RLConfig,
        RLTrainer,
        argv,
        "prefalign rl",
        __doc__,
        keys=("objective/scores", "objective/kl", "rl/group_score_std", "val/num_eos"),
        online=True,
    )
