"""Bradley-Terry reward-model loss: hand values, margin, centering, invariants, errors."""

import math

import pytest
import torch

from prefalign.losses.reward import bradley_terry_loss

D = torch.float64
CHOSEN = torch.tensor([2.0, 0.0], dtype=D)
REJECTED = torch.tensor([1.0, 0.5], dtype=D)  # r_c - r_r = [1, -0.5]


def softplus(x):
    return math.log1p(math.exp(x))  # -log sigmoid(z) = log(1 + e^-z) = softplus(-z)


def test_loss_and_stats_by_hand():
    loss, stats = bradley_terry_loss(CHOSEN, REJECTED)
    assert loss.item() == pytest.approx((softplus(-1.0) + softplus(0.5)) / 2)
    assert stats["accuracy"].item() == 0.5
    assert stats["rewards/chosen"].item() == pytest.approx(1.0)
    assert stats["rewards/rejected"].item() == pytest.approx(0.75)
    assert stats["margin"].item() == pytest.approx(0.25)
    assert all(v.dim() == 0 and not v.requires_grad for v in stats.values())


def test_margin_tensor_and_float():
    loss, stats = bradley_terry_loss(CHOSEN, REJECTED, margin=torch.tensor([0.5, 0.0], dtype=D))
    # logits [1 - 0.5, -0.5 - 0]
    assert loss.item() == pytest.approx((softplus(-0.5) + softplus(0.5)) / 2)
    assert stats["margin"].item() == pytest.approx(0.25)  # the stat is the raw reward gap
    loss, _ = bradley_terry_loss(CHOSEN, REJECTED, margin=1.0)  # logits [0, -1.5]
    assert loss.item() == pytest.approx((math.log(2) + softplus(1.5)) / 2)


def test_centering_by_hand_and_shift_invariance():
    base, _ = bradley_terry_loss(CHOSEN, REJECTED)
    centered, _ = bradley_terry_loss(CHOSEN, REJECTED, center_coef=0.1)
    # r_c + r_r = [3, 0.5]; 0.1 * (9 + 0.25) / 2
    assert centered.item() == pytest.approx(base.item() + 0.4625)
    shifted, _ = bradley_terry_loss(CHOSEN + 10, REJECTED + 10)
    assert shifted.item() == pytest.approx(base.item())  # BT sees only differences...
    shifted_c, _ = bradley_terry_loss(CHOSEN + 10, REJECTED + 10, center_coef=0.1)
    assert shifted_c.item() > centered.item() + 1  # ...centering does not


def test_gradient_by_hand():
    c = CHOSEN.clone().requires_grad_(True)
    r = REJECTED.clone().requires_grad_(True)
    bradley_terry_loss(c, r)[0].backward()
    # d/dr_c of -log sigmoid(d) / B = -sigmoid(-d) / B = -1 / (1 + e^d) / 2
    expected = [-1 / (1 + math.e) / 2, -1 / (1 + math.exp(-0.5)) / 2]
    assert c.grad.tolist() == pytest.approx(expected)
    assert r.grad.tolist() == pytest.approx([-g for g in expected])


def test_ties_count_as_wrong():
    _, stats = bradley_terry_loss(torch.ones(4), torch.ones(4))
    assert stats["accuracy"].item() == 0.0


def test_errors():
    with pytest.raises(ValueError, match="shape mismatch"):
        bradley_terry_loss(CHOSEN, REJECTED[:1])
    with pytest.raises(ValueError, match=r"\(B,\)"):
        bradley_terry_loss(CHOSEN[:, None], REJECTED[:, None])
    with pytest.raises(ValueError, match="shape mismatch"):
        bradley_terry_loss(CHOSEN, REJECTED, margin=torch.zeros(3))
    with pytest.raises(ValueError, match="center_coef"):
        bradley_terry_loss(CHOSEN, REJECTED, center_coef=-0.1)
