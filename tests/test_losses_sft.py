"""SFT loss: masked token-level NLL."""

import math

import pytest
import torch

from prefalign.losses.sft import sft_loss


def test_sft_loss_by_hand_padding_and_gradient():
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -9.0, -9.0]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[0, 1, 1], [1, 0, 0]])
    loss, stats = sft_loss(logps, mask)
    assert loss.item() == pytest.approx((2.0 + 3.0 + 0.5) / 3)
    assert stats["nll"].item() == loss.item() and not stats["nll"].requires_grad
    loss.backward()
    assert logps.grad.tolist() == [[0.0, -1 / 3, -1 / 3], [-1 / 3, 0.0, 0.0]]
    junk = logps.detach().masked_fill(~mask.bool(), -math.inf)
    assert sft_loss(junk, mask)[0].item() == loss.item()


def test_sft_shape_mismatch():
    with pytest.raises(ValueError, match="shape mismatch"):
        sft_loss(torch.zeros(2, 3), torch.ones(2, 4))
