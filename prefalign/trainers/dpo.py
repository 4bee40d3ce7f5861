"""Direct Preference Optimization from (prompt, chosen, rejected) pairs, no reward model.

Batch (from `PreferenceCollator`, N pairs, T = longest prompt+completion in the batch):
    input_ids, attention_mask, completion_mask: ``(2N, T)``, N chosen rows then N rejected rows;
    index: ``(N,)`` position of each pair in the trainer's data (keys the precomputed reference).
One forward over the 2N rows gives both sides; the LM head runs only on completion tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from prefalign.errors import UserError
from prefalign.losses import dpo_loss
from prefalign.losses.dpo import DPO_LOSSES
from prefalign.models.logprobs import completion_logprobs, sequence_logprobs
from prefalign.trainers.checkpoint import is_zero3
from prefalign.trainers.config import TrainConfig
from prefalign.data import PreferenceCollator
from prefalign.trainers.data import IndexedCollator, load_preference_splits
from prefalign.trainers.lora import adapter_off
from prefalign.trainers.loop import Trainer

log = logging.getLogger(__name__)

DEFAULT_BETA = 0.1  # the DPO paper's common setting
REFERENCE_FREE_BETA = 1.0  # makes reference_free the plain pairwise likelihood loss of the seed


@dataclass
class DPOConfig(TrainConfig):
    """Train a policy with DPO (or a relative: ipo, hinge, robust, reference_free) on preference pairs."""

    data: str = ""
    """Preference data: .jsonl/.json/.csv/.parquet (optionally .gz) or a hub dataset id."""
    data_format: str | None = None
    """explicit (prompt/chosen/rejected), conversational (message lists) or implicit (HH-RLHF transcripts);
    default: detected from the columns."""
    ref: str | None = None
    """Reference model (default: a frozen copy of --model; with LoRA, the model with its adapter off)."""
    loss_type: str = "sigmoid"
    """sigmoid (DPO), ipo, hinge, robust, or reference_free: -log sigmoid(beta (logp_c - logp_r))."""
    beta: float | None = None
    """Strength of the KL constraint to the reference (inverse temperature of the implicit reward); default 0.1,
    and 1.0 for --loss-type reference_free (the seed's -log sigmoid(logp_c - logp_r)). run.json records the
    value used."""
    label_smoothing: float = 0.0
    """Probability that a label is flipped (conservative DPO for sigmoid; robust DPO's epsilon)."""
    precompute_ref: bool = False
    """Compute reference log-probs once before training and hold no reference model while training."""

    def validate(self):
        super().validate()
        if not self.data:
            raise ValueError("--data is required (a preference file or hub dataset id)")
        if self.loss_type not in DPO_LOSSES:
            raise ValueError(f"--loss-type must be one of {', '.join(DPO_LOSSES)}, got {self.loss_type!r}")
        if self.beta is not None and not self.beta > 0:
            raise ValueError(f"--beta must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"--label-smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.ref is not None and self.lora_r:
            raise ValueError("--ref conflicts with LoRA: with --lora-r the reference is the model with its adapter "
                             "off; drop --ref or --lora-r")
        if self.ref is not None and self.loss_type == "reference_free":
            raise ValueError("--ref is unused by --loss-type reference_free; drop one of them")

    @property
    def uses_reference(self) -> bool:
        return self.loss_type != "reference_free"

    @property
    def resolved_beta(self) -> float:
        """--beta, or the loss type's default (derived, never written back: config.yaml keeps the user's value,
        so a rerun with another --loss-type gets that type's default)."""
        if self.beta is not None:
            return self.beta
        return REFERENCE_FREE_BETA if self.loss_type == "reference_free" else DEFAULT_BETA


class DPOTrainer(Trainer):
    command = "dpo"
    key_metric = "rewards/accuracies"

    def __init__(self, cfg: DPOConfig):
        super().__init__(cfg)
        self.cfg: DPOConfig = cfg
        self.ref_model = None
        self.ref_cache: torch.Tensor | None = None  # (num_pairs, 2): reference log-probs, chosen and rejected

    def setup(self) -> None:
        from prefalign.models import load_causal_lm, load_tokenizer

        cfg = self.cfg
        self.tokenizer = load_tokenizer(cfg.model)
        self.model = load_causal_lm(cfg.model)
        self.train_data, self.eval_data, self.data_info = load_preference_splits(cfg, self.tokenizer)
        self.collator = IndexedCollator(PreferenceCollator(self.tokenizer.pad_token_id))
        if cfg.uses_reference and not cfg.lora_r:
            if is_zero3(self.accelerator):
                raise UserError("dpo under DeepSpeed ZeRO-3 needs --lora-r (the reference is the adapter-off "
                                "policy): a separate reference model would be loaded partitioned, outside any engine; "
                                "or shard with FSDP (examples/accelerate/fsdp.yaml), which keeps it whole")
            self.ref_model = load_causal_lm(cfg.ref or cfg.model)
            self.ref_model.requires_grad_(False).eval()
            if len(self.ref_model.get_input_embeddings().weight) != len(self.model.get_input_embeddings().weight):
                raise UserError(f"--ref {cfg.ref}: its vocabulary differs from --model's; DPO needs the same tokenizer")
            # accelerate places only what it prepares (the policy); the frozen reference follows it by hand
            self.ref_model.to(self.accelerator.device)

    def extra_run_info(self) -> dict:
        return {"data": self.data_info, "beta": self.cfg.resolved_beta}

    def collate(self, examples):
        return self.collator(examples)

    def _seq_logps(self, model, batch) -> torch.Tensor:
        """``(2N,)`` sequence log-probs; ``model=None`` means the policy through the training engine."""
        args = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        logps = self.call(completion_logprobs, *args) if model is None else completion_logprobs(model, *args)
        # IPO's margin target 1/(2 beta) is meant for length-averaged log-probs (Azar et al. 2023).
        return sequence_logprobs(logps, batch["completion_mask"], average=self.cfg.loss_type == "ipo")

    @torch.no_grad()
    def reference_logps(self, batch) -> torch.Tensor:
        """``(2N,)`` reference sequence log-probs: cached, adapter-off, or the frozen reference model."""
        if self.ref_cache is not None:
            idx = batch["index"].cpu()
            got = self.ref_cache[idx]  # (N, 2)
            return torch.cat([got[:, 0], got[:, 1]]).to(batch["input_ids"].device)
        if self.cfg.lora_r:  # the policy's own forward (under FSDP the sharded root gathers), adapter off
            with adapter_off(self.model):
                return self._seq_logps(None, batch)
        return self._seq_logps(self.ref_model, batch)

    def before_train(self) -> None:
        if not (self.cfg.precompute_ref and self.cfg.uses_reference):
            return
        from tqdm.auto import tqdm

        data = self.train_data + self.eval_data
        cache = torch.zeros(len(data), 2)
        bs = self.cfg.batch_size
        for lo in tqdm(range(0, len(data), bs), desc="reference log-probs", unit="batch",
                       disable=not self.accelerator.is_main_process):
            batch = self._to_device(self.collate(data[lo : lo + bs]))
            with self.accelerator.autocast():
                ref = self.reference_logps(batch).float().cpu()
            n = len(batch["index"])
            cache[batch["index"].cpu()] = torch.stack([ref[:n], ref[n:]], dim=1)
        self.ref_cache = cache
        self.ref_model = None  # precomputed: no reference model held while training

    def compute_loss(self, batch):
        n = batch["input_ids"].shape[0] // 2
        seq = self._seq_logps(None, batch)  # (2N,)
        ref = self.reference_logps(batch) if self.cfg.uses_reference else None
        loss, stats = dpo_loss(
            seq[:n], seq[n:],
            None if ref is None else ref[:n], None if ref is None else ref[n:],
            loss_type=self.cfg.loss_type, beta=self.cfg.resolved_beta, label_smoothing=self.cfg.label_smoothing,
        )
        stats["logps/chosen"] = seq[:n].detach().mean()
        stats["logps/rejected"] = seq[n:].detach().mean()
        return loss, stats
