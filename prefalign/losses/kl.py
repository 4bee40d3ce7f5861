"""Per-token estimators of KL(policy || reference) from the log-probs of sampled tokens.

Source: J. Schulman, "Approximating KL Divergence" (blog post, 2020). The tokens were sampled from
the policy q; with ``log r = log p_ref(x) - log q(x)`` Schulman's three estimators are

    k1 = -log r                  unbiased, high variance, negative on many samples
    k2 = (log r)^2 / 2           biased, low variance, never negative
    k3 = (r - 1) - log r         unbiased, low variance, never negative (log r <= r - 1)

Each takes ``logp`` and ``ref_logp`` of any one shape (usually ``(B, T)``: the log-prob of each
sampled token under the policy and under the reference) and returns a tensor of that shape. Only
the *mean* over samples estimates the KL; a single value of k1 may well be negative. Masking and
averaging are the caller's job (see `prefalign.losses.stats.masked_mean`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from prefalign.losses.stats import check_same_shape


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 = logp - ref_logp, shape of the inputs (e.g. ``(B, T)``). Unbiased, high variance."""
    return logp - ref_logp


def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k2 = 0.5 * (logp - ref_logp)^2, shape of the inputs. Biased but low variance, >= 0.

    Its expectation is an f-divergence that agrees with the KL up to second order in the
    log-ratio, so the bias is small while policy and reference stay close, which is what a KL
    penalty is there to ensure.
    """
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 = exp(ref_logp - logp) - 1 - (ref_logp - logp), shape of the inputs. Unbiased, >= 0.

    ``expm1`` instead of ``exp(.) - 1``: near policy == reference the log-ratio is tiny, and
    ``exp(d)`` rounds to ``1 + d`` in float32, so ``exp(d) - 1 - d`` would be mostly rounding noise.
    Large positive ``ref_logp - logp`` overflows to ``inf``; we do not clamp it, since that would
    silently report a different KL than the one asked for.
    """
    log_r = ref_logp - logp
    return torch.expm1(log_r) - log_r


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}
"""Estimator name -> function ``(logp, ref_logp) -> per-token KL estimate``."""


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: str) -> Tensor:
    """Per-token KL(policy || ref) estimate by the named estimator (``"k1"``, ``"k2"``, ``"k3"``).

    Args:
        logp: ``(B, T)`` (or any shape) log-probs of the sampled tokens under the policy.
        ref_logp: same shape, log-probs of the same tokens under the reference model.
        estimator: a key of `KL_ESTIMATORS`.

    Returns:
        Same shape as the inputs.

    Raises:
        ValueError: unknown estimator, or the two inputs differ in shape.
    """
    fn = KL_ESTIMATORS.get(estimator)
    if fn is None:
        raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {sorted(KL_ESTIMATORS)}")
    check_same_shape(logp=logp, ref_logp=ref_logp)
    return fn(logp, ref_logp)
