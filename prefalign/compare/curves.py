"""What the summary reads out of the runs as points with intervals: the online arms' held-out over-optimisation
curves (gold and proxy against KL during training) and the ``--sweep`` frontier.

A curve point is the mean over seeds with a 95% t-interval across them (`prefalign.compare.stats.seed_interval`):
the runs log only each point's mean over the held-out prompts, and every seed evaluates the same prompts with the
same random numbers, so this interval holds the seeds' variance, not the prompts'. A sweep point is read from the
evaluation's completions like every arm's result, with the crossed interval over seeds and prompts
(`prefalign.compare.stats.mean_interval`), so a policy in both the sweep and the results table has one interval.
Each interval is ``{"mean": float, "low": float, "high": float}``; one seed of a curve gives low = high = mean.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from prefalign.compare.arms import ARMS, Arm, selected_arms, sweep_runs
from prefalign.compare.plan import seed_dir
from prefalign.compare.stats import REFERENCE_POLICY, START, from_completions, mean_interval, policy_name, seed_interval

if TYPE_CHECKING:
    from prefalign.compare.config import ResolvedConfig

HELDOUT_KEYS = {"gold": "heldout/gold", "proxy": "heldout/proxy", "kl": "heldout/kl"}
"""The held-out evaluation's metrics an online run logs while it trains (`prefalign ppo --heldout-every`)."""


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file. Lines end at "\\n" alone: `prefalign.runio.write_jsonl` keeps U+2028, U+2029
    and U+0085 raw inside strings (a prompt's text), where ``str.splitlines`` would break a row."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def _interval(values: list[float]) -> dict:
    return seed_interval(values).to_dict()


def heldout_points(rows: list[dict]) -> dict[int, dict[str, float]]:
    """``{step: {"gold", "proxy", "kl"}}`` of one run's metrics rows that carry a held-out evaluation.

    A row with a non-finite value (metrics.jsonl holds it as the string ``"nan"`` or ``"inf"``) is no point: a seed
    interval cannot take it, and the summary is read after the whole race trained, so the curve loses that step
    rather than the race its report."""
    points = {}
    for row in rows:
        if all(key in row for key in HELDOUT_KEYS.values()):
            point = {name: float(row[key]) for name, key in HELDOUT_KEYS.items()}
            if all(math.isfinite(value) for value in point.values()):
                points[int(row["step"])] = point
    return points


def overoptimisation(cfg: ResolvedConfig, out: Path, seeds: list[int]) -> list[dict]:
    """Per online arm (in ``--arms`` order), its held-out points at the steps every seed evaluated:
    ``{"arm", "points": [{"step", "gold", "proxy", "proxy_gain", "kl"}]}``, each value a seed interval.

    ``proxy_gain`` is each seed's proxy score minus its own at the first point (step 0): every seed trains its own
    reward model, whose scale and offset are arbitrary (a Bradley-Terry score is defined up to a constant), so raw
    proxy scores of different seeds are not on one scale while their gains are."""
    curves = []
    for name in cfg.arms:
        if not ARMS[name].family.online:
            continue
        runs = [heldout_points(read_jsonl(seed_dir(out, seed) / name / "metrics.jsonl")) for seed in seeds]
        steps = sorted(set.intersection(*(set(run) for run in runs))) if runs else []
        points = [
            {
                "step": step,
                **{key: _interval([run[step][key] for run in runs]) for key in HELDOUT_KEYS},
                "proxy_gain": _interval([run[step]["proxy"] - run[steps[0]]["proxy"] for run in runs]),
            }
            for step in steps
        ]
        if points:
            curves.append({"arm": name, "points": points})
    return curves


def sweep_points(cfg: ResolvedConfig, out: Path, seeds: list[int]) -> list[dict]:
    """The frontier of every swept arm: its sweep runs, then (arms in name order) its own setting, read from each
    seed's evaluation completions. Gold and KL are crossed intervals over seeds and prompts (``gold_mean`` /
    ``kl_mean``: their means)."""
    points = [(arm, float(value), name) for name, arm, value in sweep_runs(cfg)]
    for arm in sorted(selected_arms(cfg), key=lambda arm: arm.name):
        if arm.sweep is not None:
            points.append((arm, arm.sweep.base(cfg), arm.name))
    if not points:
        return []
    names = [name for _, _, name in points]
    scores = from_completions(policy_rows(out, seeds, names), [START, *names], seeds)
    return [_sweep_point(arm, value, scores[name]) for arm, value, name in points]


def policy_rows(out: Path, seeds: list[int], policies: list[str]) -> list[dict]:
    """Every evaluated completion of ``policies`` (renamed ``NAME/seed-S``) and of the start (``reference``, taken
    from the first seed's evaluation: the others hold the same completions)."""
    rows = []
    for index, seed in enumerate(seeds):
        for row in read_jsonl(seed_dir(out, seed) / "eval" / "completions.jsonl"):
            if row["policy"] == REFERENCE_POLICY and index == 0:
                rows.append(row)
            elif row["policy"] in policies:
                rows.append({**row, "policy": policy_name(row["policy"], seed)})
    return rows


def _sweep_point(arm: Arm, value: float, scores) -> dict:
    assert arm.sweep is not None, f"{arm.name} has no sweep"  # only swept arms have frontier points
    gold, kl = mean_interval(scores.gold_per_prompt).to_dict(), mean_interval(scores.kl_per_prompt).to_dict()
    return {
        "arm": arm.name,
        "param": arm.sweep.param,
        "value": value,
        "gold_mean": gold["mean"],
        "kl_mean": kl["mean"],
        "gold": gold,
        "kl": kl,
    }
