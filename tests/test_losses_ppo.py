"""PPO policy/value losses and entropy: hand values, gradients, invariants, padding, errors."""

import math

import pytest
import torch

from prefalign.losses.ppo import entropy_from_logits, ppo_policy_loss, ppo_value_loss

D = torch.float64

# Five real tokens and one padded one, clip_eps = 0.2 (ratio clipped to [0.8, 1.2]).
RATIOS = [1.5, 0.5, 1.1, 0.9, 0.5, 3.0]
ADVS = [1.0, 1.0, -1.0, 2.0, -1.0, 5.0]
MASK = torch.tensor([[1, 1, 1, 1, 1, 0]])
# per token max(-A r, -A clip(r)):
#   r=1.5 A=1:  max(-1.5, -1.2) = -1.2  clipped
#   r=0.5 A=1:  max(-0.5, -0.8) = -0.5
#   r=1.1 A=-1: max( 1.1,  1.1) =  1.1  (inside the range: a tie, not clipped)
#   r=0.9 A=2:  max(-1.8, -1.8) = -1.8  (tie)
#   r=0.5 A=-1: max( 0.5,  0.8) =  0.8  clipped
# loss = (-1.2 - 0.5 + 1.1 - 1.8 + 0.8) / 5 = -1.6 / 5
POLICY_LOSS = -0.32
CLIPFRAC = 2 / 5
RATIO_MEAN = (1.5 + 0.5 + 1.1 + 0.9 + 0.5) / 5
APPROXKL = sum(0.5 * math.log(r) ** 2 for r in RATIOS[:5]) / 5


def _policy_inputs():
    logp = torch.tensor([[math.log(r) for r in RATIOS]], dtype=D, requires_grad=True)
    return logp, torch.zeros(1, 6, dtype=D), torch.tensor([ADVS], dtype=D)


def test_policy_loss_and_stats_by_hand():
    logp, old_logp, adv = _policy_inputs()
    loss, stats = ppo_policy_loss(logp, old_logp, adv, MASK, clip_eps=0.2)
    assert loss.item() == pytest.approx(POLICY_LOSS)
    assert stats["clipfrac"].item() == pytest.approx(CLIPFRAC)
    assert stats["ratio"].item() == pytest.approx(RATIO_MEAN)
    assert stats["approxkl"].item() == pytest.approx(APPROXKL)
    assert all(v.dim() == 0 and not v.requires_grad for v in stats.values())


def test_policy_grad_zero_on_clipped_and_padded_tokens():
    logp, old_logp, adv = _policy_inputs()
    loss, _ = ppo_policy_loss(logp, old_logp, adv, MASK, clip_eps=0.2)
    loss.backward()
    # d/dlogp of -A r is -A r; divided by 5 tokens; clipped tokens 0 and 4 and padding 5 get 0.
    expected = [0.0, -0.5 / 5, 1.1 / 5, -1.8 / 5, 0.0, 0.0]
    assert logp.grad[0].tolist() == pytest.approx(expected)


def test_ratio_one_gives_minus_mean_advantage_and_zero_diagnostics():
    g = torch.Generator().manual_seed(0)
    logp = -3 * torch.rand(3, 5, generator=g, dtype=D)
    logp.requires_grad_(True)
    adv = torch.randn(3, 5, generator=g, dtype=D)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    loss, stats = ppo_policy_loss(logp, logp.detach().clone(), adv, mask, clip_eps=0.1)
    kept = [a for a, m in zip(adv.flatten().tolist(), mask.flatten().tolist()) if m]
    assert loss.item() == pytest.approx(-sum(kept) / len(kept))
    assert stats["clipfrac"].item() == 0.0
    assert stats["approxkl"].item() == 0.0
    assert stats["ratio"].item() == pytest.approx(1.0)
    loss.backward()  # at r = 1 nothing is clipped: gradient is -A / n on every real token
    expected = torch.where(mask.bool(), -adv / len(kept), torch.zeros_like(adv))
    assert torch.allclose(logp.grad, expected)


def test_old_logp_and_advantages_get_no_gradient():
    logp, old_logp, adv = _policy_inputs()
    old_logp.requires_grad_(True)
    adv.requires_grad_(True)
    ppo_policy_loss(logp, old_logp, adv, MASK, clip_eps=0.2)[0].backward()
    assert old_logp.grad is None and adv.grad is None


def test_policy_padding_never_affects_loss_or_gradient():
    logp, old_logp, adv = _policy_inputs()
    loss, stats = ppo_policy_loss(logp, old_logp, adv, MASK, clip_eps=0.2)
    bad = torch.tensor([[False] * 5 + [True]])
    logp2 = logp.detach().masked_fill(bad, float("nan")).requires_grad_(True)
    loss2, stats2 = ppo_policy_loss(
        logp2, old_logp.masked_fill(bad, -math.inf), adv.masked_fill(bad, math.inf), MASK, clip_eps=0.2
    )
    assert loss2.item() == loss.item()
    assert all(stats2[k].item() == stats[k].item() for k in stats)
    loss2.backward()
    assert torch.isfinite(logp2.grad).all() and logp2.grad[0, 5].item() == 0.0


