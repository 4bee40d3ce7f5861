"""Pure torch losses for preference alignment: tensors in, ``(loss, stats)`` out.

Nothing here imports anything but torch and the standard library, so every formula can be tested in
milliseconds. Shapes: ``B`` batch, ``T`` response tokens, ``V`` vocabulary.
"""

from prefalign.losses.advantages import ADVANTAGE_ESTIMATORS, AdvantageInputs
from prefalign.losses.dpo import DPO_LOSSES, dpo_loss, dpo_pair_loss, pair_loss_summary
from prefalign.losses.gae import gae
from prefalign.losses.kl import KL_ESTIMATORS, kl_k1, kl_k2, kl_k3, kl_penalty
from prefalign.losses.policy import (
    AGGREGATIONS,
    aggregate_loss,
    clipped_policy_token_loss,
    informative_groups,
    kl_loss_term,
)
from prefalign.losses.ppo import entropy_from_logits, ppo_policy_loss, ppo_value_loss
from prefalign.losses.reward import bradley_terry_loss
from prefalign.losses.sft import sft_loss
from prefalign.losses.shaping import apply_missing_eos_penalty, explained_variance, kl_shaped_rewards, overlong_penalty
from prefalign.losses.stats import masked_mean, masked_var, masked_whiten

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGGREGATIONS",
    "DPO_LOSSES",
    "KL_ESTIMATORS",
    "AdvantageInputs",
    "aggregate_loss",
    "apply_missing_eos_penalty",
    "bradley_terry_loss",
    "clipped_policy_token_loss",
    "dpo_loss",
    "dpo_pair_loss",
    "entropy_from_logits",
    "explained_variance",
    "gae",
    "informative_groups",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_loss_term",
    "kl_penalty",
    "kl_shaped_rewards",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "overlong_penalty",
    "pair_loss_summary",
    "ppo_policy_loss",
    "ppo_value_loss",
    "sft_loss",
]
