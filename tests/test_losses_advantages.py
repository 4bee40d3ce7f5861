"""Advantage estimators (losses/advantages.py): each against its naive loop on ragged masks, and the invariants."""

import math

import pytest
import torch

from prefalign.losses.advantages import (
    ADVANTAGE_ESTIMATORS,
    GROUP_STD_EPS,
    AdvantageInputs,
    dr_grpo_advantages,
    grpo_advantages,
    reinforce_pp_advantages,
    returns_to_go,
    rloo_advantages,
)

K = 3
# 2 groups of 3 rows, ragged lengths 4 2 1 | 3 4 2
LENGTHS = [4, 2, 1, 3, 4, 2]


def _inputs(seed=0, lengths=LENGTHS, k=K, t=5):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(len(lengths), t, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1] * n + [0] * (t - n) for n in lengths])
    rewards = rewards.masked_fill(~mask.bool(), float("nan"))  # padding must never reach a result
    return AdvantageInputs(rewards=rewards, mask=mask, group_size=k)


def _seq_rewards(inp):
    return [
        sum(inp.rewards[b, t].item() for t in range(inp.rewards.shape[1]) if inp.mask[b, t])
        for b in range(inp.rewards.shape[0])
    ]


def _naive_outcome(inp, per_group):
    """Per-row values from ``per_group(list of K rewards) -> list of K``, broadcast to real tokens."""
    r, k = _seq_rewards(inp), inp.group_size
    per_row = [v for g in range(len(r) // k) for v in per_group(r[g * k : (g + 1) * k])]
    return torch.tensor(
        [[per_row[b] if inp.mask[b, t] else 0.0 for t in range(inp.mask.shape[1])] for b in range(len(r))],
        dtype=torch.float64,
    )


def _grpo_group(rs, eps=GROUP_STD_EPS, divide=True):
    mu = sum(rs) / len(rs)
    sd = math.sqrt(sum((x - mu) ** 2 for x in rs) / (len(rs) - 1))
    if divide and all(x == rs[0] for x in rs):
        return [0.0] * len(rs)
    return [(x - mu) / (sd + eps) if divide else x - mu for x in rs]


def _rloo_group(rs):
    return [rs[i] - sum(rs[j] for j in range(len(rs)) if j != i) / (len(rs) - 1) for i in range(len(rs))]


@pytest.mark.parametrize(
    "fn,naive",
    [
        (grpo_advantages, _grpo_group),
        (dr_grpo_advantages, lambda rs: _grpo_group(rs, divide=False)),
        (rloo_advantages, _rloo_group),
    ],
)
def test_group_estimators_match_their_naive_loops(fn, naive):
    inp = _inputs()
    adv, ret = fn(inp)
    torch.testing.assert_close(adv, _naive_outcome(inp, naive))
    torch.testing.assert_close(ret, _naive_outcome(inp, lambda rs: rs))  # returns: R_i on every real token


@pytest.mark.parametrize("fn", [grpo_advantages, dr_grpo_advantages, rloo_advantages])
def test_group_advantages_sum_to_zero_within_a_group_and_vanish_for_equal_rewards(fn):
    inp = _inputs(seed=1)
    per_row = fn(inp)[0][:, 0]  # every row has a real token at t = 0
    assert per_row.view(-1, K).sum(1).abs().max() < 1e-12
    # group 0: every row's rewards sum to 2.0 (ragged lengths): equal rewards, zero advantage
    rewards = inp.rewards.clone()
    for b, n in enumerate(LENGTHS[:K]):
        rewards[b, :n] = 2.0 / n
    adv = fn(AdvantageInputs(rewards, inp.mask, K))[0]
    assert torch.equal(adv[:K], torch.zeros_like(adv[:K]))
    assert adv[K:].abs().sum() > 0


@pytest.mark.parametrize("k", [4, 8, 16])
def test_grpo_gives_exactly_zero_to_a_float32_group_of_equal_scores(k):
    # the float32 mean of K copies of 0.7 is off by an ulp for K = 8 and 16: divided by (std 0 + eps) that ulp was
    # an advantage of ~0.06 on every row of the group
    mask = torch.ones(4 * k, 3)
    for score in (0.7, 0.1, -1.3, 12.345):
        rewards = torch.zeros(4 * k, 3)
        rewards[:, -1] = score
        inp = AdvantageInputs(rewards, mask, k)
        assert torch.equal(grpo_advantages(inp)[0], torch.zeros_like(rewards))
        assert torch.equal(grpo_advantages(AdvantageInputs(rewards, mask, k, scores=rewards[:, -1]))[0], 0 * rewards)


def _kl_shaped(scores, penalty_per_token, lengths, t=5):
    """Rewards as the trainer builds them: a per-token KL penalty and the score on the last real token."""
    mask = torch.tensor([[1.0] * n + [0.0] * (t - n) for n in lengths], dtype=torch.float64)
    rewards = penalty_per_token * mask
    for b, n in enumerate(lengths):
        if n:
            rewards[b, n - 1] += scores[b]
    return rewards, mask


def test_grpo_normalises_the_scores_and_only_centres_the_kl_penalty():
    g = torch.Generator().manual_seed(7)
    scores = torch.tensor([0.5, 0.5, 0.5, 0.5, 1.0, -1.0, 2.0, 0.0], dtype=torch.float64)  # group 0: equal scores
    kl = torch.rand(8, 5, generator=g, dtype=torch.float64)
    lengths = [4, 2, 5, 3, 1, 5, 2, 4]
    for kl_coef in (0.05, 0.0005):
        rewards, mask = _kl_shaped(scores, -kl_coef * kl, lengths)
        adv, ret = grpo_advantages(AdvantageInputs(rewards, mask, 4, scores=scores))
        penalty = [-kl_coef * kl[b, :n].sum().item() for b, n in enumerate(lengths)]
        for grp in range(2):
            rows = range(4 * grp, 4 * grp + 4)
            ss, ps = [scores[b].item() for b in rows], [penalty[b] for b in rows]
            norm = _grpo_group(ss)
            for j, b in enumerate(rows):
                want = norm[j] + ps[j] - sum(ps) / 4
                torch.testing.assert_close(adv[b], torch.where(mask[b].bool(), want, 0.0).to(adv.dtype))
                torch.testing.assert_close(ret[b, 0].item(), ss[j] + ps[j])
    # the equal-score group's advantages are its KL penalty, centred: kl_coef scales them (before the split, GRPO
    # divided that penalty by its own std: the same unit-variance advantages at either coefficient)
    small = grpo_advantages(AdvantageInputs(*_kl_shaped(scores, -0.0005 * kl, lengths), 4, scores=scores))[0]
    large = grpo_advantages(AdvantageInputs(*_kl_shaped(scores, -0.05 * kl, lengths), 4, scores=scores))[0]
    torch.testing.assert_close(large[:4], 100 * small[:4])
    assert large[:4, 0].abs().max() < 0.05 * 5


def test_scores_keep_an_empty_row_in_its_group():
    scores = torch.tensor([1.0, 3.0, 2.0, 2.0], dtype=torch.float64)
    rewards, mask = _kl_shaped(scores, torch.full((4, 5), -0.1, dtype=torch.float64), [2, 0, 3, 1])
    inp = AdvantageInputs(rewards, mask, 2, scores=scores)
    # row 1 has no token: the rewards carry neither its score nor a penalty, the sequence reward keeps the score
    torch.testing.assert_close(inp.sequence_rewards(), torch.tensor([0.8, 3.0, 1.7, 1.9], dtype=torch.float64))
    torch.testing.assert_close(inp.penalties(), torch.tensor([-0.2, 0.0, -0.3, -0.1], dtype=torch.float64))
    torch.testing.assert_close(rloo_advantages(inp)[0][0, 0].item(), 0.8 - 3.0)  # 0.8 - 0 without the scores


def test_dr_grpo_is_grpo_times_the_group_std():
    inp = _inputs(seed=2)
    g = torch.tensor(_seq_rewards(inp), dtype=torch.float64).view(-1, K)
    scale = (g.std(1) + GROUP_STD_EPS).repeat_interleave(K)[:, None]  # (B, 1)
    torch.testing.assert_close(grpo_advantages(inp)[0] * scale, dr_grpo_advantages(inp)[0])
    assert ADVANTAGE_ESTIMATORS["dr_grpo"].aggregation == "seq_mean_token_sum_norm"  # its other half
    assert ADVANTAGE_ESTIMATORS["grpo"].aggregation != "seq_mean_token_sum_norm"


def test_rloo_is_k_over_k_minus_one_times_dr_grpo():
    inp = _inputs(seed=3)
    torch.testing.assert_close(rloo_advantages(inp)[0], dr_grpo_advantages(inp)[0] * K / (K - 1))


def test_returns_to_go_and_reinforce_pp_match_naive_loops():
    inp = _inputs(seed=4)
    gamma = 0.9
    B, T = inp.mask.shape
    want = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        g = 0.0
        for t in reversed(range(T)):
            g = (inp.rewards[b, t].item() if inp.mask[b, t] else 0.0) + gamma * g
            want[b, t] = g if inp.mask[b, t] else 0.0
    torch.testing.assert_close(returns_to_go(inp.rewards, inp.mask, gamma), want)
    vals = [want[b, t].item() for b in range(B) for t in range(T) if inp.mask[b, t]]
    mu = sum(vals) / len(vals)
    var = sum((v - mu) ** 2 for v in vals) / (len(vals) - 1)
    adv, ret = reinforce_pp_advantages(AdvantageInputs(inp.rewards, inp.mask, 1, gamma=gamma))
    naive = torch.where(inp.mask.bool(), (want - mu) / math.sqrt(var + 1e-8), 0.0)
    torch.testing.assert_close(adv, naive)
    torch.testing.assert_close(ret, want)


def test_reinforce_pp_whitens_with_the_given_batch_statistics():
    inp = _inputs(seed=5)
    stats = (torch.tensor(1.0, dtype=torch.float64), torch.tensor(4.0, dtype=torch.float64))
    adv, ret = reinforce_pp_advantages(AdvantageInputs(inp.rewards, inp.mask, 1, batch_stats=lambda x, m: stats))
    torch.testing.assert_close(adv, torch.where(inp.mask.bool(), (ret - 1.0) / math.sqrt(4.0 + 1e-8), 0.0))


def test_group_estimators_refuse_a_batch_that_is_not_whole_groups():
    inp = _inputs()
    with pytest.raises(ValueError, match="group_size >= 2 dividing the batch; got group_size 4 for 6 rows"):
        grpo_advantages(AdvantageInputs(inp.rewards, inp.mask, 4))
    with pytest.raises(ValueError, match="group_size >= 2"):
        rloo_advantages(AdvantageInputs(inp.rewards, inp.mask, 1))
    with pytest.raises(ValueError, match="gae needs the critic's values"):
        ADVANTAGE_ESTIMATORS["gae"].fn(inp)


def test_table_declares_each_estimator():
    assert list(ADVANTAGE_ESTIMATORS) == ["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp"]
    needs_groups = {n for n, e in ADVANTAGE_ESTIMATORS.items() if e.needs_groups}
    assert needs_groups == {"grpo", "dr_grpo", "rloo"}
    assert [n for n, e in ADVANTAGE_ESTIMATORS.items() if e.needs_values] == ["gae"]
    for e in ADVANTAGE_ESTIMATORS.values():
        assert " 20" in e.help  # names its paper and year
