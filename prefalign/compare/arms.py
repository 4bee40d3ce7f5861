"""The arms of a comparison, declared once: what each one is called, which family it belongs to, which
stages it runs and how their command lines are built.

The config's ``--arms`` choices and help, the stage plan, the summary's costs and curves and the report's
PPO-RLHF vs DPO table all read `ARMS`; nothing else knows an arm by its name. Adding an arm is one
`Arm` entry below (and its test).

Families::

    PPO_RLHF   online RL: samples its own completions while training (`prefalign ppo`, PPO budget)
    CRITIC_FREE  online RL without a value model, K completions per prompt (`prefalign rl`, PPO budget)
    DPO_LIKE   an offline preference loss on the shared pairs (`prefalign dpo`, DPO budget)

Stages: a policy run named after its arm (``seed-S/dpo``), preceded by any shared stage it needs
(``seed-S/rm``, the reward model PPO-RLHF trains against), which runs once per seed however many arms
need it. A sweep retrains the arm at other values of one parameter (``seed-S/dpo@beta=0.05``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from prefalign.compare.argv import heldout_args, pair_training_args, ppo_args, run_args, sampling_args
from prefalign.methods import PPO_OBJECTIVE as _PPO_LOSS

if TYPE_CHECKING:
    from prefalign.compare.config import CompareConfig, ResolvedConfig

START = "start"
"""The starting policy's name in the evaluation and the summary: not an arm, the reference of them all."""
START_LABEL = "Starting policy"


@dataclass(frozen=True)
class StageInputs:
    """What a stage's command line is built from."""

    cfg: ResolvedConfig
    """The resolved config: every budget is set."""
    seed: int
    seed_dir: Path
    """``OUT/seed-S``: every run of this seed, the shared ones included (the reward model is ``rm/final``)."""
    train_prompts: Path
    heldout_prompts: Path
    """The held-out prompts (the evaluation's, and the online arms' curve during training)."""
    pairs: Path
    """The shared preference pairs (``OUT/pairs/pairs.jsonl``)."""
    setting: float | None = None
    """This run's value of the arm's swept parameter (its own setting, or one of the sweep's values);
    None for an arm without a sweep."""


@dataclass(frozen=True)
class Stage:
    """One ``prefalign COMMAND`` run, in ``seed-S/NAME``."""

    name: str
    command: str
    args: Callable[[StageInputs], list]
    """The command line after ``prefalign COMMAND`` (the runner adds ``--output`` and ``--overwrite``)."""
    steps: Callable[[ResolvedConfig], int]
    """Gradient steps it takes (charged to the arm)."""
    charged_as: str
    """Which part of the arm's wall time it is: "policy" or "reward_model"."""
    trains_on_pairs: bool
    """Reads the shared pairs: the arm is charged the pair making, and the pairs it saw count as used."""
    metric: str
    """The logged metric compare shows beside the stage's step counter while it runs (a policy run: its
    family's `Family.curve_metric`)."""


@dataclass(frozen=True)
class Family:
    """What arms of one kind share: the command that trains the policy, its budget, how it is reported."""

    name: str
    """"ppo" or "dpo": the kind of method, PPO-RLHF-like or DPO-like."""
    command: str
    steps: Callable[[ResolvedConfig], int]
    online: bool
    """Samples its own completions while training (the rollouts count as tokens generated) instead of
    reading the shared pairs."""
    update: str
    """The report's "Policy update" row."""
    curve_metric: str
    """The logged metric drawn as its training curve."""


@dataclass(frozen=True)
class Sweep:
    """Retrain an arm at other values of one parameter: a gold-vs-KL frontier (``--sweep``)."""

    param: str
    """Its name in summary.json's sweep points ("beta", "kl_coef")."""
    tag: str
    """Its name in the stage name (``dpo@beta=0.05``)."""
    values: Callable[[ResolvedConfig], list[float]]
    """The values to retrain at (besides the arm's own)."""
    base: Callable[[ResolvedConfig], float]
    """The arm's own value: the run without a sweep, and a point of the frontier."""

    def stage_name(self, arm: str, value: float) -> str:
        return f"{arm}@{self.tag}={value:g}"


