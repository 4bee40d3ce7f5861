"""Policy-loss options of the critic-free online family: an asymmetric clip (DAPO's clip-higher), the loss
aggregations, the k3 KL as a loss term, and DAPO's dynamic sampling.

Per-token losses are ``(B, T)``; `aggregate_loss` turns them into one number, by one of `AGGREGATIONS`:

    token_mean               sum_{i,t} l_it / sum_i |o_i|          every token weighs the same (PPO, DAPO)
    seq_mean_token_mean      (1/N) sum_i (1/|o_i|) sum_t l_it     every sequence weighs the same (GRPO paper)
    seq_mean_token_sum_norm  sum_{i,t} l_it / (N * L)             a constant normaliser, L = max new tokens
                                                                  (Dr. GRPO, Liu et al. 2025)

``|o_i|`` is row i's real tokens, N the rows. A batch split into micro-batches (and processes) passes the whole
batch's totals (``total_tokens``, ``total_rows``), so the micro-batches' results add up to the batch's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prefalign.losses.kl import kl_k3
from prefalign.losses.stats import check_same_shape, masked_mean

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
"""The loss aggregations, as `aggregate_loss` names them."""


def clipped_policy_token_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, eps_low: float, eps_high: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token negated clipped surrogate with an asymmetric clip range (DAPO's clip-higher, Yu et al. 2025).

    With ``r = exp(logp - old_logp)``::

        l_t = max(-A_t r_t, -A_t clip(r_t, 1 - eps_low, 1 + eps_high))

    ``eps_low == eps_high`` is PPO's clip: then ``aggregate_loss(l, mask, "token_mean")`` equals
    `prefalign.losses.ppo.ppo_policy_loss`. A larger ``eps_high`` lets a token with a positive advantage rise
    further before its gradient stops, so unlikely tokens can gain probability (DAPO's fix for entropy collapse).

    Args:
        logp: ``(B, T)`` current log-probs (with grad); old_logp, advantages: ``(B, T)``, detached here.
        mask: ``(B, T)`` 1 on the tokens that count.
    Returns:
        ``(token_loss (B, T), stats)``: the loss 0 on padding; stats (0-dim, no grad) ``clipfrac_low``: share of
        tokens held by the lower clip (``A < 0`` and ``r < 1 - eps_low``), ``clipfrac_high`` (``A > 0`` and
        ``r > 1 + eps_high``), ``clipfrac`` (their sum), ``approxkl`` (mean ``0.5 (logp - old_logp)^2``),
        ``ratio`` (mean ``r``).

    Naive loop: for each real (b, t): r = exp(logp - old); l[b,t] = max(-A r, -A min(max(r, 1 - lo), 1 + hi)).
    """
    if not (0.0 < eps_low < 1.0 and eps_high > 0.0):
        raise ValueError(f"clip range needs 0 < eps_low < 1 and eps_high > 0, got {eps_low}, {eps_high}")
    check_same_shape(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask)
    pad = ~mask.bool()
    # zero the padding before any arithmetic: the aggregation drops it from the value anyway, but a -inf or nan
    # there would still turn into a nan *gradient* through exp() and reach the model
    logp = logp.masked_fill(pad, 0.0)
    old_logp = old_logp.detach().masked_fill(pad, 0.0)
    advantages = advantages.detach().masked_fill(pad, 0.0)
    log_ratio = logp - old_logp  # (B, T)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    token_loss = torch.maximum(unclipped, clipped).masked_fill(pad, 0.0)
    with torch.no_grad():
        low = ((advantages < 0) & (ratio < 1.0 - eps_low)).to(logp.dtype)
        high = ((advantages > 0) & (ratio > 1.0 + eps_high)).to(logp.dtype)
        stats = {
            "clipfrac_low": masked_mean(low, mask),
            "clipfrac_high": masked_mean(high, mask),
            "approxkl": masked_mean(0.5 * log_ratio**2, mask),
            "ratio": masked_mean(ratio, mask),
        }
        stats["clipfrac"] = stats["clipfrac_low"] + stats["clipfrac_high"]
    return token_loss, stats