# Value loss, c = 0.2, four real tokens and one padded:
#   v=1.0 old=0.5 R=1.2: (1.0-1.2)^2 = 0.04; v_clip = 0.7, (0.7-1.2)^2 = 0.25 -> 0.25 clipped
#   v=0.6 old=0.5 R=0.0: 0.36; v_clip = 0.6 (inside), 0.36                    -> 0.36 tie
#   v=0.0 old=0.5 R=0.5: 0.25; v_clip = 0.3, (0.3-0.5)^2 = 0.04               -> 0.25
#   v=1.0 old=0.0 R=2.0: 1.00; v_clip = 0.2, (0.2-2.0)^2 = 3.24               -> 3.24 clipped
VALUES = [1.0, 0.6, 0.0, 1.0, 100.0]
OLD_VALUES = [0.5, 0.5, 0.5, 0.0, -7.0]
RETURNS = [1.2, 0.0, 0.5, 2.0, 3.0]
VMASK = torch.tensor([[1, 1, 1, 1, 0]])


def _value_inputs():
    values = torch.tensor([VALUES], dtype=D, requires_grad=True)
    return values, torch.tensor([OLD_VALUES], dtype=D), torch.tensor([RETURNS], dtype=D)


def test_value_loss_clipped_by_hand():
    v, old, ret = _value_inputs()
    loss, stats = ppo_value_loss(v, old, ret, VMASK, clip_range=0.2)
    assert loss.item() == pytest.approx(0.5 * (0.25 + 0.36 + 0.25 + 3.24) / 4)
    assert stats["vf_clipfrac"].item() == pytest.approx(2 / 4)
    loss.backward()
    # 0.5 * 2 (v - R) / 4 on unclipped tokens; 0 on the clipped ones and on padding
    assert v.grad[0].tolist() == pytest.approx([0.0, 0.6 / 4, -0.5 / 4, 0.0, 0.0])


def test_value_loss_unclipped_by_hand():
    v, old, ret = _value_inputs()
    loss, stats = ppo_value_loss(v, old, ret, VMASK, clip_range=None)
    assert loss.item() == pytest.approx(0.5 * (0.04 + 0.36 + 0.25 + 1.0) / 4)
    assert stats["vf_clipfrac"].item() == 0.0
    loss.backward()
    assert v.grad[0].tolist() == pytest.approx([-0.2 / 4, 0.6 / 4, -0.5 / 4, -1.0 / 4, 0.0])


def test_value_loss_padding_never_affects_result():
    v, old, ret = _value_inputs()
    bad = ~VMASK.bool()
    v2 = v.detach().masked_fill(bad, math.nan).requires_grad_(True)
    loss, _ = ppo_value_loss(v, old, ret, VMASK, clip_range=0.2)
    loss2, _ = ppo_value_loss(
        v2, old.masked_fill(bad, math.inf), ret.masked_fill(bad, -math.inf), VMASK, clip_range=0.2
    )
    assert loss2.item() == loss.item()
    loss2.backward()
    assert torch.isfinite(v2.grad).all()


def test_entropy_by_hand():
    # p = [1/6, 2/6, 3/6] from logits log 1, log 2, log 3
    logits = torch.tensor([[0.0, math.log(2), math.log(3)], [0.0, 0.0, 0.0]], dtype=D)
    h = entropy_from_logits(logits)
    expected = -sum(p * math.log(p) for p in (1 / 6, 2 / 6, 3 / 6))
    assert h.tolist() == pytest.approx([expected, math.log(3)])


def test_entropy_shape_stability_and_shift_invariance():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 7, generator=g, dtype=D)
    h = entropy_from_logits(logits)
    assert h.shape == (2, 3)
    assert torch.allclose(entropy_from_logits(logits + 500.0), h)
    peaked = torch.tensor([1000.0, 0.0, -1000.0])  # exp overflows without logsumexp
    assert entropy_from_logits(peaked).item() == pytest.approx(0.0, abs=1e-12)
    assert torch.all(h >= 0) and torch.all(h <= math.log(7) + 1e-12)


def test_ppo_errors():
    logp, old_logp, adv = _policy_inputs()
    for eps in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="clip_eps"):
            ppo_policy_loss(logp, old_logp, adv, MASK, clip_eps=eps)
    with pytest.raises(ValueError, match="shape mismatch"):
        ppo_policy_loss(logp, old_logp[:, :5], adv, MASK, clip_eps=0.2)
    v, old, ret = _value_inputs()
    for c in (0.0, -1.0):
        with pytest.raises(ValueError, match="clip_range"):
            ppo_value_loss(v, old, ret, VMASK, clip_range=c)
    with pytest.raises(ValueError, match="shape mismatch"):
        ppo_value_loss(v, old, ret, MASK, clip_range=0.2)
