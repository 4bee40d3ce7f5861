"""The stages of a comparison, in the order they run, with their command lines.

Pure: the plan is built from the resolved config and the output paths alone (no file is read), so the
command lines of a race can be checked without running it. Stage names are directories under the
output: ``pairs``, then per seed ``seed-S/<stage>`` and ``seed-S/eval``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from prefalign.compare.argv import sampler_args, sampling_args
from prefalign.compare.arms import StageInputs, final_model, selected_arms, sweep_runs

if TYPE_CHECKING:
    from prefalign.compare.config import ResolvedConfig


@dataclass(frozen=True)
class PlannedStage:
    name: str
    """Its run directory under the output, e.g. ``seed-0/dpo``."""
    command: str
    args: list
    """After ``prefalign COMMAND``; the runner adds ``--output`` and ``--overwrite``."""
    metric: str | None = None
    """The logged metric shown beside its step counter while it runs (`Stage.metric`); None: pairs, eval."""


def pairs_path(out: Path) -> Path:
    return out / "pairs" / "pairs.jsonl"


def seed_dir(out: Path, seed: int) -> Path:
    return out / f"seed-{seed}"


def plan_stages(cfg: ResolvedConfig, out: Path, train_prompts: Path, heldout_prompts: Path) -> list[PlannedStage]:
    """Every stage of the race for the resolved ``cfg``: pairs, then per seed the arms' stages (shared ones
    once), the sweep and the evaluation."""
    plan = [PlannedStage("pairs", "prefs", _pairs_args(cfg, train_prompts))]
    for index in range(cfg.seeds):
        seed = cfg.seed + index
        inputs = StageInputs(cfg, seed, seed_dir(out, seed), train_prompts, heldout_prompts, pairs_path(out))
        planned: set[str] = set()
        for arm in selected_arms(cfg):
            for stage in arm.stages:
                if stage.name not in planned:  # a shared stage (the reward model) serves every arm of the seed
                    planned.add(stage.name)
                    plan.append(
                        PlannedStage(
                            f"seed-{seed}/{stage.name}", stage.command, stage.args(arm.inputs_for(inputs)), stage.metric
                        )
                    )
        if cfg.sweep:
            for name, arm, value in sweep_runs(cfg):
                plan.append(
                    PlannedStage(
                        f"seed-{seed}/{name}",
                        arm.family.command,
                        arm.args(dataclasses.replace(inputs, setting=value)),
                        arm.policy_stage.metric,
                    )
                )
        plan.append(PlannedStage(f"seed-{seed}/eval", "eval", _eval_args(cfg, inputs, heldout_prompts)))
    return plan


def evaluated_policies(cfg: ResolvedConfig) -> list[str]:
    """The trained policies a seed's evaluation scores: the arms in ``--arms`` order, then the sweep runs."""
    return [*cfg.arms, *(name for name, _, _ in sweep_runs(cfg) if cfg.sweep)]


def reward_model_stage(cfg: ResolvedConfig) -> str | None:
    """The shared reward-model stage some arm trains (the evaluation's proxy reward), or None."""
    shared = (stage for arm in selected_arms(cfg) for stage in arm.needs if stage.charged_as == "reward_model")
    return next((stage.name for stage in shared), None)


def _pairs_args(cfg: ResolvedConfig, train_prompts: Path) -> list:
    return [
        "--model",
        cfg.model,
        "--prompts",
        train_prompts,
        "--judge",
        cfg.judge,
        "--num-samples",
        cfg.samples_per_prompt,
        "--pair-rule",
        cfg.pair_rule,
        "--min-gap",
        cfg.min_gap,
        *sampling_args(cfg),
        *sampler_args(cfg),
        "--seed",
        cfg.seed,
    ]


def _eval_args(cfg: ResolvedConfig, inputs: StageInputs, heldout_prompts: Path) -> list:
    # The starting policy is the evaluation's reference (its row: KL 0, win rate 1/2), not a policy sampled twice.
    # Every seed's evaluation samples with the base seed: the starting policy's completions are the same in each,
    # and every policy of every seed draws the same random numbers for the same prompt (common random numbers),
    # so arm-vs-arm and arm-vs-start differences pair up across seeds (`prefalign.compare.stats`).
    policies = [f"{name}={final_model(inputs.seed_dir, name)}" for name in evaluated_policies(cfg)]
    args = [
        "--policies",
        *policies,
        "--reference",
        cfg.model,
        "--prompts",
        heldout_prompts,
        "--judge",
        cfg.judge,
        "--num-samples",
        cfg.eval_samples,
        *sampling_args(cfg),
        *sampler_args(cfg),
        "--seed",
        cfg.seed,
    ]
    proxy = reward_model_stage(cfg)
    if proxy is not None:
        args += ["--proxy", final_model(inputs.seed_dir, proxy)]
    return args