def kl_loss_term(logp: Tensor, ref_logp: Tensor, mask: Tensor) -> Tensor:
    """``(B, T)`` the k3 estimate of KL(policy || reference) per token, with the policy's gradient, 0 on padding:
    GRPO's KL term (Shao et al. 2024, eq. 4), added to the token loss times beta instead of shaping the reward.
    The reference is a constant (detached)."""
    check_same_shape(logp=logp, ref_logp=ref_logp, mask=mask)
    pad = ~mask.bool()
    return kl_k3(logp.masked_fill(pad, 0.0), ref_logp.detach().masked_fill(pad, 0.0)).masked_fill(pad, 0.0)


def aggregate_loss(
    token_loss: Tensor,
    mask: Tensor,
    mode: str,
    *,
    max_len: int | None = None,
    total_tokens: float | None = None,
    total_rows: float | None = None,
) -> Tensor:
    """One 0-dim loss from ``(B, T)`` per-token losses by ``mode`` (see the module docstring).

    Args:
        token_loss: ``(B, T)``; positions where ``mask`` is 0 never count (even nan there).
        mask: ``(B, T)``, 1 on the positions that count.
        mode: one of `AGGREGATIONS`.
        max_len: ``L``, the constant of ``seq_mean_token_sum_norm`` (the run's max new tokens).
        total_tokens: the real tokens of the whole batch this is a part of; default this tensor's own.
        total_rows: the real rows (rows with at least one token) of the whole batch this is a part of; default
            this tensor's own. Rows without a real token count nowhere.

    Naive loops: token_mean: ``sum(l[b,t] for real (b,t)) / total_tokens``; seq_mean_token_mean:
    ``sum(mean(l[b,t] for real t) for rows b with a real token) / total_rows``; seq_mean_token_sum_norm:
    ``sum(l[b,t] for real (b,t)) / (total_rows * max_len)``.
    """
    check_same_shape(token_loss=token_loss, mask=mask)
    keep = mask.bool()
    l = torch.where(keep, token_loss, torch.zeros_like(token_loss))
    lengths = keep.sum(-1)  # (B,)
    rows = float((lengths > 0).sum()) if total_rows is None else total_rows
    if mode == "token_mean":
        return l.sum() / (float(lengths.sum()) if total_tokens is None else total_tokens)
    if mode == "seq_mean_token_mean":
        return (l.sum(-1) / lengths.clamp(min=1)).sum() / rows
    if mode == "seq_mean_token_sum_norm":
        if max_len is None or max_len < 1:
            raise ValueError("seq_mean_token_sum_norm needs max_len >= 1 (the run's max new tokens)")
        return l.sum() / (rows * max_len)
    raise ValueError(f"unknown loss aggregation {mode!r}; choose one of {', '.join(AGGREGATIONS)}")


def informative_groups(scores: Tensor, group_size: int) -> Tensor:
    """``(B,)`` bool: False on every row of a group whose K scores are all equal (DAPO's dynamic sampling, Yu
    et al. 2025). Such a group has no score signal: zero advantage under GRPO and RLOO when the KL is a loss term,
    only its centred KL penalty when it is in the reward; it adds little but noise and weight to the normaliser.

    Args: scores ``(B,)``, grouped as K consecutive rows per prompt. Naive loop: ``for g: keep rows of g iff
    len(set(scores[g*K:(g+1)*K])) > 1``.
    """
    if group_size < 2 or scores.shape[0] % group_size:
        raise ValueError(
            f"dynamic sampling needs group_size >= 2 dividing the batch; got {group_size} for {scores.shape[0]} rows"
        )
    g = scores.view(-1, group_size)
    varied = (g != g[:, :1]).any(1)  # (G,)
    return varied.repeat_interleave(group_size)
