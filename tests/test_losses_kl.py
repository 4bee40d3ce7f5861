"""KL estimators k1/k2/k3 (Schulman 2020): hand values, invariants, unbiasedness by Monte Carlo."""

import math

import pytest
import torch

from prefalign.losses.kl import KL_ESTIMATORS, kl_k1, kl_k2, kl_k3, kl_penalty

LOGP = torch.tensor([-1.0, -2.0], dtype=torch.float64)
REF = torch.tensor([-1.5, -1.0], dtype=torch.float64)
# logp - ref = [0.5, -1.0]; log r = ref - logp = [-0.5, 1.0]
K1 = [0.5, -1.0]
K2 = [0.5 * 0.5**2, 0.5 * 1.0**2]
K3 = [math.exp(-0.5) - 1 + 0.5, math.e - 1 - 1]


def test_estimators_by_hand():
    assert kl_k1(LOGP, REF).tolist() == pytest.approx(K1)
    assert kl_k2(LOGP, REF).tolist() == pytest.approx(K2)
    assert kl_k3(LOGP, REF).tolist() == pytest.approx(K3)


def test_kl_penalty_dispatches_by_name():
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3"}
    for name, expected in (("k1", K1), ("k2", K2), ("k3", K3)):
        assert kl_penalty(LOGP, REF, name).tolist() == pytest.approx(expected)


def test_zero_when_equal_and_k2_k3_nonnegative():
    g = torch.Generator().manual_seed(0)
    logp = -5 * torch.rand(4, 16, generator=g)
    for name in KL_ESTIMATORS:
        assert torch.all(kl_penalty(logp, logp, name) == 0)
    ref = -5 * torch.rand(4, 16, generator=g)
    assert torch.all(kl_k2(logp, ref) >= 0)
    assert torch.all(kl_k3(logp, ref) >= 0)
    assert torch.any(kl_k1(logp, ref) < 0)  # k1 is only unbiased on average


def test_k3_is_accurate_for_tiny_log_ratios_in_float32():
    d = 1e-4  # k3 ~ d^2 / 2 - d^3 / 6; exp(d) - 1 - d in float32 would be mostly rounding error
    got = kl_k3(torch.tensor([0.0]), torch.tensor([d])).item()
    assert got == pytest.approx(math.expm1(d) - d, rel=1e-2)


def test_k1_and_k3_are_unbiased_k2_close_for_near_distributions():
    q = [0.1, 0.2, 0.3, 0.4]  # policy, samples come from here
    p = [0.15, 0.2, 0.25, 0.4]  # reference
    true_kl = sum(qi * math.log(qi / pi) for qi, pi in zip(q, p))
    g = torch.Generator().manual_seed(0)
    idx = torch.multinomial(torch.tensor(q), 400_000, replacement=True, generator=g)
    logp = torch.tensor(q, dtype=torch.float64).log()[idx]
    ref = torch.tensor(p, dtype=torch.float64).log()[idx]
    assert kl_k1(logp, ref).mean().item() == pytest.approx(true_kl, rel=0.1)
    assert kl_k3(logp, ref).mean().item() == pytest.approx(true_kl, rel=0.05)
    assert kl_k2(logp, ref).mean().item() == pytest.approx(true_kl, rel=0.1)


def test_unknown_estimator_and_shape_mismatch_raise():
    with pytest.raises(ValueError, match=r"unknown KL estimator 'k4'.*\['k1', 'k2', 'k3'\]"):
        kl_penalty(LOGP, REF, "k4")
    with pytest.raises(ValueError, match="shape mismatch"):
        kl_penalty(LOGP, REF[:1], "k1")
