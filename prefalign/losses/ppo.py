"""PPO losses over response tokens: clipped policy surrogate, clipped value loss, entropy.

Schulman, Wolski, Dhariwal, Radford, Klimov, "Proximal Policy Optimization Algorithms" (2017).
Every token is one action; averages are token-level masked means over the whole minibatch, so each
real token weighs the same and a long response weighs more than a short one (as in the reference
code of "The N+ Implementation Details of RLHF with PPO", Huang et al., 2024).
"""

from __future__ import annotations

import torch
from torch import Tensor

from prefalign.losses.policy import clipped_policy_token_loss
from prefalign.losses.stats import check_same_shape, masked_mean


def ppo_policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Negated clipped surrogate objective, to minimise.

    With ratio ``r = exp(logp - old_logp)`` and advantage ``A`` per token::

        loss = masked_mean( max(-A * r, -A * clip(r, 1 - eps, 1 + eps)) )

    which is ``-E[min(r A, clip(r) A)]`` of Schulman et al. (2017): the pessimistic of the two, so
    a token whose ratio has already moved past the clip range in the direction its advantage
    rewards gets no gradient (the clipped branch is flat in ``r``).

    Args:
        logp: ``(B, T)`` log-probs of the sampled tokens under the current policy (with grad).
        old_logp: ``(B, T)`` the same under the policy that sampled them. Detached here: it is a
            constant of the update, and a stray graph on it would silently change the gradient.
        advantages: ``(B, T)`` per-token advantages (usually whitened); detached here likewise.
        mask: ``(B, T)`` bool or 0/1, true on real response tokens.
        clip_eps: clip range epsilon, in (0, 1).

    Returns:
        ``(loss, stats)``; loss is 0-dim. stats, all detached 0-dim, computed without grad:

        - ``clipfrac``: fraction of masked tokens where the clipped branch was taken
          (``-A * clip(r) > -A * r``), i.e. where the token got no gradient.
        - ``approxkl``: masked mean of ``0.5 * (logp - old_logp)^2``, the k2 estimate of
          KL(old || new) used as a diagnostic by the N+ reference code (CleanRL logs k3 instead;
          both are ~0 while the policy has not moved).
        - ``ratio``: masked mean of ``r``.

    Raises:
        ValueError: clip_eps outside (0, 1), or the tensors differ in shape.
    """
    if not 0.0 < clip_eps < 1.0:
        raise ValueError(f"clip_eps must be in (0, 1), got {clip_eps}")
    # PPO's clip is the symmetric case of the critic-free family's per-token loss; its clipped branch is taken
    # exactly where that function counts a low or a high clip, so clipfrac is their sum
    token_loss, st = clipped_policy_token_loss(logp, old_logp, advantages, mask, clip_eps, clip_eps)
    return masked_mean(token_loss, mask), {k: st[k] for k in ("clipfrac", "approxkl", "ratio")}


def ppo_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range: float | None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Value loss, optionally clipped around the rollout-time values.

    ::

        v_clip = old_v + clamp(v - old_v, -c, c)
        loss   = 0.5 * masked_mean( max((v - R)^2, (v_clip - R)^2) )

    Value clipping comes from OpenAI Baselines' PPO2 (Dhariwal et al., 2017), not the PPO paper;
    it keeps the value head from jumping far from where it was at rollout time, and like the policy
    clip it takes the pessimistic (larger) loss. Engstrom et al. (2020, "Implementation Matters in
    Deep Policy Gradients") found it does not reliably help, hence ``clip_range=None``.

    Args:
        values: ``(B, T)`` current value predictions (with grad).
        old_values: ``(B, T)`` value predictions at rollout time; detached here.
        returns: ``(B, T)`` value targets, e.g. from `prefalign.losses.gae.gae`; detached here.
        mask: ``(B, T)`` bool or 0/1, true on real response tokens.
        clip_range: ``c`` > 0, or ``None`` for the plain ``0.5 * masked_mean((v - R)^2)``.

    Returns:
        ``(loss, stats)``; loss is 0-dim. stats: ``vf_clipfrac``, fraction of masked tokens where
        the clipped branch was the larger (0 when ``clip_range`` is None).

    Raises:
        ValueError: clip_range <= 0, or the tensors differ in shape.
    """
    if clip_range is not None and not clip_range > 0.0:
        raise ValueError(f"clip_range must be > 0 or None, got {clip_range}")
    check_same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    # Zero the padding first so nan/inf there cannot reach the gradient (see ppo_policy_loss).
    pad = ~mask.bool()
    values = values.masked_fill(pad, 0.0)
    old_values = old_values.detach().masked_fill(pad, 0.0)
    returns = returns.detach().masked_fill(pad, 0.0)

    loss_unclipped = (values - returns) ** 2  # (B, T)
    if clip_range is None:
        loss = 0.5 * masked_mean(loss_unclipped, mask)
        clipfrac = torch.zeros((), dtype=values.dtype, device=values.device)
    else:
        values_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
        loss_clipped = (values_clipped - returns) ** 2  # (B, T)
        loss = 0.5 * masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask)
        with torch.no_grad():
            clipfrac = masked_mean((loss_clipped > loss_unclipped).to(values.dtype), mask)
    return loss, {"vf_clipfrac": clipfrac.detach()}


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the categorical distribution at each position.

    Args:
        logits: ``(..., V)``, e.g. ``(B, T, V)``; must be finite.

    Returns:
        ``logits.shape[:-1]``, e.g. ``(B, T)``, in nats.

    With ``p = softmax(z)`` and ``lse = logsumexp(z)``, ``log p_i = z_i - lse``, so
    ``H = -sum_i p_i log p_i = lse - sum_i p_i z_i``. This never takes the log of a probability
    that has underflowed to 0, and logsumexp subtracts the max first, so huge logits do not
    overflow.

    Naive equivalent (unstable for large logits)::

        p = exp(z) / sum(exp(z));  H = -sum(p * log(p))
    """
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)
