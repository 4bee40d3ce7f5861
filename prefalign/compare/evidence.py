"""Paired statistics of a finished comparison, read from its evaluations' completions.

Every seed's evaluation samples the same held-out prompts with the same random numbers (keyed by prompt and sample,
base seed), and the starting policy is each evaluation's reference, so its completions are the same in every seed:
one matrix ``[seed, prompt]`` per arm and one row for the start line up prompt by prompt. Each interval is crossed
over seeds and prompts (`prefalign.compare.stats.crossed_interval`): how much a number could move with other prompts
and other training seeds. The held-out pairs that the reward model and DPO rank (verdict row 1) are read the same
way from each run's ``eval_pairs.jsonl``, a prompt's pairs grouped (`HeldOutPairs`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prefalign.compare.curves import policy_rows, read_jsonl
from prefalign.compare.stats import (
    START,
    Interval,
    PolicyScores,
    from_completions,
    grouped_interval,
    mean_interval,
    paired_difference,
    win_rate,
)
from prefalign.trainers.metrics import EVAL_PAIRS


@dataclass
class Evidence:
    scores: dict[str, PolicyScores]
    """By arm name (and ``start``): gold and KL ``(S, P, K)``, the start's ``(1, P, K)``."""
    intervals: dict[str, dict]
    """By arm name (and ``start``): ``{"gold_mean", "kl_mean", "win_rate"}``, each ``Interval.to_dict()``."""
    vs_start: dict[str, dict]
    """By trained arm: the paired ``gold`` gain over the start, ``kl`` to it and ``win_rate`` against it."""
    differences: list[dict]
    """Every pair of trained arms ``(a, b)`` in ``--arms`` order: paired ``gold`` and ``kl`` differences a - b and
    the head-to-head ``win_rate`` of a over b."""


def gather(out: Path, seeds: list[int], arms: list[str]) -> Evidence:
    """The paired statistics of ``arms`` (trained arm names) over ``seeds``."""
    scores = from_completions(policy_rows(out, seeds, arms), [START, *arms], seeds)
    start = scores[START]
    intervals, vs_start = {}, {}
    for name, score in scores.items():
        gold, kl = score.gold.mean(axis=-1), score.kl.mean(axis=-1)
        won = win_rate(score.gold, start.gold)
        intervals[name] = {
            "gold_mean": mean_interval(gold).to_dict(),
            "kl_mean": mean_interval(kl).to_dict(),
            "win_rate": won.to_dict(),
        }
        if name != START:
            vs_start[name] = {
                "gold": paired_difference(gold, start.gold.mean(axis=-1)).to_dict(),
                "kl": intervals[name]["kl_mean"],
                "win_rate": intervals[name]["win_rate"],
            }
    differences = [
        {
            "a": a,
            "b": b,
            "gold": paired_difference(scores[a].gold.mean(axis=-1), scores[b].gold.mean(axis=-1)).to_dict(),
            "kl": paired_difference(scores[a].kl.mean(axis=-1), scores[b].kl.mean(axis=-1)).to_dict(),
            "win_rate": win_rate(scores[a].gold, scores[b].gold).to_dict(),
        }
        for a, b in itertools.combinations(arms, 2)
    ]
    return Evidence(scores, intervals, vs_start, differences)


@dataclass(frozen=True)
class HeldOutPairs:
    """Row 1's evidence pair by pair: which held-out pairs each seed's reward model and DPO ranked right."""

    prompts: tuple[str, ...]
    """(N,): each pair's prompt; a prompt's pairs are drawn together (`prefalign.trainers.data.split_eval`)."""
    rm: np.ndarray
    """(S, N): 1.0 where the reward model scored the chosen completion above the rejected one, else 0.0."""
    dpo: np.ndarray
    """(S, N): the same for DPO's implicit reward."""

    def accuracy(self, which: str) -> Interval:
        """The held-out pair accuracy of ``rm`` or ``dpo``, interval over seeds and prompts."""
        return grouped_interval(getattr(self, which), self.prompts, bounds=(0.0, 1.0))

    def difference(self) -> Interval:
        """DPO's accuracy minus the reward model's, paired by seed and pair, interval over seeds and prompts."""
        return grouped_interval(self.dpo - self.rm, self.prompts, bounds=(-1.0, 1.0))


def heldout_pairs(rm_runs: list[Path], dpo_runs: list[Path]) -> HeldOutPairs | None:
    """Row 1's pairs from each seed's reward-model and DPO run directories (their ``eval_pairs.jsonl``, written by
    `prefalign.trainers.loop.Trainer.save_final_eval`), seed by seed; None where a run wrote none (a run of an
    older prefalign), where the runs did not hold out the same pairs, or where they come from fewer than 2
    prompts: row 1's interval is then over seeds alone."""
    runs = [run / EVAL_PAIRS for run in [*rm_runs, *dpo_runs]]
    if not runs or not all(path.is_file() for path in runs):
        return None
    tables = [read_jsonl(path) for path in runs]
    keys = [[(row["pair"], row["prompt"]) for row in rows] for rows in tables]
    if not keys[0] or any(k != keys[0] for k in keys) or len({prompt for _, prompt in keys[0]}) < 2:
        return None
    outcomes = np.array([[float(row["correct"]) for row in rows] for rows in tables])  # (2S, N)
    return HeldOutPairs(tuple(prompt for _, prompt in keys[0]), outcomes[: len(rm_runs)], outcomes[len(rm_runs) :])
