"""Direct Preference Optimization from (prompt, chosen, rejected) pairs, no reward model.

Batch (from `PreferenceCollator`, N pairs, T = longest prompt+completion in the batch):
    input_ids, attention_mask, completion_mask: ``(2N, T)``, N chosen rows then N rejected rows;
    index: ``(N,)`` position of each pair in the trainer's data (keys the precomputed reference).
One forward over the 2N rows gives both sides; the LM head runs only on completion tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Annotated, Any

import torch
import tyro

from prefalign.data import PreferenceCollator
from prefalign.errors import UserError
from prefalign.losses import dpo_pair_loss, pair_loss_summary
from prefalign.losses.dpo import DPO_LOSSES, HYPERPARAM_NAMES, NOTATION, DPOVariant, owners, resolve_hyperparams
from prefalign.methods import METHODS, Method
from prefalign.models.logprobs import completion_logprobs, sequence_logprobs
from prefalign.trainers.config import TrainConfig
from prefalign.trainers.data import IndexedCollator, load_preference_splits
from prefalign.trainers.loop import Trainer
from prefalign.trainers.lora import adapter_off
from prefalign.validation import flag

log = logging.getLogger(__name__)


def _default(name: str) -> float:
    """The one default a hyperparameter has in every variant that declares it (a config field default)."""
    [default] = {v.declared(name).default for v in owners(name)}
    return default


# --help text generated from the table in prefalign/losses/dpo.py (tyro shows it after the field's docstring).
def _loss_type_hint(default: str) -> str:
    lines = [f"  {v.name}: {v.help}" for v in DPO_LOSSES.values()]
    return f"(default: {default}) {NOTATION}. One of:\n" + "\n".join(lines)


def _hyperparam_hint(name: str) -> str:
    users = owners(name)
    by_default: dict[float, list[str]] = {}
    by_help: dict[str, list[str]] = {}
    for v in users:
        by_default.setdefault(v.declared(name).default, []).append(v.name)
        by_help.setdefault(v.declared(name).help, []).append(v.name)
    if len(by_default) == 1:
        default = f"default: {next(iter(by_default)):g}"
    else:
        default = "default: " + "; ".join(f"{d:g} for {', '.join(names)}" for d, names in by_default.items())
    others = len(users) < len(DPO_LOSSES)
    refused = "; another --loss-type refuses a value other than the default" if others else ""
    lines = [f"  {', '.join(names)}: {text}" for text, names in by_help.items()]
    return f"({default}; must be {users[0].declared(name).allowed()}{refused})\n" + "\n".join(lines)


def _hint(name: str):
    """tyro's help hint for a field, generated from the table."""
    return tyro.conf.arg(help_behavior_hint=lambda default: _hyperparam_hint(name))


@dataclass
class DPOConfig(TrainConfig):
    """Train a policy with a DPO-family preference loss (--loss-type: an entry of the table
    `prefalign.losses.dpo.DPO_LOSSES`) on preference pairs."""

    data: str = ""
    """Preference data: .jsonl/.json/.csv/.parquet (optionally .gz) or a hub dataset id."""
    data_format: str | None = None
    """explicit (prompt/chosen/rejected), conversational (message lists) or implicit (HH-RLHF transcripts);
    default: detected from the columns."""
    ref: str | None = None
    """Reference model (default: a frozen copy of --model; with LoRA, the model with its adapter off); unused by
    the loss types that take no reference."""
    loss_type: Annotated[str, tyro.conf.arg(help_behavior_hint=_loss_type_hint)] = "sigmoid"
    """The loss of the DPO family to train with, by name."""
    beta: Annotated[float | None, _hint("beta")] = None
    """The loss's beta; its default depends on --loss-type. run.json records the value used."""
    label_smoothing: Annotated[float, _hint("label_smoothing")] = _default("label_smoothing")
    """Probability that a label is flipped (conservative DPO for sigmoid; robust DPO's epsilon)."""
    simpo_gamma: Annotated[float, _hint("simpo_gamma")] = _default("simpo_gamma")
    """SimPO's target reward margin gamma."""
    orpo_lambda: Annotated[float, _hint("orpo_lambda")] = _default("orpo_lambda")
    """ORPO's weight lambda of the odds-ratio term."""
    precompute_ref: bool = False
    """Compute reference log-probs once before training and hold no reference model while training (a no-op for
    the loss types that take no reference)."""

    def validate(self):
        super().validate()
        if not self.data:
            raise ValueError("--data is required (a preference file or hub dataset id)")
        if self.loss_type not in DPO_LOSSES:
            raise ValueError(f"--loss-type must be one of {', '.join(DPO_LOSSES)}, got {self.loss_type!r}")
        resolve_hyperparams(self.variant, self._given_hyperparams(), flag=flag)  # ranges; refuses an unused one
        if self.ref is not None and self.lora_r:
            raise ValueError(
                "--ref conflicts with LoRA: with --lora-r the reference is the model with its adapter "
                "off; drop --ref or --lora-r"
            )
        if self.ref is not None and not self.uses_reference:
            raise ValueError(
                f"--ref is unused by --loss-type {self.loss_type} (it takes no reference); drop one of them"
            )

    @property
    def variant(self) -> DPOVariant:
        return DPO_LOSSES[self.loss_type]

    @property
    def uses_reference(self) -> bool:
        return self.variant.uses_reference

    @property
    def loss_hyperparams(self) -> dict[str, float]:
        """The loss type's hyperparameters as the loss gets them: the user's values, the table's default for an
        unset --beta (derived, never written back: config.yaml keeps the user's value, so a rerun with another
        --loss-type gets that type's default)."""
        return resolve_hyperparams(self.variant, self._given_hyperparams(), flag=flag)

    def _given_hyperparams(self) -> dict[str, float | None]:
        return {name: getattr(self, name) for name in HYPERPARAM_NAMES}

    @property
    def resolved_beta(self) -> float | None:
        """The beta the loss uses (None for a loss type without one, orpo)."""
        return self.loss_hyperparams.get("beta")


