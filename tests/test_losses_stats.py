"""masked_mean / masked_var / masked_whiten against hand arithmetic and plain Python loops."""

import math
import statistics

import pytest
import torch

from prefalign.losses.stats import check_same_shape, masked_mean, masked_var, masked_whiten

X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64)
M = torch.tensor([[1, 1, 0], [1, 0, 0]])  # keeps 1, 2, 4


def _python_values(x, mask):
    return [float(v) for v, m in zip(x.flatten().tolist(), mask.flatten().tolist()) if m]


def test_masked_mean_by_hand():
    assert masked_mean(X, M).item() == pytest.approx(7 / 3)  # (1 + 2 + 4) / 3
    # per row: (1 + 2) / 2 = 1.5 and 4 / 1 = 4
    assert masked_mean(X, M, dim=1).tolist() == pytest.approx([1.5, 4.0])
    # per column: (1 + 4) / 2, 2 / 1, 0 / 0
    col = masked_mean(X, M, dim=0)
    assert col[:2].tolist() == pytest.approx([2.5, 2.0]) and math.isnan(col[2].item())


def test_masked_mean_bool_and_float_masks_agree():
    assert masked_mean(X, M.bool()).item() == masked_mean(X, M.double()).item()


def test_masked_mean_ignores_nan_and_inf_under_mask():
    poisoned = X.clone()
    poisoned[0, 2] = float("nan")
    poisoned[1, 1:] = float("inf")
    assert masked_mean(poisoned, M).item() == masked_mean(X, M).item()
    assert torch.equal(masked_mean(poisoned, M, dim=1), masked_mean(X, M, dim=1))


def test_masked_mean_gradient_is_one_over_n_on_kept_and_zero_on_padding():
    x = X.clone().requires_grad_(True)
    masked_mean(x, M).backward()
    assert x.grad.tolist() == [[1 / 3, 1 / 3, 0.0], [1 / 3, 0.0, 0.0]]


def test_masked_stats_match_python_loops_on_random_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, generator=g, dtype=torch.float64)
    mask = torch.rand(5, 7, generator=g) > 0.4
    vals = _python_values(x, mask)
    assert masked_mean(x, mask).item() == pytest.approx(sum(vals) / len(vals))
    assert masked_var(x, mask).item() == pytest.approx(statistics.variance(vals))
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(statistics.pvariance(vals))
    for b in range(5):
        row = _python_values(x[b], mask[b])
        expected = sum(row) / len(row) if row else float("nan")
        got = masked_mean(x, mask, dim=1)[b].item()
        assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected)


def test_masked_var_by_hand():
    # kept 1, 2, 4; mean 7/3; squared deviations 16/9 + 1/9 + 25/9 = 42/9
    assert masked_var(X, M, unbiased=False).item() == pytest.approx(42 / 9 / 3)
    assert masked_var(X, M).item() == pytest.approx(42 / 9 / 2)


def test_masked_whiten_by_hand():
    std = math.sqrt(42 / 9 / 2)  # unbiased, as masked_whiten uses
    w = masked_whiten(X, M, eps=0.0)
    expected = [[(1 - 7 / 3) / std, (2 - 7 / 3) / std, 0.0], [(4 - 7 / 3) / std, 0.0, 0.0]]
    assert w.tolist() == [pytest.approx(row) for row in expected]
    w_keep_mean = masked_whiten(X, M, shift_mean=False, eps=0.0)
    expected = [[(1 - 7 / 3) / std + 7 / 3, (2 - 7 / 3) / std + 7 / 3, 0.0], [(4 - 7 / 3) / std + 7 / 3, 0.0, 0.0]]
    assert w_keep_mean.tolist() == [pytest.approx(row) for row in expected]


def test_masked_whiten_invariants_and_padding():
    g = torch.Generator().manual_seed(1)
    x = 3.0 + 5.0 * torch.randn(4, 9, generator=g, dtype=torch.float64)
    mask = torch.rand(4, 9, generator=g) > 0.3
    w = masked_whiten(x, mask)
    assert masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-12)
    assert masked_var(w, mask).item() == pytest.approx(1.0, rel=1e-6)
    assert torch.all(w[~mask] == 0)
    w2 = masked_whiten(x, mask, shift_mean=False)
    assert masked_mean(w2, mask).item() == pytest.approx(masked_mean(x, mask).item())
    assert masked_var(w2, mask).item() == pytest.approx(1.0, rel=1e-6)
    assert torch.all(w2[~mask] == 0)
    poisoned = x.masked_fill(~mask, float("nan"))
    assert torch.equal(masked_whiten(poisoned, mask), w)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape mismatch"):
        masked_mean(X, M[:, :2])
    with pytest.raises(ValueError, match="shape mismatch"):
        masked_var(X, M[0])
    with pytest.raises(ValueError, match="shape mismatch"):
        masked_whiten(X, M.T)
    with pytest.raises(ValueError, match=r"a=\(2,\), b=\(2, 1\)"):
        check_same_shape(a=torch.zeros(2), b=torch.zeros(2, 1))


def test_var_and_whiten_refuse_too_few_positions():
    one = torch.tensor([[1, 0, 0], [0, 0, 0]])
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(X, one)
    with pytest.raises(ValueError, match="at least 2"):
        masked_whiten(X, one)
    assert masked_var(X, one, unbiased=False).item() == 0.0
    with pytest.raises(ValueError, match="at least 1"):
        masked_var(X, torch.zeros_like(M), unbiased=False)
