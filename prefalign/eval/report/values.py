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


def interval(arm: dict, key: str) -> tuple[float, float, float] | None:
    """``(mean, low, high)`` of an eval key's 95% interval (crossed over prompts and seeds), or None."""
    found = (arm.get("intervals") or {}).get(key) or {}
    values = (found.get("mean"), found.get("low"), found.get("high"))
    return values if all(is_number(value) for value in values) else None  # type: ignore[return-value]


def fmt_interval(found: dict | None, spec: str) -> str:
    """``mean [low, high]`` of an ``Interval.to_dict()``; "—" when missing."""
    found = found or {}
    if not all(is_number(found.get(key)) for key in ("mean", "low", "high")):
        return "—"
    return f"{found['mean']:{spec}} [{found['low']:{spec}}, {found['high']:{spec}}]"


def fmt_stat(arm: dict, key: str, spec: str) -> str:
    """``mean [low, high]`` where the summary has the key's interval, else ``mean ± std`` across seeds, else the
    value."""
    if interval(arm, key) is not None:
        return fmt_interval(arm["intervals"][key], spec)
    mean, std = stat(arm, key)
    if mean is None:
        return "—"
    return f"{mean:{spec}} ± {std:{spec.lstrip('+')}}" if std is not None else format(mean, spec)


def error_bar(arm: dict, key: str) -> tuple[float, list[list[float]] | float | None] | None:
    """``(centre, matplotlib error)`` of an eval key: the interval as asymmetric error where there is one, else
    the mean and its std across seeds (None: one seed); None when the key has no number."""
    found = interval(arm, key)
    if found is not None:
        mean, low, high = found
        return mean, [[mean - low], [high - mean]]
    centre, std = stat(arm, key)
    return None if centre is None else (centre, std)


def wall(arm: dict, part: str):
    """Wall seconds of one part of an arm's cost ("pairs", "reward_model", "policy", "total"), or None."""
    return ((arm.get("cost") or {}).get("wall_seconds") or {}).get(part)


def trained(arms: list[dict]) -> list[dict]:
    return [arm for arm in arms if arm["name"] != START]


def start_gold(arms: list[dict]) -> float | None:
    """The starting policy's mean gold score (None: no start arm, or no score)."""
    start = next((arm for arm in arms if arm["name"] == START), None)
    return stat(start, "gold_mean")[0] if start is not None else None
