"""The comparison's summary: every arm's held-out evaluation, costs and training curve, the sweep and some
sample completions, read from the finished runs (the schema is in `prefalign.eval.report`)."""

from __future__ import annotations

import datetime
import json
import statistics
from pathlib import Path
from typing import TYPE_CHECKING

from prefalign.compare.arms import ARMS, START, START_LABEL, Arm, selected_arms, sweep_runs
from prefalign.compare.plan import seed_dir
from prefalign.compare.stages import StageResult
from prefalign.runio import to_plain
from prefalign.trackers import TrackedRun, open_trackers

if TYPE_CHECKING:
    from prefalign.compare.config import ResolvedConfig

EVAL_KEYS = ("gold_mean", "gold_std", "proxy_mean", "kl_mean", "kl_std", "win_rate", "length_mean", "eos_rate", "n")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def summarize(cfg: ResolvedConfig, out: Path, results: dict[str, StageResult]) -> dict:
    """The summary of a finished comparison of the resolved ``cfg`` in ``out``; ``results``: every stage's
    measured run, by stage name."""
    seeds = [cfg.seed + index for index in range(cfg.seeds)]
    evals = {seed: json.loads((seed_dir(out, seed) / "eval" / "eval.json").read_text()) for seed in seeds}
    costs = _Costs(cfg, out, results)
    arms = []
    for name in [START, *cfg.arms]:
        per_seed = [_eval_of(evals[seed], name) for seed in seeds]
        arm = {
            "name": name,
            "label": START_LABEL if name == START else ARMS[name].label,
            "eval": mean_over_seeds(per_seed),
            "cost": mean_over_seeds([costs.of(ARMS.get(name), seed) for seed in seeds]),
        }
        if len(seeds) > 1:
            arm["seeds"] = per_seed
        if name != START:
            arm["curve_metric"], arm["curve"] = _curve(out, ARMS[name], seeds[0])
        arms.append(arm)
    return {
        "title": "PPO-RLHF vs DPO",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": dict(vars(cfg)),
        "arms": arms,
        "sweep": _sweep_points(cfg, evals[seeds[0]]) if cfg.sweep else [],
        "samples": _samples(cfg, out, seeds[0]),
    }


def log_summary(cfg: ResolvedConfig, out: Path, summary: dict) -> None:
    """The race's own entry in the --report-to trackers (in ``out``, beside the stages' runs): a ``results`` table,
    one row per arm: its held-out gold score, KL to the reference, win rate and total wall seconds."""
    rows = [
        {
            "arm": arm["name"],
            **{key: arm["eval"].get(key) for key in ("gold_mean", "kl_mean", "win_rate")},
            "wall_seconds": (arm.get("cost") or {}).get("wall_seconds", {}).get("total"),
        }
        for arm in summary["arms"]
    ]
    for tracker in open_trackers(cfg.trackers, TrackedRun(out, cfg.output, to_plain(cfg))):
        tracker.log_table(0, "results", rows)
        tracker.close()


def _eval_of(evaluation: dict, name: str) -> dict:
    scores = evaluation["policies"][name]
    return {key: scores.get(key) for key in EVAL_KEYS}


def _sweep_points(cfg: ResolvedConfig, evaluation: dict) -> list[dict]:
    """The frontier of every swept arm: its sweep runs, then (arms in name order) its own setting."""
    points = [_sweep_point(arm, float(value), _eval_of(evaluation, name)) for name, arm, value in sweep_runs(cfg)]
    for arm in sorted(selected_arms(cfg), key=lambda arm: arm.name):
        if arm.sweep is not None:
            points.append(_sweep_point(arm, arm.sweep.base(cfg), _eval_of(evaluation, arm.name)))
    return points


def _sweep_point(arm: Arm, value: float, scores: dict) -> dict:
    assert arm.sweep is not None, f"{arm.name} has no sweep"  # only swept arms have frontier points
    return {
        "arm": arm.name,
        "param": arm.sweep.param,
        "value": value,
        "gold_mean": scores["gold_mean"],
        "kl_mean": scores["kl_mean"],
    }


