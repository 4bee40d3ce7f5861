"""Policy-loss options (losses/policy.py): clip-higher, aggregations, the k3 KL term, dynamic sampling."""

import math

import pytest
import torch

from prefalign.losses import (
    aggregate_loss,
    clipped_policy_token_loss,
    informative_groups,
    kl_k3,
    kl_loss_term,
    ppo_policy_loss,
)

MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])


def test_clip_higher_by_hand():
    # ratios 0.5, 1.0, 1.5 with advantages -1, +1, +1; eps_low 0.2, eps_high 0.28
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[0.5, 1.0, 1.5]])).requires_grad_()
    adv = torch.tensor([[-1.0, 1.0, 1.0]])
    mask = torch.ones(1, 3)
    loss, st = clipped_policy_token_loss(logp, old, adv, mask, 0.2, 0.28)
    # token 0: max(0.5, 0.8) = 0.8 (lower clip holds); token 1: -1; token 2: max(-1.5, -1.28) = -1.28
    torch.testing.assert_close(loss, torch.tensor([[0.8, -1.0, -1.28]]))
    assert st["clipfrac_low"].item() == pytest.approx(1 / 3)
    assert st["clipfrac_high"].item() == pytest.approx(1 / 3)
    assert st["clipfrac"].item() == pytest.approx(2 / 3)
    assert st["ratio"].item() == pytest.approx(1.0)
    loss.sum().backward()
    assert logp.grad.tolist() == [[0.0, -1.0, 0.0]]  # clipped tokens get no gradient


def test_symmetric_clip_with_token_mean_is_ppo_by_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    logp, old, adv = (torch.randn(3, 4, generator=g, dtype=torch.float64) * 0.3 for _ in range(3))
    logp[0, 0], logp[2, 1] = old[0, 0] + 0.4, old[2, 1] - 0.4  # ratios 1.49 / 0.67: outside the clip range
    logp[~MASK.bool()] = float("-inf")  # padding never reaches the loss
    token_loss, st = clipped_policy_token_loss(logp, old, adv, MASK, 0.2, 0.2)
    ppo, ppo_st = ppo_policy_loss(logp, old, adv, MASK, 0.2)
    losses, held = [], []
    for b in range(3):
        for t in range(4):
            if MASK[b, t]:
                r, a = math.exp(logp[b, t] - old[b, t]), adv[b, t].item()
                losses.append(max(-a * r, -a * min(max(r, 0.8), 1.2)))
                held.append(-a * min(max(r, 0.8), 1.2) > -a * r)  # the clipped branch: no gradient
    want = torch.tensor(sum(losses) / len(losses), dtype=torch.float64)
    torch.testing.assert_close(ppo, want)
    torch.testing.assert_close(aggregate_loss(token_loss, MASK, "token_mean"), want)
    assert 0 < sum(held) < len(held)
    assert ppo_st["clipfrac"].item() == pytest.approx(sum(held) / len(held))
    assert st["clipfrac"].item() == pytest.approx(sum(held) / len(held))


def test_aggregations_by_hand():
    l = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, 99.0, 99.0, 99.0], [1.0, 1.0, 1.0, 1.0]])
    l[0, 3] = float("nan")  # padding, never counted
    assert aggregate_loss(l, MASK, "token_mean").item() == pytest.approx((6 + 4 + 4) / 8)
    assert aggregate_loss(l, MASK, "seq_mean_token_mean").item() == pytest.approx((2 + 4 + 1) / 3)
    assert aggregate_loss(l, MASK, "seq_mean_token_sum_norm", max_len=5).item() == pytest.approx(14 / (3 * 5))


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_micro_batches_add_up_to_the_batch(mode):
    l = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    whole = aggregate_loss(l, MASK, mode, max_len=6)
    totals = dict(total_tokens=float(MASK.sum()), total_rows=3.0, max_len=6)
    parts = aggregate_loss(l[:1], MASK[:1], mode, **totals) + aggregate_loss(l[1:], MASK[1:], mode, **totals)
    torch.testing.assert_close(parts, whole)


def test_aggregation_refusals():
    with pytest.raises(ValueError, match="unknown loss aggregation 'seq_sum'"):
        aggregate_loss(torch.ones(3, 4), MASK, "seq_sum")
    with pytest.raises(ValueError, match="seq_mean_token_sum_norm needs max_len >= 1"):
        aggregate_loss(torch.ones(3, 4), MASK, "seq_mean_token_sum_norm")
    with pytest.raises(ValueError, match=r"0 < eps_low < 1 and eps_high > 0, got 0\.2, 0\.0"):
        clipped_policy_token_loss(torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(3, 4), MASK, 0.2, 0.0)


def test_kl_loss_term_is_k3_on_real_tokens_with_the_policy_gradient():
    real = torch.tensor([[-1.0, -2.0, -0.5, -0.7]] * 3)
    logp = real.masked_fill(~MASK.bool(), float("nan")).requires_grad_()  # padding: nan must not leak
    ref = torch.tensor([[-1.5, -1.0, -0.5, 0.0]] * 3)
    kl = kl_loss_term(logp, ref, MASK)
    torch.testing.assert_close(kl, torch.where(MASK.bool(), kl_k3(real, ref), 0.0))
    assert kl[0, 0].item() == pytest.approx(math.exp(-0.5) - 1 + 0.5)
    kl.sum().backward()
    assert torch.isfinite(logp.grad).all() and logp.grad[0, 3] == 0


def test_informative_groups_drops_groups_of_equal_scores():
    scores = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.5, 0.5, 0.5])
    assert informative_groups(scores, 3).tolist() == [False] * 3 + [True] * 3 + [False] * 3
    with pytest.raises(ValueError, match="group_size >= 2 dividing the batch; got 2 for 9 rows"):
        informative_groups(scores, 2)
