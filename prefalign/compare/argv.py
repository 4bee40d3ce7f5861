"""Pieces of the stage command lines that several stages share.

Every function returns a list of flag/value items for ``prefalign COMMAND``; values stay as they are
(floats, paths) and become strings only when the stage runs, so ``0.1`` is written ``0.1`` everywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from prefalign.trackers import DEFAULT_REPORT_TO

if TYPE_CHECKING:
    from prefalign.compare.config import ResolvedConfig


def run_args(cfg: ResolvedConfig, seed: int) -> list:
    """Model, seed, precision and trackers of a training stage (--report-to only when not the default, which the
    trainers share: the default race's command lines stay as they were)."""
    trackers = [] if cfg.report_to == DEFAULT_REPORT_TO else ["--report-to", cfg.report_to]
    return ["--model", cfg.model, "--seed", seed, "--precision", cfg.precision, *trackers]


def sampling_args(cfg: ResolvedConfig) -> list:
    """How completions are drawn: the same everywhere (pairs, PPO rollouts, evaluation)."""
    return [
        "--max-new-tokens",
        cfg.max_new_tokens,
        "--temperature",
        cfg.temperature,
        "--chat" if cfg.chat else "--no-chat",
    ]


def sampler_dtype(precision: str) -> str:
    """The weights dtype prefs / eval sample with: a bf16 copy where ``precision`` resolves to bf16 here."""
    from prefalign.trainers.backend import resolve_precision

    return "bfloat16" if resolve_precision(precision) == "bf16" else "float32"


def sampler_args(cfg: ResolvedConfig) -> list:
    """prefs / eval: sampling batch and weights dtype."""
    return ["--batch-size", cfg.sample_batch_size, "--dtype", sampler_dtype(cfg.precision)]


def pair_training_args(cfg: ResolvedConfig, seed: int, pairs: Path, learning_rate: float, steps: int) -> list:
    """A run trained on the shared pairs (reward model, DPO and its relatives), same held-out split for all."""
    return [
        *run_args(cfg, seed),
        "--data",
        pairs,
        "--eval-split",
        cfg.eval_split,
        "--eval-split-seed",  # every seed's runs hold out the same prompts
        cfg.seed,
        "--max-steps",
        steps,
        "--learning-rate",
        learning_rate,
        "--batch-size",
        cfg.batch_size,
        "--lr-scheduler",
        "constant",
        "--max-length",
        256,
    ]


def heldout_args(cfg: ResolvedConfig, heldout: Path) -> list:
    """An online run's held-out evaluations while it trains (before the first update, then every ``ppo_steps /
    curve_points`` iterations): the gold judge and the run's own reward (the proxy) on the first ``curve_prompts``
    held-out prompts, with KL to the reference: the over-optimisation curve (Gao, Schulman, Hilton 2022)."""
    return [
        "--heldout-prompts",
        heldout,
        "--heldout-judge",
        cfg.judge,
        "--heldout-every",
        max(1, cfg.ppo_steps // cfg.curve_points),
        "--heldout-limit",
        min(cfg.curve_prompts, cfg.eval_prompts),
    ]


def ppo_args(cfg: ResolvedConfig, seed: int, prompts: Path, heldout: Path, reward: str, kl_coef: float) -> list:
    """A PPO run on the training prompts against ``reward`` (a reward-model directory or the gold judge), with its
    held-out curve (`heldout_args`)."""
    return [
        *run_args(cfg, seed),
        "--prompts",
        prompts,
        "--reward",
        reward,
        "--max-steps",
        cfg.ppo_steps,
        "--rollout-batch-size",
        cfg.ppo_rollout_batch,
        "--ppo-epochs",
        cfg.ppo_epochs,
        "--learning-rate",
        cfg.ppo_lr,
        "--value-learning-rate",
        cfg.ppo_value_lr,
        "--kl-coef",
        kl_coef,
        *sampling_args(cfg),
        "--lr-scheduler",
        "constant",
        "--sample-every",
        max(1, cfg.ppo_steps // 4),
        *heldout_args(cfg, heldout),
    ]
