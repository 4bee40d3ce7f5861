"""Configuration of `prefalign rl`: the critic-free online family (GRPO, Dr. GRPO, DAPO's options, RLOO,
REINFORCE++). It is PPO's config (prompts, sampling, KL, run length, minibatches and epochs mean what they mean
there) without the value model's fields, plus the estimator, the group size and the policy-loss options."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import tyro

from prefalign.losses.advantages import ADVANTAGE_ESTIMATORS
from prefalign.losses.policy import AGGREGATIONS
from prefalign.trainers.ppo_config import PPOConfig
from prefalign.validation import changed_fields

# PPOConfig fields that only the value model reads: hidden from `prefalign rl --help`, and refused when a YAML
# file sets them to anything but PPO's default (a critic-free run would silently ignore them otherwise)
VALUE_ONLY = ("value_model", "value_learning_rate", "vf_clip", "vf_coef", "lam", "head_init_std", "whiten_rewards")


@dataclass
class RLConfig(PPOConfig):
    """Optimise a policy with a critic-free online RL estimator (GRPO, Dr. GRPO, RLOO, REINFORCE++) against one or
    more reward sources, K completions per prompt, a KL to a reference in the reward or in the loss."""

    # several sources where PPOConfig.reward is one: the field's type changes, on purpose
    reward: Annotated[list[str], tyro.conf.UseAppendAction] = field(default_factory=list)  # type: ignore[assignment]
    """Reward source, repeatable (--reward vader --reward mymod:fn): a reward-model directory or hub id, a built-in
    judge (vader), or module:function. Several are summed after weighting by --reward-weights."""
    reward_weights: list[float] | None = None
    """One weight per --reward, in their order (default: 1 each)."""
    estimator: str = "grpo"
    """Advantage estimator: grpo (GRPO, Shao et al. 2024: (s - mean_group s) / (std_group s + eps) + P - mean_group
    P), dr_grpo (Dr. GRPO, Liu et al. 2025: R - mean_group R, constant loss normaliser), rloo (RLOO, Ahmadian et
    al. 2024: R_i - mean of the group's other R_j), reinforce_pp (REINFORCE++, Hu 2025: return-to-go of the
    KL-shaped token rewards, whitened over the batch's tokens in the loss). R = s + P: a completion's score s plus
    its KL penalty P (P = 0 with --kl-in-loss); grpo divides the scores alone by their std, so --kl-coef keeps its
    meaning."""
    num_generations: int = 4
    """K: completions sampled per prompt (a group); grpo, dr_grpo and rloo need K >= 2. Each is keyed by (seed,
    iteration, prompt, k), so it does not depend on the batch layout or the process count."""
    rollout_batch_size: int = 8
    """Prompts sampled per iteration, over all processes (each process samples an equal share of whole groups);
    an iteration has rollout_batch_size x num_generations completions."""
    clip_eps_low: float | None = None
    """Lower clip of the ratio, 1 - eps_low (default: --clip-eps)."""
    clip_eps_high: float | None = None
    """Upper clip of the ratio, 1 + eps_high (default: --clip-eps); above --clip-eps-low is DAPO's clip-higher
    (Yu et al. 2025 use 0.2 and 0.28)."""
    loss_agg: str | None = None
    """Loss aggregation: token_mean, seq_mean_token_mean or seq_mean_token_sum_norm (default: the estimator's:
    grpo seq_mean_token_mean, dr_grpo seq_mean_token_sum_norm, rloo and reinforce_pp token_mean)."""
    kl_in_loss: bool = False
    """Put the KL in the loss as kl_coef x k3 per token (GRPO, Shao et al. 2024) instead of in the reward."""
    dynamic_sampling: bool = False
    """Take groups whose K scores are all equal out of the loss (DAPO, Yu et al. 2025); with --resample-rounds they
    are first replaced by new groups. Those left are counted in rl/groups_dropped."""
    resample_rounds: int = 0
    """With --dynamic-sampling: up to this many more rounds of sampling per iteration, each replacing every group
    still of equal scores with the K completions of another prompt drawn at random (DAPO's refill of the batch);
    0: drop them without replacing. Refilled groups: rl/groups_refilled."""
    overlong_buffer: int | None = None
    """DAPO's overlong reward shaping (Yu et al. 2025, soft overlong punishment), its L_cache: N tokens, 1 <= N <
    --max-new-tokens (L_max). A completion of more than L_max - N tokens (the EOS counted) has (length - (L_max -
    N)) / N x --overlong-penalty-factor taken from its score, the whole factor at L_max (a truncated completion);
    after --missing-eos-penalty and after --dynamic-sampling compared a group's scores (a group is judged by its
    rewards, not its lengths, as the paper's filter on correctness), before the advantages (default: off)."""
    overlong_penalty_factor: float | None = None
    """With --overlong-buffer: the penalty of a completion of --max-new-tokens tokens (default: 1, the paper's)."""
    overlong_filter: bool = False
    """DAPO's overlong filtering (Yu et al. 2025): take completions cut at --max-new-tokens (no EOS or stop string)
    out of the loss. They still count in their group's baseline (grpo, dr_grpo, rloo); reinforce_pp whitens over
    the others. Their share: rl/overlong_filtered."""

    value_model: tyro.conf.Suppress[str | None] = None
    value_learning_rate: tyro.conf.Suppress[float | None] = None
    vf_clip: tyro.conf.Suppress[float | None] = 0.2
    vf_coef: tyro.conf.Suppress[float] = 0.1
    lam: tyro.conf.Suppress[float] = 0.95
    head_init_std: tyro.conf.Suppress[float] = 0.0
    whiten_rewards: tyro.conf.Suppress[bool] = False

    def validate(self):
        super().validate()
        self._check_no_value_fields()
        est = ADVANTAGE_ESTIMATORS.get(self.estimator)
        if est is None or est.needs_values:
            names = ", ".join(n for n, e in ADVANTAGE_ESTIMATORS.items() if not e.needs_values)
            hint = " (gae needs a value model: run prefalign ppo)" if est is not None else ""
            raise ValueError(f"--estimator must be one of {names}, got {self.estimator!r}{hint}")
        if self.num_generations < 1:
            raise ValueError(f"--num-generations must be >= 1, got {self.num_generations}")
        if (est.needs_groups or self.dynamic_sampling) and self.num_generations < 2:
            why = f"--estimator {self.estimator}" if est.needs_groups else "--dynamic-sampling"
            raise ValueError(
                f"{why} compares the completions of a prompt: --num-generations must be >= 2, "
                f"got {self.num_generations}"
            )
        if self.resample_rounds < 0 or (self.resample_rounds and not self.dynamic_sampling):
            raise ValueError(
                f"--resample-rounds must be >= 0 and needs --dynamic-sampling (it refills the groups that drops), "
                f"got {self.resample_rounds}" + ("" if self.dynamic_sampling else " without --dynamic-sampling")
            )
        if self.gamma != 1.0 and not est.discounts:  # a whole completion's score: nothing to discount
            raise ValueError(
                f"--gamma does nothing with --estimator {self.estimator} (it scores whole completions); "
                "drop it, or use --estimator reinforce_pp"
            )
        self._check_rewards()
        self._check_overlong()
        if not 0 < self.eps_low < 1 or self.eps_high <= 0:
            raise ValueError(
                f"--clip-eps-low must be in (0, 1) and --clip-eps-high > 0, got {self.eps_low}, {self.eps_high}"
            )
        if self.loss_agg is not None and self.loss_agg not in AGGREGATIONS:
            raise ValueError(f"--loss-agg must be one of {', '.join(AGGREGATIONS)}, got {self.loss_agg!r}")

    def _check_no_value_fields(self) -> None:
        changed = changed_fields(self, VALUE_ONLY, PPOConfig)
        if changed:
            raise ValueError(
                f"{changed[0]} belongs to the value model, which prefalign rl does not have; "
                "drop it (or run prefalign ppo)"
            )

    def _check_overlong(self) -> None:
        buffer, factor = self.overlong_buffer, self.overlong_penalty_factor
        if factor is not None and factor <= 0:
            raise ValueError(f"--overlong-penalty-factor must be > 0, got {factor}")
        if factor is not None and buffer is None:
            raise ValueError(
                f"--overlong-penalty-factor {factor} needs --overlong-buffer (the tokens the penalty grows over)"
            )
        if buffer is not None and buffer < 1:
            raise ValueError(f"--overlong-buffer must be >= 1, got {buffer}")
        if buffer is not None and buffer >= self.max_new_tokens:
            raise ValueError(
                f"--overlong-buffer must be < --max-new-tokens ({self.max_new_tokens}), got {buffer}: the penalty "
                "starts after max_new_tokens - buffer tokens, so every completion would pay it"
            )

    def _check_rewards(self) -> None:
        if "" in self.reward:
            raise ValueError("--reward must not be empty: name a reward-model directory, vader, or module:function")
        if len(set(self.reward)) != len(self.reward):
            raise ValueError(f"--reward given twice: {' '.join(self.reward)}; give each source once")
        if self.reward_weights is None:
            return
        if len(self.reward_weights) != len(self.reward):
            raise ValueError(
                f"--reward-weights has {len(self.reward_weights)} values for {len(self.reward)} "
                "--reward sources; give one weight per source, in their order"
            )

    @property
    def weights(self) -> list[float]:
        return list(self.reward_weights) if self.reward_weights is not None else [1.0] * len(self.reward)

    @property
    def overlong_factor(self) -> float:
        """--overlong-penalty-factor, 1 when unset."""
        return 1.0 if self.overlong_penalty_factor is None else self.overlong_penalty_factor

    @property
    def eps_low(self) -> float:
        return self.clip_eps if self.clip_eps_low is None else self.clip_eps_low

    @property
    def eps_high(self) -> float:
        return self.clip_eps if self.clip_eps_high is None else self.clip_eps_high

    @property
    def aggregation(self) -> str:
        return self.loss_agg or ADVANTAGE_ESTIMATORS[self.estimator].aggregation

    @property
    def completions_per_iteration(self) -> int:
        return self.rollout_batch_size * self.num_generations

    @property
    def total_steps(self) -> int:
        """Iterations: --max-steps, else --episodes (completions) / completions per iteration, rounded up."""
        if self.max_steps is not None:
            return self.max_steps
        if self.episodes is not None:
            return -(-self.episodes // self.completions_per_iteration)
        return 100
