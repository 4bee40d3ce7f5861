"""The comparison's summary: every arm's held-out evaluation, costs and training curve, the sweep and some
sample completions, read from the finished runs (the schema is in `prefalign.eval.report`)."""

from __future__ import annotations

import datetime
import json
import math
import statistics
from pathlib import Path
from typing import TYPE_CHECKING

from prefalign.compare.arms import ARMS, START, START_LABEL, Arm
from prefalign.compare.curves import overoptimisation, read_jsonl, sweep_points
from prefalign.compare.evidence import Evidence, HeldOutPairs, gather, heldout_pairs
from prefalign.compare.plan import seed_dir
from prefalign.compare.stages import StageResult
from prefalign.compare.stats import REFERENCE_POLICY
from prefalign.compare.verdict import verdict_inputs, verdict_rows
from prefalign.eval.report.values import trained
from prefalign.runio import to_plain
from prefalign.trackers import TrackedRun, open_trackers

if TYPE_CHECKING:
    from prefalign.compare.config import ResolvedConfig

EVAL_KEYS = ("gold_mean", "gold_std", "proxy_mean", "kl_mean", "kl_std", "win_rate", "length_mean", "eos_rate", "n")


def summarize(cfg: ResolvedConfig, out: Path, results: dict[str, StageResult]) -> dict:
    """The summary of a finished comparison of the resolved ``cfg`` in ``out``; ``results``: every stage's
    measured run, by stage name."""
    seeds = [cfg.seed + index for index in range(cfg.seeds)]
    evals = {seed: json.loads((seed_dir(out, seed) / "eval" / "eval.json").read_text()) for seed in seeds}
    costs = _Costs(cfg, out, results)
    evidence = gather(out, seeds, list(cfg.arms))
    arms = []
    for name in [START, *cfg.arms]:
        policy = REFERENCE_POLICY if name == START else name  # the start is every evaluation's reference
        per_seed = [_eval_of(evals[seed], policy) for seed in seeds]
        seed_costs = [costs.of(ARMS.get(name), seed) for seed in seeds]
        arm = {
            "name": name,
            "label": START_LABEL if name == START else ARMS[name].label,
            "eval": mean_over_seeds(per_seed),
            "intervals": evidence.intervals[name],
            "cost": mean_over_seeds(seed_costs),
        }
        if len(seeds) > 1:
            arm["seeds"] = per_seed
            arm["seed_costs"] = seed_costs
        if name != START:
            arm["vs_start"] = evidence.vs_start[name]
            arm["curve_metric"], arm["curve"] = _curve(out, ARMS[name], seeds[0])
        arms.append(arm)
    summary = {
        "title": "PPO-RLHF vs DPO",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": dict(vars(cfg)),
        "arms": arms,
        "differences": evidence.differences,
        "overoptimisation": overoptimisation(cfg, out, seeds),
        "sweep": sweep_points(cfg, out, seeds) if cfg.sweep else [],
        "samples": _samples(cfg, out, seeds[0]),
    }
    summary["verdict"] = verdict_of(summary, evidence, _heldout_pairs(cfg, results, seeds))
    return summary


def _heldout_pairs(cfg: ResolvedConfig, results: dict[str, StageResult], seeds: list[int]) -> HeldOutPairs | None:
    """Each seed's reward model (the PPO-RLHF arm's) and DPO policy on every held-out pair (`heldout_pairs`)."""
    if not {"ppo", "dpo"} <= set(cfg.arms):
        return None
    stage = {arm: next(s.name for s in ARMS[arm].stages if s.charged_as == part) for arm, part in RANKERS.items()}
    runs = {arm: [Path(results[f"seed-{seed}/{stage[arm]}"].out_dir) for seed in seeds] for arm in RANKERS}
    return heldout_pairs(runs["ppo"], runs["dpo"])


RANKERS = {"ppo": "reward_model", "dpo": "policy"}
"""Row 1's two rankers of held-out pairs: the PPO-RLHF arm's reward model and the DPO arm's policy."""


