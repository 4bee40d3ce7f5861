"""Advantage estimators, each one entry of the table `ADVANTAGE_ESTIMATORS`.

Every estimator takes one `AdvantageInputs` (per-token rewards, the response mask, the group size and, for
GAE, the critic's values) and returns ``(advantages, returns)``, both ``(B, T)`` and exactly 0 where the mask
is 0. The rewards are what `prefalign.losses.shaping.kl_shaped_rewards` builds: ``-kl_coef * KL`` on every
token and the sequence score added on the last real one (kl_coef 0 when the KL is a loss term instead), so
an outcome estimator's sequence reward is the row's masked sum, ``R_i = sum_t rewards[i, t]``.

Group estimators read the batch as ``B / K`` groups of ``K`` consecutive rows, the K completions of one prompt
(rows ``g*K .. g*K + K - 1``); they need ``K >= 2``, since a baseline from the other completions of a prompt
is what replaces the critic. Outcome estimators broadcast one number per row to every real token of it.

    gae           A_t by GAE on the critic's values (Schulman et al. 2016): PPO-RLHF, `prefalign ppo`
    grpo          (s_i - mean_g s) / (std_g s + eps) + (P_i - mean_g P)   (Shao et al. 2024, DeepSeekMath)
    dr_grpo       R_i - mean_g R                       (Liu et al. 2025, "Understanding R1-Zero-like training")
    rloo          R_i - mean_{j != i in g} R_j         (Ahmadian et al. 2024, "Back to Basics")
    reinforce_pp  return-to-go sum_{s >= t} gamma^(s-t) r_s, whitened over the whole batch (Hu 2025, REINFORCE++)

``std_g`` is the unbiased standard deviation over the group's K scores, as TRL's ``GRPOTrainer`` takes it. ``R_i =
s_i + P_i``: the row's score and its KL penalty (``P_i = -kl_coef * KL_i``, 0 when the KL is a loss term). GRPO
divides the scores alone by their std: dividing ``R`` would scale each group's KL penalty by ``1 / std_g s``, so
``kl_coef`` would lose its meaning and a group of equal scores would get its KL noise as unit-variance advantages
(measured before the split: the same advantages at kl_coef 0.05 and 0.0005).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from prefalign.losses.gae import gae
from prefalign.losses.stats import check_same_shape, masked_mean, masked_var

GROUP_STD_EPS = 1e-6
"""GRPO's ``eps``: bounds the weight of a group whose scores barely differ. A group of exactly equal scores gets
advantage 0 by a test of its own: in float32 the mean of K equal values can be off by an ulp, which ``eps`` alone
would turn into the same advantage, up to one ulp / eps, on every row of the group (0.06 for scores near 0.7, 0.95
near 12.3: it grows with the scores' magnitude)."""


@dataclass(frozen=True)
class AdvantageInputs:
    """What an estimator reads; every tensor on one device, float.

    rewards: ``(B, T)`` per-token rewards (KL penalty on each token, score on the last real one).
    mask: ``(B, T)`` 1 on real response tokens, contiguous from position 0 (right-padded).
    group_size: ``K``, completions per prompt; rows ``g*K .. g*K + K - 1`` are one prompt's group.
    values: ``(B, T)`` the critic's values (``gae`` only; None for critic-free estimators).
    gamma, lam: discount and GAE lambda (``gae``; ``reinforce_pp`` reads ``gamma``).
    batch_stats: ``(x, mask) -> (mean, unbiased var)`` over the whole batch, for ``reinforce_pp``'s whitening
        (the trainer passes the statistics over every process's shard); None: this tensor's own.
    scores: ``(B,)`` each row's score, the part of ``R_i`` that is not KL penalty (the trainer passes what
        `kl_shaped_rewards` put on the last token). With it ``R_i = scores_i + P_i``, ``P_i`` the row's masked
        sum of rewards less its score, so a row with no real token keeps its score; None: all of ``R_i`` is score.
    """

    rewards: Tensor
    mask: Tensor
    group_size: int = 1
    values: Tensor | None = None
    gamma: float = 1.0
    lam: float = 0.95
    batch_stats: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None
    scores: Tensor | None = None

    def _masked_sum(self) -> Tensor:
        check_same_shape(rewards=self.rewards, mask=self.mask)
        return torch.where(self.mask.bool(), self.rewards, torch.zeros_like(self.rewards)).sum(-1)

    def sequence_scores(self) -> Tensor:
        """``(B,)`` each row's score ``s_i``: ``scores``, or (without them) the masked sum of rewards."""
        return self._masked_sum() if self.scores is None else self.scores.to(self.rewards.dtype)

    def penalties(self) -> Tensor:
        """``(B,)`` each row's KL penalty ``P_i = R_i - s_i`` (0 without ``scores``)."""
        if self.scores is None:
            return torch.zeros_like(self._masked_sum())
        has_token = self.mask.bool().any(-1)  # a row without a real token carries no score in the rewards
        return self._masked_sum() - torch.where(has_token, self.sequence_scores(), 0.0)

    def sequence_rewards(self) -> Tensor:
        """``(B,)`` each row's ``R_i = s_i + P_i``: without ``scores``, the masked sum of its rewards."""
        return self._masked_sum() if self.scores is None else self.sequence_scores() + self.penalties()

    def groups(self, per_row: Tensor | None = None) -> Tensor:
        """``(B / K, K)`` a per-row quantity (default: the sequence rewards), one prompt's group per row."""
        r = self.sequence_rewards() if per_row is None else per_row
        k = self.group_size
        if k < 2 or r.shape[0] % k:
            raise ValueError(
                f"a group estimator needs group_size >= 2 dividing the batch; got group_size {k} for {r.shape[0]} rows"
            )
        return r.view(-1, k)


def broadcast_to_tokens(per_row: Tensor, mask: Tensor) -> Tensor:
    """``(B,)`` -> ``(B, T)``: the row's value on every real token, 0 on padding."""
    return torch.where(mask.bool(), per_row[:, None].expand(mask.shape), 0.0)


def _outcome(per_row: Tensor, inp: AdvantageInputs) -> tuple[Tensor, Tensor]:
    """An outcome estimator's result: advantages broadcast to tokens; the returns are R_i on every token."""
    return broadcast_to_tokens(per_row, inp.mask), broadcast_to_tokens(inp.sequence_rewards(), inp.mask)


def grpo_advantages(inp: AdvantageInputs, eps: float = GROUP_STD_EPS) -> tuple[Tensor, Tensor]:
    """GRPO (Shao et al. 2024): ``A_i = (s_i - mean_g s) / (std_g s + eps) + (P_i - mean_g P)`` on every token of
    row ``i``: the scores normalised within the group (0 for a group of equal scores), the KL penalty (0 when the
    KL is a loss term, as in the paper) centred but not scaled, so ``kl_coef`` weighs it against one score std.

    Naive loop::

        for g in range(B // K):
            ss = [s[g*K + j] for j in range(K)];  ps = [P[g*K + j] for j in range(K)]
            mu = sum(ss) / K;  sd = sqrt(sum((x - mu) ** 2 for x in ss) / (K - 1))
            for j in range(K):
                norm = 0 if all(x == ss[0] for x in ss) else (ss[j] - mu) / (sd + eps)
                A[g*K + j, t] = norm + ps[j] - sum(ps) / K   for every real t
    """
    s, p = inp.groups(inp.sequence_scores()), inp.groups(inp.penalties())  # (G, K) each
    equal = (s == s[:, :1]).all(1, keepdim=True)
    norm = torch.where(equal, 0.0, (s - s.mean(1, keepdim=True)) / (s.std(1, keepdim=True) + eps))
    return _outcome((norm + p - p.mean(1, keepdim=True)).reshape(-1), inp)


def dr_grpo_advantages(inp: AdvantageInputs) -> tuple[Tensor, Tensor]:
    """Dr. GRPO (Liu et al. 2025): ``A_i = R_i - mean_g R``, GRPO without the division by the group's std
    (which weighs a prompt more the more alike its rewards are). Its other half, the constant normaliser of the
    loss, is the aggregation ``seq_mean_token_sum_norm`` (`prefalign.losses.policy.aggregate_loss`).

    Naive loop: as `grpo_advantages`, with ``A = rs[j] - mu``.
    """
    g = inp.groups()
    return _outcome((g - g.mean(1, keepdim=True)).reshape(-1), inp)


def rloo_advantages(inp: AdvantageInputs) -> tuple[Tensor, Tensor]:
    """RLOO (Ahmadian et al. 2024): ``A_i = R_i - (sum_g R - R_i) / (K - 1)``, the mean of the group's other
    completions as the baseline (unbiased: it does not depend on completion ``i``).

    Naive loop::

        for g in range(B // K):
            for i in range(K):
                others = [R[g*K + j] for j in range(K) if j != i]
                A[g*K + i, t] = R[g*K + i] - sum(others) / (K - 1)   for every real t
    """
    g = inp.groups()
    k = g.shape[1]
    baseline = (g.sum(1, keepdim=True) - g) / (k - 1)
    return _outcome((g - baseline).reshape(-1), inp)


def returns_to_go(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """``(B, T)`` discounted return-to-go ``G_t = sum_{s >= t, s real} gamma^(s-t) r_s``, 0 on padding.

    Naive loop: ``for b: g = 0; for t in reversed(range(T)): g = (r[b,t] if mask[b,t] else 0) + gamma * g;
    G[b,t] = g if mask[b,t] else 0``.
    """
    check_same_shape(rewards=rewards, mask=mask)
    keep = mask.bool()
    r = torch.where(keep, rewards, torch.zeros_like(rewards))
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])  # (B,)
    for t in reversed(range(r.shape[1])):
        running = r[:, t] + gamma * running
        out[:, t] = running
    return torch.where(keep, out, torch.zeros_like(out))


