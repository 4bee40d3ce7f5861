"""Paired statistics of a finished comparison, read from its evaluations' completions.

Every seed's evaluation samples the same held-out prompts with the same random numbers (keyed by prompt and sample,
base seed), and the starting policy is each evaluation's reference, so its completions are the same in every seed:
one matrix ``[seed, prompt]`` per arm and one row for the start line up prompt by prompt. Each interval is crossed
over seeds and prompts (`prefalign.compare.stats.crossed_interval`): how much a number could move with other prompts
and other training seeds.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from prefalign.compare.curves import policy_rows
from prefalign.compare.stats import START, PolicyScores, from_completions, mean_interval, paired_difference, win_rate


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