class _Costs:
    """What an arm cost: its stages' wall time and peak memory, plus the shared pair making when it trains
    on the pairs; tokens generated, gradient steps, pairs used, reward-model accuracy."""

    def __init__(self, cfg: ResolvedConfig, out: Path, results: dict[str, StageResult]):
        self.cfg = cfg
        self.out = out
        self.results = results
        self.pairs_run = results["pairs"]
        self.pairs_tokens = json.loads((out / "pairs" / "metrics.json").read_text())["new_tokens"]

    def of(self, arm: Arm | None, seed: int) -> dict:
        """One seed's cost of ``arm`` (None: the starting policy, which cost nothing)."""
        if arm is None:
            return {
                "wall_seconds": {"pairs": 0.0, "reward_model": 0.0, "policy": 0.0, "total": 0.0},
                "peak_rss_mb": 0.0,
                "tokens_generated": 0,
                "gradient_steps": 0,
                "pairs_used": 0,
                "rm_heldout_accuracy": None,
            }
        runs = {stage.charged_as: (stage, self.results[f"seed-{seed}/{stage.name}"]) for stage in arm.stages}
        policy = runs["policy"][1]
        reward_model = runs["reward_model"][1] if "reward_model" in runs else None
        uses_pairs = any(stage.trains_on_pairs for stage in arm.stages)
        wall = {
            "pairs": self.pairs_run.wall_seconds if uses_pairs else 0.0,
            "reward_model": reward_model.wall_seconds if reward_model else 0.0,
            "policy": policy.wall_seconds,
        }
        wall["total"] = round(sum(wall.values()), 3)
        measured = [policy] + ([reward_model] if reward_model else []) + ([self.pairs_run] if uses_pairs else [])
        tokens = self.pairs_tokens if uses_pairs else 0
        if arm.family.online:
            rows = read_jsonl(Path(policy.out_dir) / "metrics.jsonl")
            tokens += int(sum(row["val/response_length"] * self.cfg.ppo_rollout_batch for row in rows))
        pairs_used = max(
            (
                _pairs_seen(Path(run.out_dir), stage.steps(self.cfg))
                for stage, run in runs.values()
                if stage.trains_on_pairs
            ),
            default=0,
        )
        return {
            "wall_seconds": wall,
            "peak_rss_mb": max(run.peak_rss_mb for run in measured),
            "tokens_generated": tokens,
            "gradient_steps": sum(stage.steps(self.cfg) for stage in arm.stages),
            "pairs_used": pairs_used,
            "rm_heldout_accuracy": _heldout_accuracy(reward_model),
        }


def _pairs_seen(run_dir: Path, steps: int) -> int:
    info = json.loads((run_dir / "run.json").read_text())
    return min(info["train_examples"], steps * info["global_batch"])


def _heldout_accuracy(reward_model: StageResult | None) -> float | None:
    """The reward model's last held-out pair accuracy (None: no reward model, or it never evaluated)."""
    if reward_model is None:
        return None
    evaluations = [row for row in read_jsonl(Path(reward_model.out_dir) / "metrics.jsonl") if "eval/accuracy" in row]
    return evaluations[-1]["eval/accuracy"] if evaluations else None


def _curve(out: Path, arm: Arm, seed: int) -> tuple[str, list[dict]]:
    key = arm.family.curve_metric
    rows = read_jsonl(seed_dir(out, seed) / arm.name / "metrics.jsonl")
    return key, [
        {"step": row["step"], "wall_seconds": row["wall_seconds"], "metric": row[key]} for row in rows if key in row
    ]


def _samples(cfg: ResolvedConfig, out: Path, seed: int, count: int = 6) -> list[dict]:
    """The first ``count`` held-out prompts with every shown policy's first completion and its gold score."""
    shown = {START, *cfg.arms}
    rows = read_jsonl(seed_dir(out, seed) / "eval" / "completions.jsonl")
    by_prompt: dict[str, dict] = {}
    for row in rows:
        if row.get("sample", 0) != 0 or row["policy"] not in shown:
            continue
        entry = by_prompt.setdefault(row["prompt"], {"prompt": row["prompt"], "completions": {}, "gold": {}})
        entry["completions"][row["policy"]] = row["completion"]
        entry["gold"][row["policy"]] = row["gold"]
    return list(by_prompt.values())[:count]


def mean_over_seeds(items: list[dict]) -> dict:
    """Mean of numeric leaves across seeds (nested dicts kept); one seed: itself."""
    if len(items) == 1:
        return items[0]
    mean: dict = {}
    for key, value in items[0].items():
        if isinstance(value, dict):
            mean[key] = mean_over_seeds([item[key] for item in items])
        elif (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and all(item[key] is not None for item in items)
        ):
            mean[key] = statistics.fmean(item[key] for item in items)
        else:
            mean[key] = value
    return mean
