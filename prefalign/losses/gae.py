"""Generalized Advantage Estimation over response tokens.

Schulman, Moritz, Levine, Jordan, Abbeel, "High-Dimensional Continuous Control Using Generalized
Advantage Estimation" (2016):

    delta_t = r_t + gamma * V_{t+1} - V_t
    A_t     = delta_t + gamma * lam * A_{t+1}
    R_t     = A_t + V_t            (the value target, a lam-return)

In RLHF each row of the batch is one episode: one action per response token, the episode ends at
the row's last real token, and nothing is bootstrapped after it (V = 0, A = 0 past the end).
"""

from __future__ import annotations

import torch
from torch import Tensor

from prefalign.losses.stats import check_same_shape


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Advantages and returns by GAE, vectorised over the batch.

    Args:
        rewards: ``(B, T)`` per-token rewards (in RLHF: the KL penalty on every token plus the
            sequence score on the last real token).
        values: ``(B, T)`` value estimates V(s_t) of the state before emitting token t.
        mask: ``(B, T)`` bool or 0/1, true on real response tokens. Each row must be contiguous
            from position 0 and right-padded: ``1 1 1 0 0``. A row ``1 0 1`` (a hole) or
            ``0 1 1`` (left padding) is refused, because "the episode ends at the last real
            token" only means something for this layout. An all-zero row is allowed (an empty
            response): its advantages and returns are all 0.
        gamma: discount in [0, 1].
        lam: GAE lambda in [0, 1] (0: one-step TD, 1: Monte Carlo minus baseline).

    Returns:
        ``(advantages, returns)``, both ``(B, T)``, exactly 0 where ``mask`` is false, and
        ``returns == advantages + values`` where it is true. Values at masked-out positions,
        even ``nan``, never reach the result.

    Call it under ``torch.no_grad()`` on detached rollout tensors: advantages and returns are
    fixed targets for the PPO update, not something to differentiate. It does not detach for you.

    Naive per-row reference (what the vectorised loop computes; the tests check the two agree)::

        for b in range(B):
            n = number of real tokens in row b
            next_value, next_adv = 0.0, 0.0      # past the end: no bootstrap
            for t in reversed(range(n)):
                delta = rewards[b, t] + gamma * next_value - values[b, t]
                next_adv = delta + gamma * lam * next_adv
                advantages[b, t] = next_adv
                returns[b, t] = next_adv + values[b, t]
                next_value = values[b, t]

    The vectorised version runs the same recursion for all rows at once and uses
    ``mask[:, t + 1]`` as the "is t + 1 still inside this row's episode" flag: it is 0 exactly at
    each row's last real token, which cuts the bootstrap there.

    Raises:
        ValueError: shapes differ or are not 2-D, gamma or lam outside [0, 1], or a mask row that is
            not contiguous-from-0 and right-padded.
    """
    check_same_shape(rewards=rewards, values=values, mask=mask)
    if rewards.dim() != 2:
        raise ValueError(f"gae expects (B, T) tensors, got shape {tuple(rewards.shape)}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    keep = mask.bool()
    # Right-padded and contiguous from 0 <=> non-increasing along T (a 0 is never followed by a 1).
    if (keep[:, 1:] & ~keep[:, :-1]).any():
        raise ValueError(
            "gae needs each mask row contiguous from position 0 and right-padded (like 1 1 1 0 0); "
            "got a row with a 0 before a 1"
        )

    B, T = rewards.shape
    zero = torch.zeros(B, dtype=values.dtype, device=values.device)  # (B,)
    next_adv = zero  # (B,) A_{t+1}
    advantages = torch.zeros_like(values)  # (B, T)
    for t in reversed(range(T)):
        if t + 1 < T:
            inside = keep[:, t + 1]  # (B,) is t+1 in the episode?
            # where, not multiply: padded values/advantages may be nan, and nan * 0 is nan.
            next_value = torch.where(inside, values[:, t + 1], zero)
            next_adv = torch.where(inside, next_adv, zero)
        else:
            next_value = zero
            next_adv = zero
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = delta + gamma * lam * next_adv
        advantages[:, t] = next_adv

    advantages = torch.where(keep, advantages, torch.zeros_like(advantages))
    returns = torch.where(keep, advantages + values, torch.zeros_like(values))
    return advantages, returns
