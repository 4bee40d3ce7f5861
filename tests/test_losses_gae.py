"""GAE: hand-computed rows, the vectorised loop against a naive per-row loop, padding, errors."""

import random

import pytest
import torch

from prefalign.losses.gae import gae


def naive_gae(rewards, values, mask, gamma, lam):
    """Per-row, per-token Python reference (lists in, lists out); see gae's docstring."""
    adv = [[0.0] * len(row) for row in rewards]
    ret = [[0.0] * len(row) for row in rewards]
    for b in range(len(rewards)):
        n = sum(mask[b])
        next_value, next_adv = 0.0, 0.0
        for t in reversed(range(n)):
            delta = rewards[b][t] + gamma * next_value - values[b][t]
            next_adv = delta + gamma * lam * next_adv
            adv[b][t] = next_adv
            ret[b][t] = next_adv + values[b][t]
            next_value = values[b][t]
    return adv, ret


def _f64(rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_gae_by_hand():
    # gamma = 0.9, lam = 0.8, so gamma * lam = 0.72.
    # Row 0, full:   t2: delta = 1 + 0 - 0.5 = 0.5;        A2 = 0.5
    #                t1: delta = 0 + 0.9*0.5 - 0.5 = -0.05; A1 = -0.05 + 0.72*0.5 = 0.31
    #                t0: delta = -0.05;                     A0 = -0.05 + 0.72*0.31 = 0.1732
    # Row 1, ends at t1 (t2 is padding holding junk 99):
    #                t1: delta = 2 + 0 - 1 = 1;             A1 = 1
    #                t0: delta = 0 + 0.9*1 - 1 = -0.1;      A0 = -0.1 + 0.72*1 = 0.62
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 99.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.5, 0.5], [1.0, 1.0, 99.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert adv.tolist() == [pytest.approx([0.1732, 0.31, 0.5]), pytest.approx([0.62, 1.0, 0.0])]
    assert ret.tolist() == [pytest.approx([0.6732, 0.81, 1.0]), pytest.approx([1.62, 2.0, 0.0])]


def test_gamma_lam_one_is_return_to_go_minus_value_and_lam_zero_is_td():
    rewards = torch.tensor([[1.0, -2.0, 3.0, 7.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.25, -1.0, 5.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # return-to-go over real tokens: [1 - 2 + 3, -2 + 3, 3] = [2, 1, 3]
    assert adv.tolist() == [pytest.approx([2 - 0.5, 1 - 0.25, 3 + 1.0, 0.0])]
    assert ret.tolist() == [pytest.approx([2.0, 1.0, 3.0, 0.0])]
    adv, _ = gae(rewards, values, mask, gamma=0.5, lam=0.0)
    # one-step TD: r_t + 0.5 * V_{t+1} - V_t, no bootstrap after the last real token
    assert adv.tolist() == [pytest.approx([1 + 0.125 - 0.5, -2 - 0.5 - 0.25, 3 - (-1.0), 0.0])]


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.95), (0.9, 0.0), (0.0, 1.0)])
def test_vectorised_matches_naive_loop_on_ragged_batches(gamma, lam):
    rng = random.Random(0)
    B, T = 8, 11
    lengths = [0, T, 1] + [rng.randint(0, T) for _ in range(B - 3)]  # empty, full, single token
    mask = [[1] * n + [0] * (T - n) for n in lengths]
    rewards = [[rng.gauss(0, 1) for _ in range(T)] for _ in range(B)]
    values = [[rng.gauss(0, 1) for _ in range(T)] for _ in range(B)]
    exp_adv, exp_ret = naive_gae(rewards, values, mask, gamma, lam)
    adv, ret = gae(_f64(rewards), _f64(values), torch.tensor(mask), gamma, lam)
    for b in range(B):
        assert adv[b].tolist() == pytest.approx(exp_adv[b], abs=1e-12)
        assert ret[b].tolist() == pytest.approx(exp_ret[b], abs=1e-12)


def test_padding_never_affects_result_even_nan():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(4, 6, generator=g)
    values = torch.randn(4, 6, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6, [0] * 6, [1, 0, 0, 0, 0, 0]]).bool()
    adv, ret = gae(rewards, values, mask, 0.99, 0.95)
    junk_rewards = rewards.masked_fill(~mask, float("nan"))
    junk_values = values.masked_fill(~mask, float("inf"))
    adv2, ret2 = gae(junk_rewards, junk_values, mask, 0.99, 0.95)
    assert torch.equal(adv, adv2) and torch.equal(ret, ret2)
    assert torch.all(adv[~mask] == 0) and torch.all(ret[~mask] == 0)
    assert torch.allclose(ret[mask], (adv + values)[mask])


@pytest.mark.parametrize("bad_row", [[1, 0, 1, 0], [0, 1, 1, 1], [0, 0, 0, 1]])
def test_refuses_mask_that_is_not_right_padded(bad_row):
    mask = torch.tensor([[1, 1, 0, 0], bad_row])
    with pytest.raises(ValueError, match="right-padded"):
        gae(torch.zeros(2, 4), torch.zeros(2, 4), mask, 1.0, 0.95)


def test_refuses_bad_shapes_and_coefficients():
    z = torch.zeros(2, 3)
    m = torch.ones(2, 3)
    with pytest.raises(ValueError, match="shape mismatch"):
        gae(z, torch.zeros(2, 4), m, 1.0, 0.95)
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        gae(torch.zeros(3), torch.zeros(3), torch.ones(3), 1.0, 0.95)
    for gamma, lam, name in ((1.1, 0.9, "gamma"), (-0.1, 0.9, "gamma"), (1.0, 1.5, "lam"), (1.0, -0.5, "lam")):
        with pytest.raises(ValueError, match=name):
            gae(z, z, m, gamma, lam)
