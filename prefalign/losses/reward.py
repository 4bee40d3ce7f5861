"""Pairwise reward-model loss (Bradley-Terry), with optional margin and reward centering."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from prefalign.losses.stats import check_same_shape


def bradley_terry_loss(
    chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Tensor | float | None = None, center_coef: float = 0.0
) -> tuple[Tensor, dict[str, Tensor]]:
    """Negative log-likelihood of the preferences under Bradley-Terry, plus reward centering.

    ::

        loss = mean(-log sigmoid(r_c - r_r - margin)) + center_coef * mean((r_c + r_r)^2)

    - Bradley & Terry (1952), as used for reward models by Christiano et al. (2017) and
      Ouyang et al. (2022): P(chosen > rejected) = sigmoid(r_c - r_r).
    - ``margin`` (Llama 2, Touvron et al., 2023): ask for a larger reward gap on pairs the
      annotators marked as clearly better; ``None`` means 0.
    - Centering (Eisenstein et al., 2023, "Helping or Herding? Reward Model Ensembles Mitigate but
      do not Eliminate Reward Hacking"): Bradley-Terry only sees differences, so adding any
      constant to both rewards leaves its loss unchanged and the reward level drifts freely. The
      ``(r_c + r_r)^2`` term pins the mean reward of each pair near 0, which keeps rewards
      comparable across prompts and models and their scale sane for PPO.

    Args:
        chosen_rewards: ``(B,)`` scalar rewards of the preferred responses.
        rejected_rewards: ``(B,)`` of the rejected responses.
        margin: ``(B,)`` tensor, a float, or None.
        center_coef: weight of the centering term, >= 0 (0 turns it off).

    Returns:
        ``(loss, stats)``; loss is 0-dim. stats, detached 0-dim: ``accuracy`` (fraction with
        r_c > r_r strictly, so ties count as wrong and a constant model scores 0, not 0.5),
        ``rewards/chosen``, ``rewards/rejected`` (means), ``margin`` (mean of r_c - r_r).

    Raises:
        ValueError: inputs not ``(B,)`` of one shape, or center_coef < 0.
    """
    check_same_shape(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    if chosen_rewards.dim() != 1:
        raise ValueError(
            f"rewards must be (B,) tensors, got shape {tuple(chosen_rewards.shape)}; "
            "squeeze the reward head's trailing dim first"
        )
    if isinstance(margin, Tensor):
        check_same_shape(chosen_rewards=chosen_rewards, margin=margin)
    if not center_coef >= 0.0:
        raise ValueError(f"center_coef must be >= 0, got {center_coef}")

    diff = chosen_rewards - rejected_rewards  # (B,)
    logits = diff if margin is None else diff - margin
    loss = -F.logsigmoid(logits).mean()
    if center_coef > 0.0:
        loss = loss + center_coef * ((chosen_rewards + rejected_rewards) ** 2).mean()

    with torch.no_grad():
        stats = {
            "accuracy": (diff > 0).to(diff.dtype).mean(),
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "margin": diff.mean(),
        }
    return loss, stats
