"""What the summary reads out of the training runs as points with seed intervals: the online arms' held-out
over-optimisation curves (gold and proxy against KL during training) and the ``--sweep`` frontier.

Each point is the mean over seeds with a 95% t-interval across them (`prefalign.compare.stats.seed_interval`):
``{"mean": float, "low": float, "high": float}``; one seed gives low = high = mean.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from prefalign.compare.arms import ARMS, Arm, selected_arms, sweep_runs
from prefalign.compare.plan import seed_dir
from prefalign.compare.stats import seed_interval

if TYPE_CHECKING:
    from prefalign.compare.config import ResolvedConfig

HELDOUT_KEYS = {"gold": "heldout/gold", "proxy": "heldout/proxy", "kl": "heldout/kl"}
"""The held-out evaluation's metrics an online run logs while it trains (`prefalign ppo --heldout-every`)."""


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _interval(values: list[float]) -> dict:
    return seed_interval(values).to_dict()


def heldout_points(rows: list[dict]) -> dict[int, dict[str, float]]:
    """``{step: {"gold", "proxy", "kl"}}`` of one run's metrics rows that carry a held-out evaluation."""
    points = {}
    for row in rows:
        if all(key in row for key in HELDOUT_KEYS.values()):
            points[int(row["step"])] = {name: float(row[key]) for name, key in HELDOUT_KEYS.items()}
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


def sweep_points(cfg: ResolvedConfig, evals: dict[int, dict]) -> list[dict]:
    """The frontier of every swept arm: its sweep runs, then (arms in name order) its own setting; ``evals``: each
    seed's eval.json. Gold and KL are seed intervals (``gold_mean`` / ``kl_mean``: their means)."""
    points = [_sweep_point(arm, float(value), name, evals) for name, arm, value in sweep_runs(cfg)]
    for arm in sorted(selected_arms(cfg), key=lambda arm: arm.name):
        if arm.sweep is not None:
            points.append(_sweep_point(arm, arm.sweep.base(cfg), arm.name, evals))
    return points


def _sweep_point(arm: Arm, value: float, policy: str, evals: dict[int, dict]) -> dict:
    assert arm.sweep is not None, f"{arm.name} has no sweep"  # only swept arms have frontier points
    per_seed = [evaluation["policies"][policy] for evaluation in evals.values()]
    gold = _interval([scores["gold_mean"] for scores in per_seed])
    kl = _interval([scores["kl_mean"] for scores in per_seed])
    return {
        "arm": arm.name,
        "param": arm.sweep.param,
        "value": value,
        "gold_mean": gold["mean"],
        "kl_mean": kl["mean"],
        "gold": gold,
        "kl": kl,
    }