def reinforce_pp_advantages(inp: AdvantageInputs, eps: float = 1e-8) -> tuple[Tensor, Tensor]:
    """REINFORCE++ (Hu 2025): the return-to-go of the KL-shaped per-token rewards, whitened (mean 0, variance 1)
    over every real token of the whole batch; no critic and no groups (any K). Returns: the return-to-go.

    Naive loop: ``G = returns_to_go(...)``; ``vals = [G[b, t] for every real (b, t)]``;
    ``A[b, t] = (G[b, t] - mean(vals)) / sqrt(var_unbiased(vals) + eps)`` on real tokens, else 0.
    """
    g = returns_to_go(inp.rewards, inp.mask, inp.gamma)
    if inp.batch_stats is not None:
        mean, var = inp.batch_stats(g, inp.mask)
    else:
        mean, var = masked_mean(g, inp.mask), masked_var(g, inp.mask)
    adv = (g - mean) * torch.rsqrt(var + eps)
    return torch.where(inp.mask.bool(), adv, torch.zeros_like(adv)), g


def gae_advantages(inp: AdvantageInputs) -> tuple[Tensor, Tensor]:
    """GAE on the critic's values (`prefalign.losses.gae.gae`), as `prefalign ppo` runs it before whitening."""
    if inp.values is None:
        raise ValueError("gae needs the critic's values")
    return gae(inp.rewards, inp.values, inp.mask, inp.gamma, inp.lam)


