import math

import pytest
import torch

from prefalign.losses import apply_missing_eos_penalty, explained_variance, kl_shaped_rewards


def test_kl_penalty_on_every_real_token_and_score_on_the_last():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-1.0, -0.25, -1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    scores = torch.tensor([2.0, -1.0])
    rewards, kl, non_score = kl_shaped_rewards(scores, logp, ref, mask, kl_coef=0.1, estimator="k1")
    # k1 = logp - ref: row 0 -> [0.5, 0, -1]; row 1 -> [0.5, -0.25, (masked) 0]
    assert torch.allclose(kl, torch.tensor([[0.5, 0.0, -1.0], [0.5, -0.25, 0.0]]))
    assert torch.allclose(non_score, torch.tensor([[-0.05, 0.0, 0.1], [-0.05, 0.025, 0.0]]))
    # score lands on the last real token: column 2 for row 0, column 1 for row 1
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.0, 2.1], [-0.05, -1.0 + 0.025, 0.0]]))


def test_masked_positions_never_leak_and_empty_rows_get_nothing():
    logp = torch.tensor([[-1.0, float("nan")], [-1.0, -1.0]])
    ref = torch.tensor([[-1.0, 5.0], [-1.0, -1.0]])
    mask = torch.tensor([[1, 0], [0, 0]])
    rewards, kl, _ = kl_shaped_rewards(torch.tensor([3.0, 7.0]), logp, ref, mask, kl_coef=1.0, estimator="k3")
    assert rewards.tolist() == [[3.0, 0.0], [0.0, 0.0]]
    assert kl.tolist() == [[0.0, 0.0], [0.0, 0.0]]


def test_missing_eos_penalty():
    scores = torch.tensor([1.0, 1.0, -0.5])
    ended = torch.tensor([True, False, False])
    assert apply_missing_eos_penalty(scores, ended, 2.0).tolist() == [1.0, -1.0, -2.5]
    assert apply_missing_eos_penalty(scores, ended, None) is scores


def test_explained_variance_exact():
    returns = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert explained_variance(returns.clone(), returns, mask).item() == pytest.approx(1.0)
    # values = mean of returns: residual variance = variance of returns -> 0
    assert explained_variance(torch.full_like(returns, 2.0), returns, mask).item() == pytest.approx(0.0, abs=1e-6)
    # residual [1,1,1] has zero variance: a constant offset is fully "explained"
    assert explained_variance(returns - 1, returns, mask).item() == pytest.approx(1.0)
    assert math.isfinite(explained_variance(torch.zeros(1, 4), torch.ones(1, 4), torch.ones(1, 4)).item())
