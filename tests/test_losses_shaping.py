import math

import pytest
import torch

from prefalign.losses import apply_missing_eos_penalty, explained_variance, kl_shaped_rewards, overlong_penalty


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


def _overlong_loop(lengths: list[int], max_len: int, buffer: int, factor: float) -> list[float]:
    """The penalty as the paper writes it (Yu et al. 2025, section 3.4), one completion at a time."""
    out = []
    for n in lengths:
        if n <= max_len - buffer:
            p = 0.0
        elif n <= max_len:
            p = ((max_len - buffer) - n) / buffer
        else:
            p = -1.0
        out.append(p * factor)
    return out


def test_overlong_penalty_exact_values_at_the_boundaries():
    # L_max = 10, L_cache = 4: free up to 6 tokens, then -1/4 per token, -1 at 10
    lengths = torch.tensor([0, 1, 5, 6, 7, 8, 9, 10, 11, 40])
    got = overlong_penalty(lengths, max_len=10, buffer=4)
    assert got.dtype == torch.float32 and got.shape == (10,)
    assert got.tolist() == [0.0, 0.0, 0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0, -1.0]
    assert not torch.signbit(got[:4]).any()  # +0.0, not -0.0, where no penalty applies
    scaled = overlong_penalty(lengths, max_len=10, buffer=4, factor=0.5)
    assert scaled.tolist() == [0.0, 0.0, 0.0, 0.0, -0.125, -0.25, -0.375, -0.5, -0.5, -0.5]


def test_overlong_penalty_one_token_buffer_and_whole_length_buffer():
    # buffer 1: only a completion of exactly L_max tokens pays, and all of it
    assert overlong_penalty(torch.tensor([7, 8, 9]), max_len=8, buffer=1).tolist() == [0.0, -1.0, -1.0]
    # buffer = L_max: every token counts, from the first
    assert overlong_penalty(torch.tensor([0, 1, 2, 4]), max_len=4, buffer=4).tolist() == [0.0, -0.25, -0.5, -1.0]


@pytest.mark.parametrize("max_len,buffer,factor", [(16, 5, 1.0), (16, 15, 2.5), (7, 3, 0.3), (48, 16, 1.0)])
def test_overlong_penalty_equals_the_naive_loop(max_len, buffer, factor):
    lengths = list(range(0, max_len + 3)) + [
        int(x) for x in torch.randint(0, 2 * max_len, (50,), generator=torch.Generator().manual_seed(0))
    ]
    got = overlong_penalty(torch.tensor(lengths), max_len, buffer, factor)
    want = torch.tensor(_overlong_loop(lengths, max_len, buffer, factor))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("max_len,buffer,factor", [(10, 0, 1.0), (10, 11, 1.0), (10, -1, 1.0), (10, 4, 0.0)])
def test_overlong_penalty_refuses_a_bad_buffer_or_factor(max_len, buffer, factor):
    with pytest.raises(ValueError, match=r"needs 1 <= buffer <= max_len and factor > 0"):
        overlong_penalty(torch.tensor([1]), max_len, buffer, factor)
