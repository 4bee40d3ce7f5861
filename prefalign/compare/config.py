"""`prefalign compare` configuration and its presets.

A preset fills every budget field the user left unset; a flag or YAML value always wins. The resolved
values are written to ``config.yaml`` in the output directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Annotated, cast

import tyro

from prefalign.compare.arms import ARMS, DEFAULT_ARMS, arms_help
from prefalign.compare.tasks import TASKS, tasks_help
from prefalign.trackers import DEFAULT_REPORT_TO, parse_report_to
from prefalign.trainers.config import check_precision
from prefalign.validation import Validated, changed_fields, flag

# Budgets per preset. quick: a smoke run of every stage; default: the race the README reports, three seeds in
# the wall time one seed of the earlier default took (24 tokens, 256 prompts, 60 reward-model and DPO steps, 32 PPO
# iterations of 2 epochs): shorter completions, fewer prompts for pairs, half the optimizer steps at about twice
# the learning rate (lr x steps, how far Adam moves the weights, kept), PPO on-policy (1 epoch); paper: larger,
# for a GPU.
PRESETS: dict[str, dict] = {
    "quick": dict(
        num_prompts=32,
        samples_per_prompt=4,
        max_new_tokens=16,
        eval_prompts=32,
        eval_samples=1,
        rm_steps=8,
        rm_lr=2e-5,
        ppo_steps=4,
        ppo_rollout_batch=8,
        ppo_epochs=1,
        ppo_lr=3e-5,
        ppo_value_lr=1e-4,
        ppo_kl_coef=0.05,
        dpo_steps=8,
        dpo_lr=1e-5,
        dpo_beta=0.1,
        dpo_rf_beta=1.0,
        batch_size=4,
        seeds=1,
        curve_prompts=8,
    ),
    "default": dict(
        num_prompts=160,
        samples_per_prompt=4,
        max_new_tokens=16,
        eval_prompts=100,
        eval_samples=1,
        rm_steps=30,
        rm_lr=2e-5,
        ppo_steps=16,
        ppo_rollout_batch=16,
        ppo_epochs=1,
        ppo_lr=1e-4,
        ppo_value_lr=1e-4,
        ppo_kl_coef=0.05,
        dpo_steps=30,
        dpo_lr=8e-5,
        dpo_beta=0.1,
        dpo_rf_beta=1.0,
        batch_size=8,
        seeds=3,
        curve_prompts=32,
    ),
    "paper": dict(
        num_prompts=324,
        samples_per_prompt=8,
        max_new_tokens=48,
        eval_prompts=100,
        eval_samples=4,
        rm_steps=300,
        rm_lr=1e-5,
        ppo_steps=200,
        ppo_rollout_batch=64,
        ppo_epochs=4,
        ppo_lr=1e-5,
        ppo_value_lr=1e-4,
        ppo_kl_coef=0.05,
        dpo_steps=300,
        dpo_lr=1e-6,
        dpo_beta=0.1,
        dpo_rf_beta=1.0,
        batch_size=16,
        seeds=3,
        curve_prompts=100,
    ),
}


@dataclass
class CompareConfig(Validated):
    """Race PPO-RLHF against DPO on the same preference pairs and measure everything."""

    preset: str = "default"
    """Budget preset: quick (a smoke run of every stage, ~3 min on 2 CPU cores), default (PPO-RLHF and DPO, 3 seeds,
    ~15 min), paper (larger, for a GPU)."""
    task: Annotated[str, tyro.conf.arg(help=tasks_help())] = "sentiment"
    """Built-in task (the ``--task`` help is built from the task table, `prefalign.compare.tasks.TASKS`): the
    packaged prompts and the gold judge used where --train-prompts, --heldout-prompts or --judge are not given."""
    model: str = "smollm2-135m"
    """Starting policy (and reference) for every arm."""
    judge: str | None = None
    """Gold judge: a built-in judge (vader, arithmetic), module:function, or a reward-model directory (default: the
    task's judge)."""
    train_prompts: str | None = None
    """Prompts for pair making and PPO, a file whose other columns (e.g. answer) reach the judge (default: the
    task's packaged prompts, train split)."""
    heldout_prompts: str | None = None
    """Prompts for evaluation, read like --train-prompts (default: the task's packaged prompts, held-out split)."""
    chat: bool = False
    """Wrap prompts in the chat template (off: plain continuation, the sentiment task)."""
    arms: Annotated[list[str], tyro.conf.arg(help=arms_help())] = field(default_factory=lambda: list(DEFAULT_ARMS))
    """Arms to train (the ``--arms`` help is built from the arm table, `prefalign.compare.arms.ARMS`)."""
    seeds: int | None = None
    """Train every arm this many times (seed, seed + 1, ...) and report the mean with 95% intervals across seeds
    and held-out prompts (the default preset: 3)."""
    sweep: bool = False
    """Also train DPO at --sweep-betas and PPO at --sweep-kl-coefs: a gold-vs-KL frontier per method."""
    sweep_betas: list[float] = field(default_factory=lambda: [0.05, 0.5])
    """DPO betas of the sweep (besides --dpo-beta)."""
    sweep_kl_coefs: list[float] = field(default_factory=lambda: [0.01, 0.2])
    """PPO KL coefficients of the sweep (besides --ppo-kl-coef)."""
    output: str = "runs/compare"
    """Output directory: report.md, report.html, summary.json, plots, and every stage's run."""
    overwrite: bool = False
    """Start over in a directory that holds a previous comparison (moot with --resume: the two given together as
    flags are refused, and a race's config.yaml keeps the --overwrite it started with)."""
    resume: bool = False
    """Continue a comparison: finished stages are not redone."""
    precision: str = "auto"
    """fp32, bf16 or auto (every stage; under bf16, pair making, PPO rollouts and evaluation sample from a bf16
    copy of the weights, and log-probs for KL stay in float32)."""
    sample_batch_size: int = 16
    """Completions per generation batch in pair making and evaluation."""
    seed: int = 0
    """Base seed (seed i of --seeds uses seed + i)."""
    report_to: str = DEFAULT_REPORT_TO
    """Trackers of every training stage (each in its own directory) and of the race (a results table in the
    output directory): a comma list of tensorboard, trackio, wandb, or none; see prefalign dpo --help."""

    # -- budgets (unset: from the preset) --
    num_prompts: int | None = None
    """Training prompts used to make pairs."""
    samples_per_prompt: int | None = None
    """Completions sampled per prompt when making pairs (which of them pair up: --pair-rule)."""
    pair_rule: str = "all"
    """best_worst (one pair per prompt) or all (every pair of a prompt's completions whose gold scores differ
    by more than --min-gap): more pairs from the same samples."""
    min_gap: float = 0.3
    """Pair two completions only if their gold scores differ by more than this."""
    max_new_tokens: int | None = None
    """Tokens per completion everywhere (pairs, PPO rollouts, evaluation)."""
    temperature: float = 1.0
    """Sampling temperature everywhere."""
    eval_prompts: int | None = None
    """Held-out prompts used for evaluation."""
    eval_samples: int | None = None
    """Completions per held-out prompt and policy."""
    batch_size: int | None = None
    """Pairs per step for the reward model and every DPO-like arm."""
    rm_steps: int | None = None
    """Reward-model optimizer steps."""
    rm_lr: float | None = None
    """Reward-model learning rate."""
    ppo_steps: int | None = None
    """PPO iterations."""
    ppo_rollout_batch: int | None = None
    """Prompts per PPO iteration."""
    ppo_epochs: int | None = None
    """PPO epochs per rollout batch."""
    ppo_lr: float | None = None
    """PPO policy learning rate."""
    ppo_value_lr: float | None = None
    """PPO value-model learning rate."""
    ppo_kl_coef: float | None = None
    """PPO KL penalty coefficient."""
    dpo_steps: int | None = None
    """Optimizer steps of every DPO-like arm (the DPO_LIKE family of the arm table)."""
    dpo_lr: float | None = None
    """Learning rate of every DPO-like arm (the DPO_LIKE family of the arm table)."""
    dpo_beta: float | None = None
    """DPO beta."""
    dpo_rf_beta: float | None = None
    """Beta of the reference-free arm (1 = the plain pairwise likelihood loss -log sigmoid(logp(x+) - logp(x-)))."""
    curve_prompts: int | None = None
    """Held-out prompts every online arm evaluates while it trains (gold, proxy and KL: the over-optimisation
    curve; at most --eval-prompts)."""
    curve_points: int = 4
    """Held-out evaluations of every online arm during training, evenly spaced (plus one before training)."""
    eval_split: float = 0.1
    """Fraction of the pairs' prompts held out with all their pairs (reward-model accuracy, DPO eval metrics); the
    same prompts for every arm and seed."""

    def validate(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"--preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        if self.task not in TASKS:
            raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}")
        unknown = [name for name in self.arms if name not in ARMS]
        if unknown or not self.arms:
            raise ValueError(f"--arms takes some of {', '.join(ARMS)}; got {' '.join(self.arms) or 'none'}")
        if twice := sorted({name for name in self.arms if self.arms.count(name) > 1}):
            raise ValueError(f"--arms names {', '.join(twice)} twice; name each arm once")
        if self.curve_points < 1:
            raise ValueError(f"--curve-points must be >= 1, got {self.curve_points}")
        if self.pair_rule not in ("best_worst", "all"):
            raise ValueError(f"--pair-rule must be best_worst or all, got {self.pair_rule!r}")
        check_precision(self.precision)  # else refused by the first training stage, after the pairs
        if not self.min_gap >= 0:
            raise ValueError(f"--min-gap must be >= 0, got {self.min_gap}")
        if self.sample_batch_size < 1:
            raise ValueError(f"--sample-batch-size must be >= 1, got {self.sample_batch_size}")
        if self.temperature <= 0:
            raise ValueError(f"--temperature must be > 0, got {self.temperature}")
        if not 0 < self.eval_split < 1:
            raise ValueError(f"--eval-split must be in (0, 1), got {self.eval_split}")
        for budget in fields(self):
            value = getattr(self, budget.name)
            if budget.name in PRESETS["default"] and value is not None and value <= 0:
                raise ValueError(f"{flag(budget.name)} must be > 0, got {value}")
        if self.samples_per_prompt is not None and self.samples_per_prompt < 2:  # checked here, not by its stage
            raise ValueError(
                f"--samples-per-prompt must be >= 2 (a pair needs two completions), got {self.samples_per_prompt}"
            )
        if self.eval_prompts is not None and self.eval_prompts < 2:  # an interval over prompts needs two
            raise ValueError(f"--eval-prompts must be >= 2 (the intervals vary over prompts), got {self.eval_prompts}")
        idle = [] if self.sweep else changed_fields(self, ("sweep_betas", "sweep_kl_coefs"))
        if idle:  # the race runs without them
            raise ValueError(f"{flag(idle[0])} does nothing without --sweep; add --sweep or drop {flag(idle[0])}")
        if self.sweep and any(beta <= 0 for beta in self.sweep_betas):
            raise ValueError("--sweep-betas must all be > 0")
        if self.sweep and any(kl_coef < 0 for kl_coef in self.sweep_kl_coefs):
            raise ValueError("--sweep-kl-coefs must all be >= 0")
        parse_report_to(self.report_to)

    @property
    def trackers(self) -> tuple[str, ...]:
        """The tracker names of --report-to (derived, never written back)."""
        return parse_report_to(self.report_to)

    def resolved(self) -> ResolvedConfig:
        """A copy with every unset budget filled from the preset and an unset --judge from the task (the user's
        values win)."""
        import dataclasses

        preset = PRESETS[self.preset]
        filled = {key: value for key, value in preset.items() if getattr(self, key) is None}
        if self.judge is None:
            filled["judge"] = TASKS[self.task].judge
        return cast("ResolvedConfig", dataclasses.replace(self, **filled))


if TYPE_CHECKING:

    class ResolvedConfig(CompareConfig):
        """For the type checker: a `CompareConfig.resolved` config, whose budgets (PRESETS' keys) are all set. The
        stages, their arguments and the summary read this."""

        judge: str
        seeds: int
        curve_prompts: int
        num_prompts: int
        samples_per_prompt: int
        max_new_tokens: int
        eval_prompts: int
        eval_samples: int
        batch_size: int
        rm_steps: int
        rm_lr: float
        ppo_steps: int
        ppo_rollout_batch: int
        ppo_epochs: int
        ppo_lr: float
        ppo_value_lr: float
        ppo_kl_coef: float
        dpo_steps: int
        dpo_lr: float
        dpo_beta: float
        dpo_rf_beta: float
