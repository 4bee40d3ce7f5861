"""Reading numbers out of a summary's arms, the way every table and plot of the report reads them: a missing
or non-finite value is None (shown as "—"), and several seeds give a mean and a spread."""

from __future__ import annotations

import math
import statistics
from typing import TypeGuard

from prefalign.compare.arms import START

CURVE_METRICS = {
    "objective/scores": "PPO: mean reward of each rollout batch (the reward PPO optimises)",
    "rewards/margins": "DPO: mean implicit reward margin, chosen minus rejected",
    "loss": "training loss",
}


def is_number(value) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def fmt(value, spec: str = ".3f") -> str:
    return format(value, spec) if is_number(value) else "—"


def stat(arm: dict, key: str) -> tuple[float | None, float | None]:
    """``(mean, std across seeds)`` of an eval key; std is None with fewer than two seeds."""
    per_seed = [seed.get(key) for seed in arm.get("seeds") or []]
    if len(per_seed) > 1 and all(is_number(value) for value in per_seed):
        return statistics.fmean(per_seed), statistics.stdev(per_seed)
    value = arm["eval"].get(key)
    return (value if is_number(value) else None), None


def fmt_stat(arm: dict, key: str, spec: str) -> str:
    mean, std = stat(arm, key)
    if mean is None:
        return "—"
    return f"{mean:{spec}} ± {std:{spec.lstrip('+')}}" if std is not None else format(mean, spec)


def wall(arm: dict, part: str):
    """Wall seconds of one part of an arm's cost ("pairs", "reward_model", "policy", "total"), or None."""
    return ((arm.get("cost") or {}).get("wall_seconds") or {}).get(part)


def trained(arms: list[dict]) -> list[dict]:
    return [arm for arm in arms if arm["name"] != START]


def start_gold(arms: list[dict]) -> float | None:
    """The starting policy's mean gold score (None: no start arm, or no score)."""
    start = next((arm for arm in arms if arm["name"] == START), None)
    return stat(start, "gold_mean")[0] if start is not None else None
