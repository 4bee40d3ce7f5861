"""Supervised fine-tuning: negative log-likelihood of completion tokens only (prompt tokens are context).

Batch (from `SFTCollator`, N examples): ``input_ids, attention_mask, completion_mask (N, T)``, ``index (N,)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from prefalign.data import SFTCollator
from prefalign.losses import sft_loss
from prefalign.models.logprobs import completion_logprobs
from prefalign.trainers.config import TrainConfig
from prefalign.trainers.data import IndexedCollator, load_sft_splits
from prefalign.trainers.loop import Trainer


@dataclass
class SFTConfig(TrainConfig):
    """Fine-tune a causal LM on completions (loss on completion tokens only)."""

    data: str = ""
    """prompt/completion data (.jsonl/.json/.csv/.parquet, optionally .gz), or preference data (its chosen side)."""
    data_format: str | None = None
    """For preference data: explicit, conversational or implicit (default: detected)."""
    learning_rate: float = 2e-5
    """Peak learning rate of AdamW."""

    def validate(self):
        super().validate()
        if not self.data:
            raise ValueError("--data is required (prompt/completion or preference data)")


class SFTTrainer(Trainer):
    command = "sft"
    key_metric = "nll"

    def setup(self) -> None:
        from prefalign.models import load_causal_lm, load_tokenizer

        self.tokenizer = load_tokenizer(self.cfg.model)
        self.model = load_causal_lm(self.cfg.model)
        self.train_data, self.eval_data, self.data_info = load_sft_splits(self.cfg, self.tokenizer)
        self.collator = IndexedCollator(SFTCollator(self.tokenizer.pad_token_id))

    def extra_run_info(self) -> dict:
        return {"data": self.data_info}

    def collate(self, examples):
        return self.collator(examples)

    def loss_weight(self, batch):
        return float(batch["completion_mask"].sum())  # the loss is a token-level mean

    def compute_loss(self, batch):
        logps = self.train_forward(
            completion_logprobs, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
        )
        return sft_loss(logps, batch["completion_mask"])