def verdict_of(summary: dict, evidence: Evidence, pairs: HeldOutPairs | None = None) -> list[dict]:
    """The verdict per claim of the PPO-RLHF vs DPO table (`prefalign.compare.verdict`), from every arm's per-seed
    costs, the evaluation's paired scores and the held-out pairs' outcomes (``pairs``; None: row 1's interval is
    over seeds alone); [] without a PPO-RLHF and a DPO arm."""
    costs, rm_accuracy, dpo_accuracy = {}, [], []
    for arm in trained(summary["arms"]):
        seed_costs = arm.get("seed_costs") or [arm["cost"]]
        costs[arm["name"]] = [
            {
                **cost,
                "wall_seconds": cost["wall_seconds"]["total"],
                "rm_wall_seconds": cost["wall_seconds"]["reward_model"],
                "rm_gradient_steps": cost["rm_gradient_steps"],
            }
            for cost in seed_costs
        ]
        if arm["name"] == "ppo":
            rm_accuracy = [cost["rm_heldout_accuracy"] for cost in seed_costs]
        if arm["name"] == "dpo":
            dpo_accuracy = [cost["implicit_reward_heldout_accuracy"] for cost in seed_costs]
    inputs = verdict_inputs(list(costs), costs, evidence.scores, rm_accuracy, dpo_accuracy, pairs)
    return [row.to_dict() for row in verdict_rows(inputs)]


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
                "wall_seconds": {"pairs": 0.0, "reward_model": 0.0, "policy": 0.0, "total": 0.0, "evaluation": 0.0},
                "peak_rss_mb": 0.0,
                "peak_gpu_mb": None,
                "tokens_generated": 0,
                "tokens_generated_training": 0,
                "gradient_steps": 0,
                "rm_gradient_steps": 0,
                "pairs_used": 0,
                "rm_heldout_accuracy": None,
                "implicit_reward_heldout_accuracy": None,
            }
        runs = {stage.charged_as: (stage, self.results[f"seed-{seed}/{stage.name}"]) for stage in arm.stages}
        policy = runs["policy"][1]
        reward_model = runs["reward_model"][1] if "reward_model" in runs else None
        uses_pairs = any(stage.trains_on_pairs for stage in arm.stages)
        rows = read_jsonl(Path(policy.out_dir) / "metrics.jsonl")
        rm_rows = read_jsonl(Path(reward_model.out_dir) / "metrics.jsonl") if reward_model else []
        wall = self._wall(policy, reward_model, uses_pairs, rows, rm_rows)
        measured = [policy] + ([reward_model] if reward_model else []) + ([self.pairs_run] if uses_pairs else [])
        training_tokens = 0  # sampled by the arm's own training run (rollouts), besides the shared pairs
        if arm.family.online:
            # completions per iteration from the run itself: a critic-free arm samples K x max(1, batch // K)
            info = json.loads((Path(policy.out_dir) / "run.json").read_text())
            per_iteration = info["episodes"] / info["total_iterations"]
            training_tokens = round(
                sum(row["val/response_length"] * per_iteration for row in rows if "val/response_length" in row)
            )
        tokens = training_tokens + (self.pairs_tokens if uses_pairs else 0)
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
            # on CUDA the trainers' GPU peak (None on CPU, or when no stage of the arm recorded one)
            "peak_gpu_mb": max((run.peak_gpu_mb for run in measured if run.peak_gpu_mb is not None), default=None),
            "tokens_generated": tokens,
            "tokens_generated_training": training_tokens,
            "gradient_steps": sum(stage.steps(self.cfg) for stage in arm.stages),
            "rm_gradient_steps": sum(
                stage.steps(self.cfg) for stage in arm.stages if stage.charged_as == "reward_model"
            ),
            "pairs_used": pairs_used,
            # the reward model's last held-out pair accuracy (None: no reward model, or it never evaluated)
            "rm_heldout_accuracy": _last(rm_rows, "eval/accuracy"),
            # a DPO-like arm's implicit reward, beta * log(pi / pi_ref), ranking the held-out pairs
            "implicit_reward_heldout_accuracy": None if arm.family.online else _last(rows, "eval/rewards/accuracies"),
        }

    def _wall(
        self,
        policy: StageResult,
        reward_model: StageResult | None,
        uses_pairs: bool,
        rows: list[dict],
        rm_rows: list[dict],
    ) -> dict[str, float]:
        """Wall seconds by part and their total (``rows`` / ``rm_rows``: the policy's and the reward model's metrics).
        Evaluations while training (held-out pairs, the over-optimisation curve) are the race's measurement, not
        the method's cost: charged to no arm, reported apart."""
        evaluation = {"reward_model": _evaluation_seconds(rm_rows), "policy": _evaluation_seconds(rows)}
        wall = {
            "pairs": self.pairs_run.wall_seconds if uses_pairs else 0.0,
            "reward_model": reward_model.wall_seconds - evaluation["reward_model"] if reward_model else 0.0,
            "policy": policy.wall_seconds - evaluation["policy"],
        }
        wall["total"] = round(sum(wall.values()), 3)
        wall["evaluation"] = round(sum(evaluation.values()), 3)
        return wall