@dataclass(frozen=True)
class Arm:
    """One arm of the race: all that the config, the stage plan, the summary and the report know of it."""

    name: str
    """Its ``--arms`` value, stage directory and name in the summary."""
    label: str
    """Its name in the report."""
    description: str
    """Its ``--arms`` help."""
    family: Family
    args: Callable[[StageInputs], list]
    """The policy run's command line after ``prefalign COMMAND`` (the family's command)."""
    needs: tuple[Stage, ...] = ()
    """Shared stages that run before the policy run (once per seed, however many arms need them)."""
    sweep: Sweep | None = None
    in_default_race: bool = False
    """In the default ``--arms``."""
    reward_model: str = ""
    """The report's "Reward model" row."""
    loss: str = ""
    """The loss's formula (the report's "Loss" row, as code)."""
    loss_note: str = ""
    """Plain text after the formula."""

    @property
    def policy_stage(self) -> Stage:
        return Stage(
            self.name,
            self.family.command,
            self.args,
            self.family.steps,
            charged_as="policy",
            trains_on_pairs=not self.family.online,
            metric=self.family.curve_metric,
        )

    @property
    def stages(self) -> tuple[Stage, ...]:
        """Every stage the arm runs, in order: shared stages, then its policy run."""
        return (*self.needs, self.policy_stage)

    def inputs_for(self, inputs: StageInputs) -> StageInputs:
        """``inputs`` with the arm's own setting of its swept parameter."""
        return dataclasses.replace(inputs, setting=self.sweep.base(inputs.cfg) if self.sweep else None)


def final_model(seed_dir: Path, stage: str) -> Path:
    """Where a stage's trained model is."""
    return seed_dir / stage / "final"


# ---------------------------------------------------------------------------------------------- stages


def _reward_model_args(inputs: StageInputs) -> list:
    cfg = inputs.cfg
    return pair_training_args(cfg, inputs.seed, inputs.pairs, cfg.rm_lr, cfg.rm_steps)


REWARD_MODEL = Stage(
    "rm",
    "reward",
    _reward_model_args,
    steps=lambda cfg: cfg.rm_steps,
    charged_as="reward_model",
    trains_on_pairs=True,
    metric="accuracy",
)
"""Bradley-Terry on the shared pairs; also the evaluation's proxy reward."""


def _ppo_on_reward_model(inputs: StageInputs) -> list:
    reward = str(final_model(inputs.seed_dir, REWARD_MODEL.name))
    assert inputs.setting is not None, "the ppo arm sweeps kl_coef: Arm.args sets it"
    return ppo_args(
        inputs.cfg, inputs.seed, inputs.train_prompts, inputs.heldout_prompts, reward, kl_coef=inputs.setting
    )


def _ppo_on_gold_judge(inputs: StageInputs) -> list:
    cfg = inputs.cfg
    return ppo_args(cfg, inputs.seed, inputs.train_prompts, inputs.heldout_prompts, cfg.judge, kl_coef=cfg.ppo_kl_coef)


def _dpo_budget(inputs: StageInputs) -> list:
    cfg = inputs.cfg
    return pair_training_args(cfg, inputs.seed, inputs.pairs, cfg.dpo_lr, cfg.dpo_steps)


def _dpo(inputs: StageInputs) -> list:
    return [*_dpo_budget(inputs), "--beta", inputs.setting]


def _dpo_reference_free(inputs: StageInputs) -> list:
    return [*_dpo_budget(inputs), "--loss-type", "reference_free", "--beta", inputs.cfg.dpo_rf_beta]


