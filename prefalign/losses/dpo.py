"""The DPO family of offline preference losses.

All inputs are ``(B,)`` *summed* log-probs of each completion given its prompt. Every variant is a
function of the implicit-reward logit

    h = (logp_c - ref_c) - (logp_r - ref_r)

(for ``reference_free``: ``h = logp_c - logp_r``), returning the ``(B,)`` per-pair losses. They sit
in the table `DPO_LOSSES`; `dpo_loss` validates, builds ``h``, looks the variant up and averages.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from prefalign.losses.stats import check_same_shape


def _sigmoid(h: Tensor, beta: float, eps: float) -> Tensor:
    """DPO, Rafailov et al. 2023, "Direct Preference Optimization"; with ``eps > 0`` it is
    conservative DPO (cDPO, Mitchell 2023, "A note on DPO with noisy preferences"): the label is
    taken to be flipped with probability eps, giving the cross-entropy against soft labels::

        -(1 - eps) * log sigmoid(beta h) - eps * log sigmoid(-beta h)
    """
    return -(1.0 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)


def _robust(h: Tensor, beta: float, eps: float) -> Tensor:
    """Robust DPO, Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with
    Noisy Feedback"; an unbiased estimate of the clean-label loss when labels flip with
    probability eps < 0.5 (hence the division by ``1 - 2 eps``)::

        (-(1 - eps) * log sigmoid(beta h) + eps * log sigmoid(-beta h)) / (1 - 2 eps)
    """
    unnormalised = -(1.0 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)
    return unnormalised / (1.0 - 2.0 * eps)


def _hinge(h: Tensor, beta: float, eps: float) -> Tensor:
    """SLiC hinge loss, Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human
    Feedback", on the DPO logit::

        relu(1 - beta h)
    """
    return torch.relu(1.0 - beta * h)


def _ipo(h: Tensor, beta: float, eps: float) -> Tensor:
    """IPO, Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences": regress h onto a fixed target instead of pushing it to infinity::

        (h - 1 / (2 beta))^2

    The paper's h is built from *length-averaged* log-probs (per-token means); with summed
    log-probs the target 1/(2 beta) means something else for every length. This function does not
    know which it was given: the caller decides what it passes.
    """
    return (h - 1.0 / (2.0 * beta)) ** 2


def _reference_free(h: Tensor, beta: float, eps: float) -> Tensor:
    """DPO with the reference dropped (h = logp_c - logp_r); with beta = 1 it is the plain
    pairwise likelihood loss ``-log sigmoid(logp(x+) - logp(x-))``::

        -log sigmoid(beta h)
    """
    return -F.logsigmoid(beta * h)


DPO_LOSSES: dict[str, Callable[[Tensor, float, float], Tensor]] = {
    "sigmoid": _sigmoid,
    "robust": _robust,
    "hinge": _hinge,
    "ipo": _ipo,
    "reference_free": _reference_free,
}
"""loss_type -> ``fn(h (B,), beta, label_smoothing) -> (B,)`` per-pair losses."""

# Variants whose formula uses label_smoothing; the others would silently ignore it, so we refuse.
_USES_LABEL_SMOOTHING = frozenset({"sigmoid", "robust"})
# Variants that take no reference log-probs.
_REFERENCE_FREE = frozenset({"reference_free"})


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean DPO-family loss over a batch of preference pairs.

    Args:
        policy_chosen_logps: ``(B,)`` summed log-prob of each chosen completion under the policy.
        policy_rejected_logps: ``(B,)`` the same for the rejected completion.
        ref_chosen_logps: ``(B,)`` under the frozen reference model (detached here: it is a
            constant); must be None for ``reference_free`` and given for every other loss_type.
        ref_rejected_logps: ``(B,)`` likewise.
        loss_type: a key of `DPO_LOSSES`.
        beta: > 0; the inverse temperature of the implicit reward ``beta * log(pi / ref)``.
        label_smoothing: assumed label-flip probability eps, in [0, 0.5); only ``sigmoid`` (cDPO)
            and ``robust`` use it, and any other loss_type refuses a nonzero value.

    Returns:
        ``(loss, stats)``; loss is 0-dim. stats, detached 0-dim, from the implicit rewards
        ``beta * (logp - ref)`` (``beta * logp`` for reference_free): ``rewards/chosen``,
        ``rewards/rejected`` (means), ``rewards/margins`` (mean chosen - rejected),
        ``rewards/accuracies`` (fraction with chosen > rejected strictly).

    Raises:
        ValueError: unknown loss_type (the message lists the choices), beta <= 0, label_smoothing
            outside [0, 0.5) or nonzero for a loss_type that does not use it, reference log-probs
            missing (or given to reference_free), or inputs not ``(B,)`` of one shape.
    """
    fn = DPO_LOSSES.get(loss_type)
    if fn is None:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; choose one of {sorted(DPO_LOSSES)}")
    if not beta > 0.0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        # At 0.5 the labels carry no information (and robust divides by 1 - 2 eps = 0).
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing != 0.0 and loss_type not in _USES_LABEL_SMOOTHING:
        raise ValueError(
            f"loss_type {loss_type!r} does not use label_smoothing (got {label_smoothing}); "
            f"it applies to {sorted(_USES_LABEL_SMOOTHING)}"
        )

    refs = (ref_chosen_logps, ref_rejected_logps)
    if loss_type in _REFERENCE_FREE:
        if any(r is not None for r in refs):
            raise ValueError(
                f"loss_type {loss_type!r} takes no reference log-probs; pass None for both"
            )
    elif any(r is None for r in refs):
        raise ValueError(
            f"loss_type {loss_type!r} needs both ref_chosen_logps and ref_rejected_logps"
        )

    tensors = {
        "policy_chosen_logps": policy_chosen_logps,
        "policy_rejected_logps": policy_rejected_logps,
    }
    if ref_chosen_logps is not None and ref_rejected_logps is not None:
        tensors.update(ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    check_same_shape(**tensors)
    if policy_chosen_logps.dim() != 1:
        raise ValueError(
            f"dpo_loss expects (B,) summed log-probs, got shape {tuple(policy_chosen_logps.shape)}"
        )

    # Log-ratios log(pi / ref) per completion, (B,); reference_free treats ref as log 1 = 0.
    chosen = policy_chosen_logps
    rejected = policy_rejected_logps
    if ref_chosen_logps is not None and ref_rejected_logps is not None:
        chosen = chosen - ref_chosen_logps.detach()
        rejected = rejected - ref_rejected_logps.detach()
    h = chosen - rejected                                              # (B,)
    loss = fn(h, beta, label_smoothing).mean()

    with torch.no_grad():
        chosen_rewards = beta * chosen                                 # (B,)
        rejected_rewards = beta * rejected                             # (B,)
        stats = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).to(h.dtype).mean(),
        }
    return loss, stats
