"""Options every trainer shares: optimisation, precision, LoRA, run length, checkpoints, outputs."""

from __future__ import annotations

from dataclasses import dataclass, field

from prefalign.trackers import DEFAULT_REPORT_TO, parse_report_to
from prefalign.validation import Validated, changed_fields, flag, require_at_least_one

PRECISIONS = ("auto", "fp32", "bf16")
"""The values of --precision (every trainer's, and compare's for all its stages)."""


def check_precision(precision: str) -> None:
    """Refuse a --precision that is not one of `PRECISIONS`."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be auto, fp32 or bf16, got {precision!r}")


LORA_OPTIONS = ("lora_alpha", "lora_dropout", "lora_target_modules")
"""CommonConfig's LoRA fields that only a LoRA run (--lora-r > 0) reads."""


@dataclass
class CommonConfig(Validated):
    """Options shared by every trainer (sft, dpo, reward, ppo)."""

    model: str = "smollm2-135m"
    """Starting model: Hugging Face hub id, local directory, or an embedded name (smollm2-135m)."""
    output: str = "runs/train"
    """Output directory: config.yaml, metrics.jsonl, tensorboard/, checkpoints/, final/."""
    overwrite: bool = False
    """Replace a previous run's files in --output (default: refuse a non-empty output directory): its checkpoints,
    final weights, metrics and TensorBoard events are removed when this run starts; other files are left."""
    resume: str | None = None
    """Continue a run: 'latest' (newest complete checkpoint in --output) or a checkpoint directory."""
    seed: int = 0
    """Seed for initialisation, data order and sampling."""

    # -- optimisation --
    learning_rate: float = 5e-6
    """Peak learning rate of AdamW."""
    lr_scheduler: str = "linear"
    """Schedule after warmup: constant, linear (to 0) or cosine (to 0)."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup from 0 to the peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and norms)."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this (none: no clipping, the norm is still logged)."""

    # -- precision and memory --
    precision: str = "auto"
    """fp32, bf16 (autocast; weights and optimizer stay fp32) or auto: bf16 on a GPU or a CPU with bf16
    instructions (avx512_bf16 / amx), else fp32."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    lean_activations: bool = True
    """Llama-family RMSNorm and SwiGLU MLP layers, and the GEMMs after each norm, keep only the layers' inputs (and the
    norm's rsqrt) for the backward and rebuild the rest elementwise there: 48% less activation memory for SmolLM2
    in fp32, the same forward bits, gradients equal to float32 rounding. Off: transformers' own forwards. Moot with
    --gradient-checkpointing."""

    # -- LoRA --
    lora_r: int = 0
    """LoRA rank; 0 means full fine-tuning."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    lora_dropout: float = 0.0
    """Dropout inside LoRA adapters (0 keeps log-probs deterministic, as RL needs)."""
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Modules that get adapters: names like q_proj v_proj, or all-linear."""
    merge_lora: bool = False
    """Also save final-merged/: the base model with the adapter merged in."""

    # -- logging and checkpoints --
    logging_steps: int = 1
    """Log metrics every this many optimizer steps (PPO: iterations)."""
    report_to: str = DEFAULT_REPORT_TO
    """Trackers that get the metrics besides metrics.jsonl, a comma list: tensorboard (tensorboard/), trackio
    (trackio/, a local SQLite database; pip install 'prefalign[trackio]'), wandb (wandb/, an offline run for
    `wandb sync`; pip install 'prefalign[wandb]'), or none."""
    save_steps: int | None = None
    """Checkpoint every this many optimizer steps (PPO: iterations; default: only at the end)."""
    save_total_limit: int = 2
    """Keep this many newest checkpoints."""
    max_nonfinite_steps: int = 5
    """Skip an optimizer step whose loss or gradient is not finite (counted in skipped_steps); stop after this many
    in a row, the last good checkpoint intact."""

    def validate(self):
        require_at_least_one(self, "logging_steps", "save_total_limit", "max_nonfinite_steps", "save_steps")
        if self.learning_rate <= 0:
            raise ValueError(f"--learning-rate must be > 0, got {self.learning_rate}")
        if self.lr_scheduler not in ("constant", "linear", "cosine"):
            raise ValueError(f"--lr-scheduler must be constant, linear or cosine, got {self.lr_scheduler!r}")
        for name in ("warmup_steps", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{flag(name)} must be >= 0, got {getattr(self, name)}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"--max-grad-norm must be > 0, got {self.max_grad_norm}")
        check_precision(self.precision)
        if not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"--adam-betas must each be in [0, 1), got {' '.join(map(str, self.adam_betas))}")
        if self.lora_r < 0:
            raise ValueError(f"--lora-r must be >= 0, got {self.lora_r}")
        if self.lora_r and not self.lora_alpha > 0:
            raise ValueError(f"--lora-alpha must be > 0 (the update is scaled by alpha / r), got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if self.merge_lora and self.lora_r == 0:
            raise ValueError("--merge-lora needs LoRA (--lora-r > 0)")
        if self.lora_r == 0 and (idle := self._lora_options_changed()):
            verb = "does" if len(idle) == 1 else "do"
            raise ValueError(
                f"{' and '.join(map(flag, idle))} {verb} nothing without LoRA (--lora-r 0: full fine-tuning); "
                "give --lora-r > 0 to train an adapter, or drop it"
            )
        parse_report_to(self.report_to)

    def _lora_options_changed(self) -> list[str]:
        """LoRA's options (besides --lora-r) set off their defaults: a full fine-tune ignores them. Untouched
        defaults pass, so a full run's config.yaml (which holds them all) resumes."""
        return changed_fields(self, LORA_OPTIONS, CommonConfig)

    @property
    def trackers(self) -> tuple[str, ...]:
        """The tracker names of --report-to (derived, never written back)."""
        return parse_report_to(self.report_to)