def _dpo_loss_type(loss_type: str) -> Callable[[StageInputs], list]:
    """A `prefalign dpo --loss-type` arm on the DPO budget, with the loss's own defaults for its parameters."""

    def args(inputs: StageInputs) -> list:
        return [*_dpo_budget(inputs), "--loss-type", loss_type]

    return args


RL_GROUP = 4
"""K, completions per prompt of the critic-free arms: their rollout batch is the PPO arm's in completions (its
prompts / K, at least 1 prompt), so both sample as many episodes for the same steps."""


def _critic_free(estimator: str, gold: bool) -> Callable[[StageInputs], list]:
    """A `prefalign rl --estimator ESTIMATOR` arm on the PPO budget, against the reward model (or the gold judge)."""

    def args(inputs: StageInputs) -> list:
        cfg = inputs.cfg
        reward = cfg.judge if gold else str(final_model(inputs.seed_dir, REWARD_MODEL.name))
        return [
            *run_args(cfg, inputs.seed),
            "--prompts",
            inputs.train_prompts,
            "--reward",
            reward,
            "--estimator",
            estimator,
            "--num-generations",
            RL_GROUP,
            "--rollout-batch-size",
            max(1, cfg.ppo_rollout_batch // RL_GROUP),
            "--max-steps",
            cfg.ppo_steps,
            "--ppo-epochs",
            cfg.ppo_epochs,
            "--learning-rate",
            cfg.ppo_lr,
            "--kl-coef",
            cfg.ppo_kl_coef,
            *sampling_args(cfg),
            "--lr-scheduler",
            "constant",
            "--sample-every",
            max(1, cfg.ppo_steps // 4),
            *heldout_args(cfg, inputs.heldout_prompts),
        ]

    return args


# ---------------------------------------------------------------------------------------------- the table

PPO_RLHF = Family(
    "ppo",
    "ppo",
    steps=lambda cfg: cfg.ppo_steps * cfg.ppo_epochs,
    online=True,
    update="on-policy RL: samples its own completions while training",
    curve_metric="objective/scores",
)
DPO_LIKE = Family(
    "dpo",
    "dpo",
    steps=lambda cfg: cfg.dpo_steps,
    online=False,
    update="offline: supervised on fixed pairs",
    curve_metric="rewards/margins",
)

CRITIC_FREE = Family(
    "ppo",
    "rl",
    steps=lambda cfg: cfg.ppo_steps * cfg.ppo_epochs,
    online=True,
    update="on-policy RL without a critic: K completions per prompt, a group baseline",
    curve_metric="objective/scores",
)

_PPO_LOSS_NOTE = " with a per-token KL penalty to the reference"

# fmt: off
# A hand-laid table, one entry per variant (its prose wrapped inside); the formatter would put every argument
# on its own line and quadruple it.
ARMS: dict[str, Arm] = {arm.name: arm for arm in [
    Arm("ppo", "PPO-RLHF", "a reward model on the pairs, then PPO against it", PPO_RLHF, _ppo_on_reward_model,
        needs=(REWARD_MODEL,), in_default_race=True,
        sweep=Sweep("kl_coef", "kl", values=lambda cfg: cfg.sweep_kl_coefs, base=lambda cfg: cfg.ppo_kl_coef),
        reward_model="trained explicitly (Bradley-Terry on the pairs)", loss=_PPO_LOSS, loss_note=_PPO_LOSS_NOTE),
    Arm("dpo", "DPO", "sigmoid DPO at --dpo-beta", DPO_LIKE, _dpo, in_default_race=True,
        sweep=Sweep("beta", "beta", values=lambda cfg: cfg.sweep_betas, base=lambda cfg: cfg.dpo_beta),
        reward_model="none: implicit in the policy", loss="-log sigmoid(beta((logp_c - ref_c) - (logp_r - ref_r)))"),
    Arm("dpo_rf", "DPO (reference-free)", "DPO without a reference model, at --dpo-rf-beta", DPO_LIKE,
        _dpo_reference_free, reward_model="none: implicit in the policy, no reference model",
        loss="-log sigmoid(logp(x+) - logp(x-))"),
    Arm("ppo_gt", "PPO on the gold judge", "PPO straight on the gold judge, an upper reference", PPO_RLHF,
        _ppo_on_gold_judge, reward_model="none: optimises the gold judge directly (an upper bound, not a fair race)",
        loss=_PPO_LOSS, loss_note=_PPO_LOSS_NOTE),
    Arm("simpo", "SimPO", "dpo --loss-type simpo, its own beta and gamma", DPO_LIKE, _dpo_loss_type("simpo"),
        reward_model="none: the policy's length-normalised log-probability, no reference model",
        loss="-log sigmoid(beta (avg_logp_c - avg_logp_r) - gamma)", loss_note=" (avg_logp: per-token mean log-prob)"),
    Arm("orpo", "ORPO", "dpo --loss-type orpo, its own lambda", DPO_LIKE, _dpo_loss_type("orpo"),
        reward_model="none: the policy's odds ratio, no reference model",
        loss="-avg_logp_c - lambda log sigmoid(log odds_c - log odds_r)",
        loss_note=" (odds = q / (1 - q), q = exp(avg_logp), avg_logp: per-token mean log-prob)"),
    Arm("grpo", "GRPO", "a reward model on the pairs, then GRPO against it (rl --estimator grpo, K = 4)",
        CRITIC_FREE, _critic_free("grpo", gold=False), needs=(REWARD_MODEL,),
        reward_model="trained explicitly (Bradley-Terry on the pairs)", loss=_PPO_LOSS,
        loss_note=" with A = (s - mean_group s) / std_group s + (P - mean_group P) over the prompt's K completions, "
        "s: score, P: minus the sequence KL"),
    Arm("rloo", "RLOO", "a reward model on the pairs, then RLOO against it (rl --estimator rloo, K = 4)",
        CRITIC_FREE, _critic_free("rloo", gold=False), needs=(REWARD_MODEL,),
        reward_model="trained explicitly (Bradley-Terry on the pairs)", loss=_PPO_LOSS,
        loss_note=" with A = R_i - mean of the prompt's other K - 1 completions' R, R: score minus KL"),
    Arm("grpo_gt", "GRPO on the gold judge", "GRPO straight on the gold judge, an upper reference", CRITIC_FREE,
        _critic_free("grpo", gold=True), reward_model="none: optimises the gold judge directly (an upper bound, "
        "not a fair race)", loss=_PPO_LOSS,
        loss_note=" with A = (s - mean_group s) / std_group s + (P - mean_group P)"),
]}
"""Every arm by name, in the order their stages run within a seed."""
# fmt: on

DEFAULT_ARMS = [arm.name for arm in ARMS.values() if arm.in_default_race]


def arms_help() -> str:
    """The ``--arms`` help, one clause per arm."""
    return "Arms to train. " + "; ".join(f"{arm.name}: {arm.description}" for arm in ARMS.values()) + "."


def selected_arms(cfg: CompareConfig) -> list[Arm]:
    """The arms of ``--arms``, in table order (the order their stages run)."""
    return [arm for arm in ARMS.values() if arm.name in cfg.arms]


def sweep_runs(cfg: ResolvedConfig) -> list[tuple[str, Arm, float]]:
    """``(stage name, arm, value)`` of every sweep run of ``--sweep``, in stage-name order (the order the
    evaluation lists them; the first version read them back from the sorted run directories)."""
    runs: dict[str, tuple[Arm, float]] = {}
    for arm in selected_arms(cfg):
        if arm.sweep is not None:
            for value in arm.sweep.values(cfg):
                runs.setdefault(arm.sweep.stage_name(arm.name, value), (arm, value))
    return [(name, arm, value) for name, (arm, value) in sorted(runs.items())]
