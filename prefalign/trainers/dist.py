"""Statistics over all processes of an ``accelerate launch`` run; with one process each is the local value.

Every function here is a collective: every process must call it, in the same order, with tensors of the
same shape. Sums go through float64 so the result hardly depends on how the rows are split.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sum_across_processes(acc, x: Tensor) -> Tensor:
    """Elementwise sum of ``x`` over processes (float64, on ``x``'s device)."""
    x = x.double()
    return x if acc.num_processes == 1 else acc.reduce(x, reduction="sum")


def mean_across_processes(acc, stats: dict[str, float]) -> dict[str, float]:
    """Average logged stats over processes (each holds its own shard's means; every process the same keys)."""
    if acc.num_processes == 1 or not stats:
        return stats
    keys = sorted(stats)
    t = torch.tensor([float(stats[k]) for k in keys], device=acc.device, dtype=torch.float64)
    return dict(zip(keys, (sum_across_processes(acc, t) / acc.num_processes).tolist()))


def sums_and_weights_across_processes(
    acc, sums: dict[str, float], weights: dict[str, float]
) -> tuple[dict[str, float], dict[str, float]]:
    """``(sum(sums[k]), sum(weights[k]))`` over processes, per key, in one all-reduce (every process the same
    keys)."""
    keys = sorted(sums)
    t = torch.tensor(
        [[float(sums[k]) for k in keys], [float(weights[k]) for k in keys]], device=acc.device, dtype=torch.float64
    )
    total, weight = sum_across_processes(acc, t).tolist() if keys else ([], [])
    return dict(zip(keys, total)), dict(zip(keys, weight))


def pooled_mean_across_processes(acc, sums: dict[str, float], weights: dict[str, float]) -> dict[str, float]:
    """``sum(sums[k]) / sum(weights[k])`` over processes, per key: the mean over every process's rows, however
    unevenly they are split (every process the same keys; a key of zero total weight is left out)."""
    total, weight = sums_and_weights_across_processes(acc, sums, weights)
    return {k: total[k] / weight[k] for k in total if weight[k] > 0}


def masked_mean_var(acc, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and unbiased variance of ``x`` over the masked positions of every process, as 0-dim tensors of
    ``x``'s dtype: the statistics of the concatenated batch, for `masked_whiten` / `explained_variance`.

    Two all-reduces: (sum, count), then the squared deviations from the global mean (steadier than a sum of
    squares). Raises ValueError with fewer than 2 masked positions in total, like `masked_var`.
    """
    keep = mask.bool()
    zero = torch.zeros((), dtype=torch.float64, device=x.device)
    xs = x.double()
    total, count = sum_across_processes(acc, torch.stack([torch.where(keep, xs, zero).sum(), keep.sum().double()]))
    n = int(count.item())
    if n < 2:
        raise ValueError(f"masked_mean_var needs at least 2 masked positions over all processes, got {n}")
    mean = total / count
    sq = sum_across_processes(acc, torch.where(keep, (xs - mean) ** 2, zero).sum())
    return mean.to(x.dtype), (sq / (count - 1)).to(x.dtype)