@dataclass
class TrainConfig(CommonConfig):
    """Options shared by the dataset trainers (sft, dpo, reward)."""

    # -- run length and batches --
    epochs: float = 1.0
    """Passes over the training data (ignored when --max-steps is given)."""
    max_steps: int | None = None
    """Optimizer steps to run (overrides --epochs)."""
    batch_size: int = 8
    """Examples (pairs for dpo/reward) per micro-batch on each process."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step: global batch = batch_size x grad_accum x processes."""
    forward_batch_size: int | None = None
    """Examples per forward pass inside a micro-batch: the micro-batch runs in chunks of this many, each padded to
    its own longest row, gradients accumulated (the same update up to float rounding; less activation memory and
    padding). Default: on CPU as few equal chunks as keep each under ~512 padded positions (rows x length),
    measured faster there; on GPU the whole micro-batch."""

    # -- data --
    data_split: str = "train"
    """Split of --data when it is a hub dataset id, e.g. test (a local file has none)."""
    max_length: int = 512
    """Most tokens of prompt + completion; longer prompts keep their end, longer completions are dropped."""
    max_prompt_length: int | None = None
    """Most prompt tokens (default: max_length // 2)."""
    eval_split: float = 0.0
    """Fraction of the prompts held out for evaluation with every example of theirs (0: none, unless --eval-data
    is given): a prompt's pairs share text, so a held-out pair whose prompt also trains would be scored on what
    training saw."""
    eval_split_seed: int | None = None
    """Seed of the --eval-split draw (default: --seed); runs of several training seeds that must evaluate on the
    same held-out prompts (prefalign compare) give one value."""
    eval_data: str | None = None
    """A separate evaluation file (overrides --eval-split)."""
    eval_data_split: str = "train"
    """Split of --eval-data when it is a hub dataset id, e.g. test (a local file has none)."""

    eval_steps: int | None = None
    """Evaluate every this many optimizer steps (default: only at the end)."""

    def validate(self):
        super().validate()
        require_at_least_one(
            self,
            "batch_size",
            "grad_accum",
            "max_length",
            "max_steps",
            "eval_steps",
            "max_prompt_length",
            "forward_batch_size",
        )
        if self.max_steps is None and self.epochs <= 0:
            raise ValueError(f"--epochs must be > 0, got {self.epochs}")
        if not 0 <= self.eval_split < 1:
            raise ValueError(f"--eval-split must be in [0, 1), got {self.eval_split}")
        if self.eval_steps is not None and not (self.eval_split or self.eval_data):  # it evaluated nothing
            raise ValueError(
                f"--eval-steps {self.eval_steps} needs an evaluation set: give --eval-split or --eval-data, "
                "or drop --eval-steps"
            )
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise ValueError("--max-prompt-length must be smaller than --max-length")
        from prefalign.data.preferences import FORMATS

        fmt = getattr(self, "data_format", None)  # sft, dpo and reward have one
        if fmt not in (None, "auto", *FORMATS):
            raise ValueError(f"--data-format must be one of {', '.join(FORMATS)} (default: detected), got {fmt!r}")

    @property
    def prompt_budget(self) -> int:
        """Prompt tokens allowed (derived, never written back)."""
        return self.max_prompt_length or self.max_length // 2
