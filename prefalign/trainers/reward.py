"""Reward model training: a scalar head on a decoder LM, Bradley-Terry loss on preference pairs.

Batch (from `PreferenceCollator`, N pairs, T = longest prompt+completion in the batch):
    input_ids, attention_mask, completion_mask: ``(2N, T)``, N chosen rows then N rejected rows, right-padded;
    margin: ``(N,)`` when the data has a margin column; index: ``(N,)``.
One forward over the 2N rows. A row's reward is the score head at its last token before the EOS that ends
every completion (the EOS is masked out, `RewardTrainer.rewards`), through
:func:`prefalign.models.value.last_token_rewards`, the same function `prefalign.rewards` scores with on text
that has no EOS, so the saved model scores at PPO time as it scored here.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from prefalign.data import PreferenceCollator
from prefalign.errors import UserError
from prefalign.losses.reward import bradley_terry_loss
from prefalign.models.value import last_token_rewards
from prefalign.trainers.backend import whole_parameters
from prefalign.trainers.config import TrainConfig
from prefalign.trainers.data import IndexedCollator, load_preference_splits
from prefalign.trainers.loop import Trainer

log = logging.getLogger(__name__)


@dataclass
class RewardConfig(TrainConfig):
    """Train a reward model (--model with a scalar head) on preference pairs with the Bradley-Terry loss."""

    data: str = ""
    """Preference data: .jsonl/.json/.csv/.parquet (optionally .gz) or a hub dataset id; an optional numeric
    margin column asks for a larger reward gap on those pairs."""
    data_format: str | None = None
    """explicit (prompt/chosen/rejected), conversational (message lists) or implicit (HH-RLHF transcripts);
    default: detected from the columns."""
    learning_rate: float = 1e-5
    """Peak learning rate of AdamW (reward models overfit after about one epoch; with LoRA try ~1e-4)."""
    center_rewards_coef: float = 0.0
    """Weight of the centering term mean((r_c + r_r)^2) (Eisenstein et al. 2023; 0.01 is common): pins the
    reward level near 0, which Bradley-Terry alone leaves free. 0 turns it off."""
    use_margin: bool = True
    """Use the data's per-pair margin column when it has one: loss -log sigmoid(r_c - r_r - margin)
    (Llama 2). --no-use-margin ignores the column."""
    head_init_std: float | None = None
    """Std of the normal init of a new score head (bias 0). Default 1/sqrt(hidden_size + 1), as in the N+
    implementation details of RLHF: initial rewards then have a spread about the size of the final hidden
    state's RMS. Only for a new head: a --model that already has a trained score head keeps it."""

    def validate(self):
        super().validate()
        if not self.data:
            raise ValueError("--data is required (a preference file or hub dataset id)")
        if not self.center_rewards_coef >= 0:
            raise ValueError(f"--center-rewards-coef must be >= 0, got {self.center_rewards_coef}")
        if self.head_init_std is not None and not self.head_init_std > 0:
            raise ValueError(f"--head-init-std must be > 0, got {self.head_init_std}")