class DPOTrainer(Trainer):
    command = "dpo"
    key_metric = "rewards/accuracies"

    def __init__(self, cfg: DPOConfig):
        super().__init__(cfg)
        self.cfg: DPOConfig = cfg
        self.ref_model: Any = None  # a frozen reference model (setup); None: adapter-off policy or precomputed
        self.ref_cache: torch.Tensor | None = None  # (num_pairs, 2): reference log-probs, chosen and rejected

    def setup(self) -> None:
        from prefalign.models import load_causal_lm, load_tokenizer
        from prefalign.models.frozen import load_reference
        from prefalign.models.loading import require_same_vocabulary
        from prefalign.trainers.backend import autocast_dtype

        cfg = self.cfg
        self.tokenizer = load_tokenizer(cfg.model)
        self.model = load_causal_lm(cfg.model)
        self.train_data, self.eval_data, self.data_info = load_preference_splits(cfg, self.tokenizer)
        self.collator = IndexedCollator(PreferenceCollator(self.tokenizer.pad_token_id))
        if cfg.uses_reference and not cfg.lora_r:
            if self.backend.zero3:
                raise UserError(
                    "dpo under DeepSpeed ZeRO-3 needs --lora-r (the reference is the adapter-off "
                    "policy): a separate reference model would be loaded partitioned, outside any engine; "
                    "or shard with FSDP (examples/accelerate/fsdp.yaml), which keeps it whole"
                )
            self.ref_model = load_reference(
                cfg.ref or cfg.model, self.accelerator.device, autocast_dtype(self.accelerator)
            )
            if cfg.ref:
                require_same_vocabulary(self.ref_model, cfg.ref, self.tokenizer, f"--ref {cfg.ref}")

    def extra_run_info(self) -> dict:
        return {"data": self.data_info, **self.cfg.loss_hyperparams}

    def card_method(self) -> Method:
        """DPO with the --loss-type's line of `DPO_LOSSES` (its formula and paper) and the notation it uses."""
        variant = self.cfg.variant
        return METHODS["dpo"].variant(variant.name, f"{variant.help}; {NOTATION}")

    def collate(self, examples):
        return self.collator(examples)

    def _seq_logps(self, model, batch) -> torch.Tensor:
        """``(2N,)`` sequence log-probs; ``model=None`` means the policy through the training engine."""
        args = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        logps = self.train_forward(completion_logprobs, *args) if model is None else completion_logprobs(model, *args)
        # per-token means where the loss type asks (IPO's target 1/(2 beta), SimPO's and ORPO's length-normalised
        # rewards); the reference goes through here too, so it is averaged alike
        return sequence_logprobs(logps, batch["completion_mask"], average=self.cfg.variant.length_averaged)

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
        from prefalign.progress import ProgressBar

        data = self.train_data + self.eval_data
        cache = torch.zeros(len(data), 2)
        bs = self.cfg.batch_size
        for lo in ProgressBar(
            range(0, len(data), bs),
            desc="reference log-probs",
            unit="batch",
            disable=not self.accelerator.is_main_process,
        ):
            batch = self._to_device(self.collate(data[lo : lo + bs]))
            with self.accelerator.autocast():
                ref = self.reference_logps(batch).float().cpu()
            n = len(batch["index"])
            cache[batch["index"].cpu()] = torch.stack([ref[:n], ref[n:]], dim=1)
        self.ref_cache = cache
        self.ref_model = None  # precomputed: no reference model held while training

    def compute_loss(self, batch):
        return self.compute_loss_rows(batch)[:2]

    def compute_loss_rows(self, batch):
        n = batch["input_ids"].shape[0] // 2
        seq = self._seq_logps(None, batch)  # (2N,)
        ref = self.reference_logps(batch) if self.cfg.uses_reference else None
        out = dpo_pair_loss(
            seq[:n],
            seq[n:],
            None if ref is None else ref[:n],
            None if ref is None else ref[n:],
            loss_type=self.cfg.loss_type,
            **self.cfg.loss_hyperparams,
        )
        loss, stats = pair_loss_summary(out)
        stats["logps/chosen"] = seq[:n].detach().mean()
        stats["logps/rejected"] = seq[n:].detach().mean()
        # each pair's implicit-reward margin: > 0 is the pair ranked right (rewards/accuracies' count)
        return loss, stats, (out.chosen_rewards - out.rejected_rewards).detach().float()
