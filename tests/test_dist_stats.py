"""Whitening and explained variance with statistics of a larger batch (PPO over several processes).

The 2-process runs in test_multiprocess.py check the collectives end to end; here the arithmetic.
"""

from types import SimpleNamespace

import pytest
import torch

from prefalign.losses import explained_variance, masked_mean, masked_var, masked_whiten
from prefalign.trainers.dist import masked_mean_var, mean_across_processes

ONE_PROCESS = SimpleNamespace(num_processes=1)


def _batch(seed=0, b=6, t=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, generator=g) * 3 + 1
    lengths = torch.tensor([5, 1, 3, 4, 2, 5])[:b]
    mask = (torch.arange(t)[None] < lengths[:, None]).long()
    return torch.where(mask.bool(), x, torch.full_like(x, float("nan"))), mask  # padding is poison


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_with_its_own_statistics_is_the_plain_whiten(shift_mean):
    x, mask = _batch()
    plain = masked_whiten(x, mask, shift_mean=shift_mean)
    given = masked_whiten(x, mask, shift_mean=shift_mean, mean=masked_mean(x, mask), var=masked_var(x, mask))
    assert torch.equal(given, plain)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_shards_whitened_with_global_statistics_equal_the_whole_batch_whitened(shift_mean):
    """What two processes do: each whitens its rows with the statistics of all rows."""
    x, mask = _batch()
    whole = masked_whiten(x, mask, shift_mean=shift_mean)
    mean, var = masked_mean_var(ONE_PROCESS, x, mask)  # the statistics of the concatenated shards
    shards = [
        masked_whiten(x[rows], mask[rows], shift_mean=shift_mean, mean=mean, var=var)
        for rows in (slice(0, 2), slice(2, 6))
    ]
    assert torch.allclose(torch.cat(shards), whole, atol=1e-6)
    # while whitening each shard with its own statistics does not
    local = [masked_whiten(x[rows], mask[rows], shift_mean=shift_mean) for rows in (slice(0, 2), slice(2, 6))]
    assert not torch.allclose(torch.cat(local), whole, atol=1e-3)


def test_masked_mean_var_of_one_process_is_masked_mean_and_var():
    x, mask = _batch(seed=1)
    mean, var = masked_mean_var(ONE_PROCESS, x, mask)
    assert mean.dtype == var.dtype == x.dtype and mean.shape == var.shape == ()
    assert torch.allclose(mean, masked_mean(x, mask), rtol=1e-6)
    assert torch.allclose(var, masked_var(x, mask), rtol=1e-6)
    one_token = torch.zeros_like(mask)
    one_token[0, 0] = 1
    with pytest.raises(ValueError, match="at least 2"):
        masked_mean_var(ONE_PROCESS, x, one_token)


def test_whiten_needs_both_statistics():
    x, mask = _batch()
    with pytest.raises(ValueError, match="both"):
        masked_whiten(x, mask, mean=torch.tensor(0.0))


def test_explained_variance_with_given_variances_is_the_plain_one():
    ret, mask = _batch(seed=2)
    values = torch.where(mask.bool(), ret * 0.5 + 0.1, torch.zeros_like(ret))
    plain = explained_variance(values, ret, mask)
    given = explained_variance(
        values, ret, mask, var_returns=masked_var(ret, mask), var_residual=masked_var(ret - values, mask)
    )
    assert torch.equal(given, plain)
    _, var_ret = masked_mean_var(ONE_PROCESS, ret, mask)
    assert explained_variance(values, ret, mask, var_returns=var_ret) == pytest.approx(plain.item(), rel=1e-6)
    # variances of a larger batch (every process's shard) are used as given, not recomputed from this one
    four, three = torch.tensor(4.0), torch.tensor(3.0)  # this batch's own: 1 - 0.25 = 0.75
    assert explained_variance(values, ret, mask, var_returns=four, var_residual=three).item() == 0.25
    local_residual = masked_var(ret - values, mask)
    assert explained_variance(values, ret, mask, var_returns=four) == pytest.approx(1 - local_residual.item() / 4)


def test_mean_across_one_process_is_the_identity():
    stats = {"loss": 0.5, "acc": 1.0}
    assert mean_across_processes(ONE_PROCESS, stats) is stats