def load_reward_backbone(name: str, pad_token_id: int, head_init_std: float | None = None, seed: int = 0):
    """``(model, head_info)``: ``name`` as a one-output sequence-classification model, fp32, dropout off.

    From a causal-LM checkpoint the ``score`` head is new: weight ~ normal(0, std) drawn from a generator
    seeded with ``seed`` (so a run and its resume build the same head), bias 0. A checkpoint that already
    has a scalar head (a reward model trained further) keeps it. ``head_info`` is ``{"new", "init_std"}``.
    """
    from transformers import AutoModelForSequenceClassification

    from prefalign.models.loading import _hub_error, disable_dropout, resolve_model
    from prefalign.models.value import pools_last_token

    path = resolve_model(name)
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, pad_token_id=pad_token_id, dtype=torch.float32, output_loading_info=True
        )
    except (OSError, ValueError) as e:
        raise _hub_error(name, e) from None
    except RuntimeError as e:  # transformers raises this for a head of another shape (num_labels != 1)
        if "mismatch" not in str(e):
            raise
        raise UserError(
            f"--model {name}: its classification head does not have one output; a reward model "
            "needs a scalar head (start from a causal LM or a reward model)"
        ) from None
    if not pools_last_token(model):
        raise UserError(
            f"--model {name}: {type(model).__name__} has no linear `score` head on a decoder; the "
            "reward trainer needs a decoder LM (Llama, Mistral, Qwen, GPT-2, ...)"
        )
    head_keys = {f"score.{n}" for n, _ in model.score.named_parameters()}
    missing = set(info["missing_keys"])
    if missing - head_keys:
        raise UserError(
            f"--model {name}: weights {', '.join(sorted(missing - head_keys)[:3])} are missing from "
            "the checkpoint; it does not match its architecture"
        )
    disable_dropout(model)
    model.config.pad_token_id = pad_token_id  # saved with the model: scorers need it
    if not missing & head_keys:
        if head_init_std is not None:
            raise UserError(
                f"--head-init-std: --model {name} already has a trained score head, which is kept; drop --head-init-std"
            )
        return model, {"new": False, "init_std": None}
    std = head_init_std or 1.0 / math.sqrt(model.score.in_features + 1)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad(), whole_parameters(list(model.score.parameters())):
        model.score.weight.normal_(0.0, std, generator=gen)
        if model.score.bias is not None:
            model.score.bias.zero_()
    return model, {"new": True, "init_std": std}


def without_final_token(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` right-padded mask with each row's last real token (the completion's EOS) masked out."""
    mask = attention_mask.clone()
    mask[torch.arange(mask.shape[0], device=mask.device), mask.sum(-1) - 1] = 0
    return mask


class RewardTrainer(Trainer):
    command = "reward"
    lora_task_type = "SEQ_CLS"
    lora_modules_to_save: ClassVar[list[str] | None] = ["score"]  # the new head must train, not just the adapters
    key_metric = "accuracy"

    def __init__(self, cfg: RewardConfig):
        super().__init__(cfg)
        self.cfg: RewardConfig = cfg

    def setup(self) -> None:
        from prefalign.models import load_tokenizer

        cfg = self.cfg
        self.tokenizer = load_tokenizer(cfg.model)
        self.model, self.head_info = load_reward_backbone(
            cfg.model, self.tokenizer.pad_token_id, cfg.head_init_std, cfg.seed
        )
        if self.head_info["new"]:
            log.info("new score head: weight ~ normal(0, %.3g), trained from scratch", self.head_info["init_std"])
        self.train_data, self.eval_data, self.data_info = load_preference_splits(cfg, self.tokenizer)
        self.collator = IndexedCollator(PreferenceCollator(self.tokenizer.pad_token_id))
        has_margin = bool(self.train_data) and self.train_data[0][1].margin is not None  # all rows or none
        self.margins = ("used" if cfg.use_margin else "ignored") if has_margin else "none"
        if has_margin:
            log.info("margin column: %s", "used in the loss" if cfg.use_margin else "ignored (--no-use-margin)")

    def extra_run_info(self) -> dict:
        return {"data": self.data_info, "score_head": self.head_info, "margins": self.margins}

    def collate(self, examples):
        return self.collator(examples)

    def rewards(self, batch) -> torch.Tensor:
        """``(2N,)`` float32 rewards, chosen rows then rejected rows."""
        # Every tokenised completion ends with EOS; hide it so the reward is read at the last content token.
        # That is exactly the text PPO, prefs and eval score (decoded without special tokens), and what HF's
        # own pooling reads when pad == EOS. Attention is causal, so masking the final token changes nothing
        # before it.
        mask = without_final_token(batch["attention_mask"])
        # float32: under bf16 autocast the head's output is bf16, too coarse for the log-sigmoid of a difference
        return self.train_forward(last_token_rewards, batch["input_ids"], mask).float()

    def compute_loss(self, batch):
        return self.compute_loss_rows(batch)[:2]

    def compute_loss_rows(self, batch):
        n = batch["input_ids"].shape[0] // 2
        r = self.rewards(batch)  # (2N,)
        margin = batch.get("margin") if self.cfg.use_margin else None
        loss, stats = bradley_terry_loss(r[:n], r[n:], margin=margin, center_coef=self.cfg.center_rewards_coef)
        return loss, stats, (r[:n] - r[n:]).detach()  # each pair's r_c - r_r: > 0 ranked right (accuracy's count)