EVALUATION_KEYS = ("eval/seconds", "time/heldout")
"""Seconds a training run spent evaluating, per metrics row: the shared loop's held-out pairs, PPO's and rl's
held-out curve."""


def _evaluation_seconds(rows: list[dict]) -> float:
    """The seconds a run's metrics ``rows`` logged under `EVALUATION_KEYS`."""
    return sum(float(row[key]) for row in rows for key in EVALUATION_KEYS if key in row)


def _pairs_seen(run_dir: Path, steps: int) -> int:
    info = json.loads((run_dir / "run.json").read_text())
    return min(info["train_examples"], steps * info["global_batch"])


def _last(rows: list[dict], key: str) -> float | None:
    """The last logged value of ``key`` (None: never logged, or logged non-finite). metrics.jsonl holds a NaN as the
    string ``"nan"``, which no mean or interval can take: read as a number, the verdict raised on it after the race
    trained, and across seeds `mean_over_seeds` kept the first seed's value as the mean."""
    values = [row[key] for row in rows if key in row]
    if not values:
        return None
    value = float(values[-1])
    return value if math.isfinite(value) else None


def _curve(out: Path, arm: Arm, seed: int) -> tuple[str, list[dict]]:
    key = arm.family.curve_metric
    rows = read_jsonl(seed_dir(out, seed) / arm.name / "metrics.jsonl")
    return key, [
        {"step": row["step"], "wall_seconds": row["wall_seconds"], "metric": row[key]} for row in rows if key in row
    ]


def _samples(cfg: ResolvedConfig, out: Path, seed: int, count: int = 6) -> list[dict]:
    """The first ``count`` held-out prompts with every shown policy's first completion and its gold score."""
    shown = {REFERENCE_POLICY: START, **{name: name for name in cfg.arms}}  # the evaluation's names -> the summary's
    rows = read_jsonl(seed_dir(out, seed) / "eval" / "completions.jsonl")
    by_prompt: dict[str, dict] = {}
    for row in rows:
        if row.get("sample", 0) != 0 or row["policy"] not in shown:
            continue
        name = shown[row["policy"]]
        entry = by_prompt.setdefault(row["prompt"], {"prompt": row["prompt"], "completions": {}, "gold": {}})
        entry["completions"][name] = row["completion"]
        entry["gold"][name] = row["gold"]
    return list(by_prompt.values())[:count]


def mean_over_seeds(items: list[dict]) -> dict:
    """Mean of numeric leaves across seeds (nested dicts kept); None where some seeds have a number and others
    None (a mean of the seeds that measured it would pass for all of them); one seed: itself."""
    if len(items) == 1:
        return items[0]
    mean: dict = {}
    for key, value in items[0].items():
        values = [item[key] for item in items]
        numeric = [isinstance(v, (int, float)) and not isinstance(v, bool) for v in values]
        if isinstance(value, dict):
            mean[key] = mean_over_seeds(values)
        elif all(numeric):
            mean[key] = statistics.fmean(values)
        elif any(numeric) and all(n or v is None for n, v in zip(numeric, values)):
            mean[key] = None
        else:
            mean[key] = value
    return mean
