"""Masked statistics over token tensors.

A mask is a bool or 0/1 tensor of exactly ``x``'s shape (usually ``(B, T)``), true on the positions
that count (real response tokens) and false on padding. Masked-out positions never change a result,
even if they hold ``nan`` or ``inf``: we select with ``torch.where`` instead of multiplying by the
mask, because ``nan * 0`` is ``nan`` and padded log-probs are often ``-inf``.

Whitening follows the reference code of "The N+ Implementation Details of RLHF with PPO"
(Huang et al., 2024), which inherits it from OpenAI's lm-human-preferences (Ziegler et al., 2019).
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_same_shape(**tensors: Tensor) -> None:
    """Raise ValueError unless every tensor has the same shape.

    Broadcasting would silently turn a ``(B, T)`` vs ``(B, T - 1)`` off-by-one, or a ``(B,)`` vs
    ``(B, 1)`` slip, into a wrong number instead of an error, so the loss functions refuse it.
    """
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name}={shape}" for name, shape in shapes.items())
        raise ValueError(f"shape mismatch: {listed}; these tensors must all have the same shape")


def masked_mean(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Mean of ``x`` over the positions where ``mask`` is true.

    Args:
        x: any shape, e.g. ``(B, T)``.
        mask: bool or 0/1, same shape as ``x``.
        dim: reduce over these dims only (e.g. ``dim=1`` gives one mean per row, ``(B,)``);
            ``None`` reduces everything to a 0-dim tensor.

    Returns:
        ``x.sum(dim)`` over masked positions divided by the count of masked positions. A slice with
        no masked position gives ``nan`` (0 / 0): an empty batch is a bug upstream and we let it
        show rather than report a made-up 0.

    Naive equivalent (``dim=None``)::

        vals = [x[i] for i in all_indices if mask[i]]
        return sum(vals) / len(vals)
    """
    check_same_shape(x=x, mask=mask)
    keep = mask.bool()
    total = torch.where(keep, x, torch.zeros_like(x))
    count = keep.to(x.dtype)
    if dim is None:
        return total.sum() / count.sum()
    return total.sum(dim) / count.sum(dim)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over the masked positions, a 0-dim tensor.

    Args:
        x: any shape, e.g. ``(B, T)``.
        mask: bool or 0/1, same shape as ``x``.
        unbiased: divide by ``n - 1`` (Bessel's correction) instead of ``n``, where ``n`` is the
            number of masked positions.

    Raises:
        ValueError: fewer than 2 masked positions with ``unbiased=True`` (or none at all), where the
            variance is undefined. This costs one host sync; it is meant for once-per-rollout use.

    Naive equivalent::

        vals = [x[i] for i in all_indices if mask[i]]
        mu = sum(vals) / len(vals)
        return sum((v - mu) ** 2 for v in vals) / (len(vals) - 1 if unbiased else len(vals))
    """
    check_same_shape(x=x, mask=mask)
    n = int(mask.bool().sum().item())
    need = 2 if unbiased else 1
    if n < need:
        raise ValueError(f"masked_var needs at least {need} masked position(s) (unbiased={unbiased}), got {n}")
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        var = var * (n / (n - 1))
    return var


def masked_whiten(
    x: Tensor,
    mask: Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    *,
    mean: Tensor | None = None,
    var: Tensor | None = None,
) -> Tensor:
    """Scale ``x`` to unit variance over the masked positions (and centre it if ``shift_mean``).

    ``(x - mean) / sqrt(var + eps)``, with mean and unbiased variance taken over masked positions
    only; with ``shift_mean=False`` the mean is added back, so only the scale changes.

    Why ``shift_mean=False`` exists: it is used to whiten per-token *rewards*. Subtracting the mean
    reward would hand every token a constant bonus or penalty, which changes how much the policy
    wants to lengthen or shorten its answers; rescaling alone does not (Ziegler et al., 2019;
    Huang et al., 2024). Advantages are whitened with the default ``shift_mean=True``.

    Args:
        x: any shape, e.g. ``(B, T)``.
        mask: bool or 0/1, same shape as ``x``.
        shift_mean: centre the result at 0 (see above).
        eps: added to the variance so a constant input does not divide by 0.
        mean: precomputed mean (0-dim), given together with ``var``, to whiten with statistics of a
            larger batch than ``x`` (PPO over several processes: every process holds a shard, the
            statistics are those of all shards). Default: computed from ``x`` and ``mask``.
        var: precomputed unbiased variance (0-dim), given together with ``mean``; see ``mean``.

    Returns:
        Same shape as ``x``; exactly 0 where ``mask`` is false.

    Raises:
        ValueError: fewer than 2 masked positions (see `masked_var`); only one of ``mean``/``var``.
    """
    if (mean is None) != (var is None):
        raise ValueError("masked_whiten: give both mean and var, or neither")
    if mean is None or var is None:  # both (checked above)
        mean = masked_mean(x, mask)
        var = masked_var(x, mask, unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))
