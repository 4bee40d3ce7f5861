"""Reward shaping: per-token RLHF rewards (a KL penalty on every response token, the score on the last one) and
the penalties a completion's score takes before it (no EOS; DAPO's soft overlong punishment).

Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences"); Ouyang et al. 2022;
the layout follows Huang et al. 2024 ("The N+ Implementation Details of RLHF with PPO"), detail
"per-token KL penalty, score added to the last token"; Yu et al. 2025 ("DAPO: An Open-Source LLM Reinforcement
Learning System at Scale", section 3.4) for the overlong penalty.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prefalign.losses.kl import kl_penalty
from prefalign.losses.stats import check_same_shape


def apply_missing_eos_penalty(scores: Tensor, ended: Tensor, penalty: float | None) -> Tensor:
    """Subtract ``penalty`` from the score of every response that did not end with EOS.

    Args: scores ``(B,)``, ended ``(B,)`` bool. ``penalty=None`` leaves scores as they are.
    Without it, a policy can learn to ramble to the token limit when truncated text scores well.
    """
    if penalty is None:
        return scores
    return torch.where(ended.bool(), scores, scores - penalty)


def overlong_penalty(lengths: Tensor, max_len: int, buffer: int, factor: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, section 3.4): a penalty, added to a completion's score, that
    grows linearly over the last ``buffer`` tokens before the length limit.

    With ``L_max = max_len`` and ``L_cache = buffer``, a completion of ``|y|`` tokens gets ``factor`` times::

        0                                    |y| <= L_max - L_cache
        ((L_max - L_cache) - |y|) / L_cache  L_max - L_cache < |y| <= L_max    (from just below 0 down to -1)
        -1                                   |y| > L_max

    A length limit that truncates (prefalign's max new tokens) makes ``L_max`` the longest possible completion, so
    the last case never happens there and a truncated completion gets ``-factor``. The ramp is the paper's point:
    a length just past ``L_max - L_cache`` costs a little, not the whole of a truncation's punishment.

    Args:
        lengths: ``(B,)`` tokens of each completion (counted as they are generated, EOS included).
        max_len: ``L_max``.
        buffer: ``L_cache``, the tokens the penalty grows over; ``1 <= buffer <= max_len``.
        factor: the penalty at ``L_max`` and beyond (verl's ``penalty_factor``; 1 in the paper).
    Returns:
        ``(B,)`` float32 penalties in ``[-factor, 0]``, exactly 0 (never -0.0) up to ``L_max - L_cache``.

    Naive loop: ``start = max_len - buffer``; for b: ``n = lengths[b]``; ``p[b] = 0 if n <= start else (start - n)
    / buffer if n <= max_len else -1``; ``p[b] *= factor``.
    """
    if not 1 <= buffer <= max_len or not factor > 0:
        raise ValueError(
            f"overlong penalty needs 1 <= buffer <= max_len and factor > 0, got {buffer}, {max_len}, {factor}"
        )
    start = max_len - buffer
    # start - n is >= 0 up to the buffer (clamped to +0.0) and reaches -buffer at L_max, where the clamp holds it
    return (start - lengths.to(torch.float32)).clamp(min=-buffer, max=0.0) / buffer * factor


def kl_shaped_rewards(
    scores: Tensor, logp: Tensor, ref_logp: Tensor, mask: Tensor, kl_coef: float, estimator: str = "k1"
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token rewards ``r_t = -kl_coef * KL_t`` with ``scores`` added on each row's last real token.

    Args:
        scores: ``(B,)`` sequence scores from the reward source.
        logp: ``(B, R)`` log-probs of the sampled response tokens under the policy.
        ref_logp: ``(B, R)`` the same under the reference.
        mask: ``(B, R)`` 1 on real response tokens; contiguous from position 0 (right-padded).
        kl_coef: the KL penalty coefficient (beta).
        estimator: ``k1``, ``k2`` or ``k3`` (see `kl.py`).
    Returns:
        ``(rewards, kl, non_score)``, each ``(B, R)`` and 0 where ``mask`` is 0: per-token rewards, the
        per-token KL estimate, and the KL part of the reward (``-kl_coef * kl``).

    Naive loop: for b: for t < len_b: r[b,t] = -kl_coef * kl[b,t]; r[b, len_b - 1] += scores[b].
    A row with no real token gets no score (there is no token to put it on).
    """
    check_same_shape(logp=logp, ref_logp=ref_logp, mask=mask)
    m = mask.bool()
    kl = torch.where(m, kl_penalty(logp, ref_logp, estimator), torch.zeros_like(logp))
    non_score = -kl_coef * kl
    lengths = m.long().sum(-1)  # (B,)
    last = (lengths - 1).clamp(min=0)
    on_last = torch.zeros_like(non_score).scatter_(1, last[:, None], 1.0) * (lengths > 0)[:, None]
    rewards = non_score + on_last * scores[:, None].to(non_score.dtype)
    return rewards, kl, non_score


def explained_variance(
    values: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    var_returns: Tensor | None = None,
    var_residual: Tensor | None = None,
) -> Tensor:
    """``1 - Var(returns - values) / Var(returns)`` over masked tokens: 1 is a perfect critic, <= 0 useless.

    ``var_returns`` / ``var_residual``: precomputed unbiased variances of ``returns`` and ``returns - values``
    (e.g. over every process's shard); each defaults to `masked_var` of this batch.
    """
    from prefalign.losses.stats import masked_var

    if var_returns is None:
        var_returns = masked_var(returns, mask)
    if var_residual is None:
        var_residual = masked_var(returns - values, mask)
    return 1.0 - var_residual / var_returns.clamp(min=1e-8)
