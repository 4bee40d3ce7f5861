"""Configuration of `prefalign ppo` (defaults follow Huang et al. 2024, "The N+ Implementation Details
of RLHF with PPO", and TRL's PPO defaults where those are silent)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from prefalign.losses.kl import KL_ESTIMATORS
from prefalign.models.frozen import FROZEN_DTYPES
from prefalign.trainers.config import CommonConfig
from prefalign.validation import check_sampling, flag, require_at_least_one


@dataclass
class PPOConfig(CommonConfig):
    """Optimise a policy with PPO against a reward source, with a per-token KL penalty to a reference."""

    ONE_VALUE: ClassVar[tuple[str, ...]] = ("reward",)  # refused when repeated (`refuse_repeated_flags`)

    prompts: str = ""
    """Prompts: .txt (one per line), .jsonl/.json/.csv/.parquet with a `prompt` column (strings or chat
    messages), or a hub dataset id."""
    prompts_split: str = "train"
    """Split of --prompts when it is a hub dataset id, e.g. test (a local file has none)."""
    reward: str = ""
    """Reward source: a reward-model directory or hub id, a built-in judge (vader), or module:function."""
    chat: bool = False
    """Wrap plain-text prompts in the chat template as a user turn (off: plain continuation)."""
    ref: str | None = None
    """Reference policy (default: a frozen copy of --model; with LoRA, the policy with its adapter off)."""
    frozen_dtype: str = "auto"
    """What the frozen models (the reference: --ref or a copy of --model; a reward model given as --reward) hold
    their linear weights in: auto (bfloat16 when --precision resolves to bf16, else float32), float32, or bfloat16
    (about half their memory; at fp32 precision they then run under a bf16 autocast of their own). Under bf16
    precision the reference computes in bf16 either way (the run's autocast; float32 changes only its storage) and
    gives the same log-probs; a reward model's scores move by bf16 rounding. With --lora-r the reference is the
    policy with its adapter off, which this does not touch. --heldout-judge stays float32."""
    value_model: str | None = None
    """Value model init (default: the reward model when --reward is one, as in the N+ details; else --model
    with a new scalar head)."""
    learning_rate: float = 3e-6
    """Policy learning rate (AdamW)."""
    value_learning_rate: float | None = None
    """Value model learning rate (default: --learning-rate)."""

    # -- run length and batches --
    max_steps: int | None = None
    """PPO iterations (one rollout batch + its update each); default: from --episodes, else 100."""
    episodes: int | None = None
    """Total completions to sample (iterations = episodes / rollout batch, rounded up)."""
    rollout_batch_size: int = 16
    """Prompts sampled per iteration, over all processes (each process samples an equal share)."""
    num_minibatches: int = 1
    """Minibatches per PPO epoch; each is one optimizer step."""
    grad_accum: int = 1
    """Micro-batches per minibatch (memory)."""
    ppo_epochs: int = 4
    """Passes over each rollout batch."""

    # -- sampling --
    max_prompt_length: int = 128
    """Longer prompts keep their last tokens."""
    max_new_tokens: int = 48
    """Most tokens per response."""
    temperature: float = 0.7
    """Sampling temperature; log-probs are computed at the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling: must stay 1.0 (off). The ratio and the KL penalty are computed on the full softmax at
    --temperature, so completions drawn from a truncated distribution would make the update off-policy."""
    top_k: int = 0
    """Top-k sampling: must stay 0 (off), for the same reason as --top-p."""
    stop: list[str] = field(default_factory=list)
    """Stop strings: a response is cut before the first one and counts as ended."""
    decoder: str = "loop"
    """loop: prefalign's decode loop (KV cache, early exit, oneDNN-prepacked linear weights on CPU);
    generate: transformers' model.generate (the same tokens up to float rounding)."""
    missing_eos_penalty: float | None = None
    """Subtract this from the score of responses that did not end (no EOS or stop string)."""

    # -- rewards --
    kl_coef: float = 0.05
    """Per-token KL penalty coefficient (initial value with --adaptive-kl)."""
    kl_estimator: str = "k1"
    """KL estimator of the per-token penalty: k1 (log-ratio), k2 or k3 (Schulman 2020)."""
    adaptive_kl: bool = False
    """Adapt kl_coef towards --target-kl (Ziegler et al. 2019)."""
    target_kl: float = 6.0
    """Target sequence KL of the adaptive controller (nats)."""
    kl_horizon: int = 10000
    """Horizon of the adaptive controller (episodes)."""
    score_clip: float | None = None
    """Clip scores to [-c, c] before shaping."""
    whiten_rewards: bool = False
    """Whiten per-token rewards over the batch (scale only) before GAE."""
    reward_batch_size: int = 16
    """Batch size when scoring with a reward model."""

    # -- PPO --
    clip_eps: float = 0.2
    """Policy ratio clip range epsilon."""
    vf_clip: float | None = 0.2
    """Value clip range (none: unclipped value loss)."""
    vf_coef: float = 0.1
    """Weight of the value loss. The value model has its own AdamW, which divides out a constant scale of its
    gradient: this weight changes its update only through gradient clipping (--max-grad-norm, per model) and AdamW's
    eps; --value-learning-rate sets its step size."""
    ent_coef: float = 0.0
    """Weight of the entropy bonus."""
    gamma: float = 1.0
    """Discount."""
    lam: float = 0.95
    """GAE lambda."""
    early_stop_kl: float | None = None
    """Stop an iteration's PPO epochs once the mean approx KL of an epoch exceeds this."""
    head_init_std: float = 0.0
    """Std of a new value head (0: zeros, so initial values are 0; used when the value model is not a reward model)."""

    sample_every: int = 10
    """Log sample completions with their scores every this many iterations (samples.jsonl, TensorBoard)."""

    # -- held-out evaluation: gold and proxy against KL while training (Gao, Schulman, Hilton 2022) --
    heldout_prompts: str | None = None
    """Held-out prompts, in --prompts' formats (their other columns go to --heldout-judge and --reward, as
    --prompts' go to --reward): before the first update, every --heldout-every iterations and after the last, one
    completion per prompt from the current policy, scored by --heldout-judge (gold) and --reward (proxy), with its
    KL to the reference (heldout/* in metrics.jsonl). Under N processes each takes a contiguous 1/N of the
    prompts; the remainder (count mod N) is left out."""
    heldout_split: str = "train"
    """Split of --heldout-prompts when it is a hub dataset id, e.g. test (a local file has none)."""
    heldout_judge: str | None = None
    """Gold judge of the held-out evaluation: a built-in judge (vader), module:function, or a reward-model
    directory or hub id; required with --heldout-prompts."""
    heldout_every: int = 0
    """Iterations between held-out evaluations (0: off; needs --heldout-prompts otherwise); a multiple of
    --logging-steps, since each point is logged in its iteration's row."""
    heldout_limit: int | None = None
    """Evaluate the first M held-out prompts only (default, or fewer prompts than M: all of them)."""

    def sampling(self):
        """The rollouts' `SamplingConfig` (its fields were checked by `validate`)."""
        from prefalign.rollout.generate import SamplingConfig

        return SamplingConfig(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            stop=list(self.stop),
            decoder=self.decoder,
        )

    def validate(self):
        super().validate()
        check_sampling(self)  # the sampling flags, checked with the rest before any model loads
        if not self.prompts:
            raise ValueError("--prompts is required (a prompt file or hub dataset id)")
        if not self.reward:
            raise ValueError("--reward is required (a reward-model directory, vader, or module:function)")
        require_at_least_one(
            self,
            "rollout_batch_size",
            "num_minibatches",
            "grad_accum",
            "ppo_epochs",
            "max_prompt_length",
            "reward_batch_size",
            "sample_every",
            "kl_horizon",
            "max_steps",
            "episodes",
        )
        if self.completions_per_iteration < 2:
            # whitening takes an unbiased variance over the iteration's response tokens, and a lone completion may be
            # a single token (EOS first): refused here rather than a ValueError mid-run
            raise ValueError(
                f"--rollout-batch-size {self.rollout_batch_size}: {self.completions_per_iteration} completion per "
                "iteration; advantages are whitened over the iteration's response tokens, which needs at least 2, "
                "and one completion can be a single token (EOS first): sample at least 2 completions per iteration"
            )
        if self.max_steps is not None and self.episodes is not None:
            raise ValueError("give --max-steps or --episodes, not both")
        if self.rollout_batch_size % (self.num_minibatches * self.grad_accum):
            raise ValueError(
                f"--rollout-batch-size {self.rollout_batch_size} must be divisible by --num-minibatches "
                f"x --grad-accum = {self.num_minibatches * self.grad_accum}"
            )
        if not 0 < self.clip_eps < 1:
            raise ValueError(f"--clip-eps must be in (0, 1), got {self.clip_eps}")
        for name in ("vf_clip", "score_clip", "value_learning_rate"):  # None: off, or --learning-rate's
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{flag(name)} must be > 0, got {getattr(self, name)}")
        for name in ("kl_coef", "vf_coef", "ent_coef"):  # each named alone: rl has no --vf-coef
            if getattr(self, name) < 0:
                raise ValueError(f"{flag(name)} must be >= 0, got {getattr(self, name)}")
        if self.frozen_dtype != "auto" and self.frozen_dtype not in FROZEN_DTYPES:
            raise ValueError(f"--frozen-dtype must be auto, float32 or bfloat16, got {self.frozen_dtype!r}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"--kl-estimator must be one of {', '.join(KL_ESTIMATORS)}, got {self.kl_estimator!r}")
        for name in ("gamma", "lam"):  # rl has no --lam
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{flag(name)} must be in [0, 1], got {getattr(self, name)}")
        if self.target_kl <= 0:
            raise ValueError(f"--target-kl must be > 0, got {self.target_kl}")
        if self.ref is not None and self.lora_r:
            raise ValueError(
                "--ref conflicts with LoRA: with --lora-r the reference is the policy with its adapter "
                "off; drop --ref or --lora-r"
            )
        self._check_on_policy()
        self._check_heldout()

    def _check_on_policy(self) -> None:
        """What would make the update's log-probs differ from those of the policy that sampled: the ratio must
        be exactly 1 on the first minibatch (the N+ details turn dropout off for this reason)."""
        if self.top_p != 1.0 or self.top_k != 0:
            raise ValueError(
                f"--top-p {self.top_p} / --top-k {self.top_k}: on-policy RL samples the full distribution at "
                "--temperature, the one whose log-probs the ratio and the KL penalty use; leave --top-p 1 and "
                "--top-k 0"
            )
        if self.lora_dropout:
            raise ValueError(
                f"--lora-dropout must be 0 in on-policy RL, got {self.lora_dropout}: dropout in the update's "
                "forward makes its log-probs differ from the sampling policy's (the ratio is not 1 before any "
                "step); drop --lora-dropout"
            )

    def _check_heldout(self) -> None:
        """The held-out evaluation's flags: all or none of prompts, judge and cadence."""
        if self.heldout_prompts and not self.heldout_judge:
            raise ValueError("--heldout-prompts needs --heldout-judge (the gold judge of the held-out completions)")
        if self.heldout_judge and not self.heldout_prompts:
            raise ValueError("--heldout-judge needs --heldout-prompts (the prompts whose completions it judges)")
        if self.heldout_every < 0:
            raise ValueError(f"--heldout-every must be >= 0 (0: off), got {self.heldout_every}")
        if self.heldout_limit is not None and self.heldout_limit < 1:
            raise ValueError(f"--heldout-limit must be >= 1, got {self.heldout_limit}")
        if self.heldout_prompts and not self.heldout_every:
            raise ValueError(
                "--heldout-prompts is given but --heldout-every is 0 (off): set --heldout-every N (iterations "
                "between held-out evaluations) or drop --heldout-prompts and --heldout-judge"
            )
        if not self.heldout_prompts and (self.heldout_every or self.heldout_limit is not None):
            raise ValueError("--heldout-every and --heldout-limit need --heldout-prompts and --heldout-judge")
        if self.heldout_every % self.logging_steps:
            raise ValueError(
                f"--heldout-every {self.heldout_every} must be a multiple of --logging-steps {self.logging_steps}: "
                "each held-out point is logged in its iteration's metrics row"
            )

    @property
    def total_steps(self) -> int:
        if self.max_steps is not None:
            return self.max_steps
        if self.episodes is not None:
            return -(-self.episodes // self.rollout_batch_size)
        return 100

    @property
    def completions_per_iteration(self) -> int:
        """Responses sampled per iteration (one per prompt: the rollout batch)."""
        return self.rollout_batch_size

    @property
    def minibatch_size(self) -> int:
        return self.rollout_batch_size // self.num_minibatches

    @property
    def micro_batch_size(self) -> int:
        return self.minibatch_size // self.grad_accum