@dataclass(frozen=True)
class AdvantageEstimator:
    """One entry of `ADVANTAGE_ESTIMATORS`."""

    name: str
    fn: Callable[[AdvantageInputs], tuple[Tensor, Tensor]]
    help: str
    """One line: the formula and the paper (the ``--estimator`` help)."""
    needs_values: bool
    """Needs a value model (a critic): only `prefalign ppo` trains one."""
    needs_groups: bool
    """Compares the K completions of a prompt: needs ``--num-generations`` K >= 2."""
    aggregation: str
    """Default loss aggregation (a key of `prefalign.losses.policy.AGGREGATIONS`)."""
    discounts: bool = False
    """Reads ``gamma`` (a return over the tokens); the group estimators score whole completions and ignore it."""


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {
    e.name: e
    for e in (
        AdvantageEstimator(
            "gae",
            gae_advantages,
            "GAE on a critic (Schulman et al. 2016): PPO-RLHF, run by prefalign ppo",
            needs_values=True,
            needs_groups=False,
            aggregation="token_mean",
            discounts=True,
        ),
        AdvantageEstimator(
            "grpo",
            grpo_advantages,
            "GRPO, Shao et al. 2024: (s - mean_group s) / (std_group s + eps) on the scores s, plus the KL penalty "
            "less its group mean",
            needs_values=False,
            needs_groups=True,
            aggregation="seq_mean_token_mean",
        ),
        AdvantageEstimator(
            "dr_grpo",
            dr_grpo_advantages,
            "Dr. GRPO, Liu et al. 2025: R - mean_group R, loss summed over tokens / (rows x max new tokens)",
            needs_values=False,
            needs_groups=True,
            aggregation="seq_mean_token_sum_norm",
        ),
        AdvantageEstimator(
            "rloo",
            rloo_advantages,
            "RLOO, Ahmadian et al. 2024: R_i - mean of the group's other R_j",
            needs_values=False,
            needs_groups=True,
            aggregation="token_mean",
        ),
        AdvantageEstimator(
            "reinforce_pp",
            reinforce_pp_advantages,
            "REINFORCE++, Hu 2025: return-to-go of the KL-shaped token rewards, whitened over the batch",
            needs_values=False,
            needs_groups=False,
            aggregation="token_mean",
            discounts=True,
        ),
    )
}
"""Every advantage estimator by name."""
