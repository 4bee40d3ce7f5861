"""The built-in tasks of `prefalign compare --task`: which packaged prompts the race trains and evaluates on, and
which gold judge scores them. A task is only defaults: --train-prompts, --heldout-prompts and --judge override
each part (docs/tasks.md).

Adding a task is one `Task` entry here, its two prompt files in `prefalign.resources` and, if no existing
judge fits, a judge in `prefalign.rewards.JUDGES`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    """One row of the task table."""

    name: str
    """What --task takes."""
    description: str
    """One line for the help and the docs: what the policy sees and what the judge scores."""
    train: str
    """Packaged file (`prefalign.resources`) of the training prompts: pair making, PPO and RL rollouts."""
    heldout: str
    """Packaged file of the evaluation prompts; it shares no prompt with ``train``."""
    judge: str
    """The gold judge (`prefalign.rewards.JUDGES`), what --judge means when it is not given."""


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            "sentiment",
            "controlled sentiment generation (the DPO paper's first experiment, offline): continue a movie-review "
            "prefix; gold = VADER compound score of the continuation, in [-1, 1]",
            "movie_prefixes_train.txt",
            "movie_prefixes_heldout.txt",
            "vader",
        ),
        Task(
            "arithmetic",
            "addition of two integers from 1 to 25 after two solved lines, in plain completion; gold = 1 if the first "
            "integer of the completion's first line is the sum, else 0",
            "arithmetic_train.jsonl",
            "arithmetic_heldout.jsonl",
            "arithmetic",
        ),
    )
}
"""The tasks by name; the first is the default of --task."""


def tasks_help() -> str:
    """The --task help: every task with its description."""
    return "Built-in task (default prompts and gold judge): " + "; ".join(
        f"{task.name}: {task.description}" for task in TASKS.values()
    )
