"""The race's statistics: intervals for what one evaluation measured, across training seeds and prompts.

In `prefalign compare`'s evaluation every policy (each arm's policy of each training seed, and the starting
policy) samples completions for the same P held-out prompts with keyed sampling: the same random numbers for
the same (prompt, sample index). So a policy's scores form a matrix indexed ``[seed, prompt]``, and the
starting policy's is one row that every seed shares.

Why a crossed bootstrap: two independent sources of chance move a mean of that matrix, which training seeds
ran (a method's own variance) and which prompts were held out (the evaluation's). Prompts are shared across
seeds, so the cells of one column are not independent draws, and resampling cells (or prompts alone, or
seeds alone) would leave one source out and give too narrow an interval. `bootstrap_interval` resamples seeds
and prompts independently, each with replacement, and keeps every (resampled seed, resampled prompt) cell:
both sources enter the interval, and a difference of two policies resampled with the same indices is paired.

Everything here is numpy and scipy: arrays in, `Interval` out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

START = "start"
"""The starting policy's name among ``from_completions``'s policies (as `prefalign.compare.arms.START`)."""
REFERENCE_POLICY = "reference"
"""The starting policy's name in the evaluation's completions.jsonl (one for all seeds)."""
CONFIDENCE = 0.95
N_RESAMPLES = 10_000
"""Bootstrap resamples: the Monte Carlo error of a 95% percentile end is then ~0.01 of the interval's width."""
BATCH = 1_000
"""Resamples scipy draws at once: bounds the index arrays to BATCH x P integers."""

Statistic = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""``statistic(seed_idx (..., S), prompt_idx (..., P)) -> (...)``: the statistic of each resample."""


@dataclass(frozen=True)
class Interval:
    """A point estimate with a confidence interval around it."""

    mean: float
    low: float
    high: float

    def above(self, value: float = 0.0) -> bool:
        """The whole interval lies above ``value``."""
        return self.low > value

    def below(self, value: float = 0.0) -> bool:
        """The whole interval lies below ``value``."""
        return self.high < value

    def excludes(self, value: float = 0.0) -> bool:
        """The interval lies entirely above or entirely below ``value``."""
        return self.above(value) or self.below(value)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class PolicyScores:
    """One policy's evaluation: a score per (training seed, prompt, sample); the starting policy has one seed row."""

    gold: np.ndarray
    """(S, P, K): the gold judge's score of each completion."""
    kl: np.ndarray
    """(S, P, K): sequence KL to the starting policy, nats (0 for the starting policy)."""

    @property
    def gold_per_prompt(self) -> np.ndarray:
        """(S, P): the mean gold score of each prompt's K samples."""
        return self.gold.mean(axis=-1)

    @property
    def kl_per_prompt(self) -> np.ndarray:
        """(S, P): the mean KL of each prompt's K samples."""
        return self.kl.mean(axis=-1)


def bootstrap_interval(
    statistic: Statistic,
    n_seeds: int,
    n_prompts: int,
    *,
    confidence: float = CONFIDENCE,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """The percentile interval of ``statistic`` under the crossed bootstrap of seeds and prompts.

    scipy resamples the two index samples ``arange(n_seeds)`` and ``arange(n_prompts)`` independently
    (``paired=False``), each with replacement, and hands ``statistic`` the resampled indices: it reads its own
    matrices with them (`crossed_mean`), so every matrix of one resample sees the same seeds and prompts.
    With one seed only prompts are resampled (``seed_idx`` is all zeros): scipy needs two observations a sample.
    """
    if n_seeds < 1:
        raise ValueError(f"bootstrap_interval: n_seeds must be at least 1, got {n_seeds}")
    if n_prompts < 2:
        raise ValueError(
            f"bootstrap_interval: {n_prompts} prompt(s); the bootstrap needs at least 2 to resample"
            " (evaluate on more held-out prompts)"
        )

    def crossed(*indices: np.ndarray, axis: int = -1) -> np.ndarray:
        assert axis == -1, "scipy moves the resampled axis last"
        *seed_part, prompt_idx = indices
        seed_idx = seed_part[0] if seed_part else np.zeros((*prompt_idx.shape[:-1], 1), dtype=np.intp)
        return statistic(seed_idx, prompt_idx)

    samples = ((np.arange(n_seeds),) if n_seeds > 1 else ()) + (np.arange(n_prompts),)
    result = stats.bootstrap(
        samples,
        crossed,
        n_resamples=n_resamples,
        batch=BATCH,
        vectorized=True,
        paired=False,
        confidence_level=confidence,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def crossed_mean(values: np.ndarray, seed_idx: np.ndarray, prompt_idx: np.ndarray) -> np.ndarray:
    """The mean of ``values[s, p]`` over every (resampled seed s, resampled prompt p) of each resample.

    ``values`` (S, P), or (1, P) for a row every seed shares; ``seed_idx`` (..., S'), ``prompt_idx`` (..., P').
    The naive loop, per resample: ``values[np.ix_(seed_idx[b], prompt_idx[b])].mean()``. Here the indices become
    counts (how often each seed and prompt was drawn), and the mean is ``seed_counts @ values @ prompt_counts``
    over the number of cells, with no (S', P') gather per resample.
    """
    if values.shape[0] == 1:
        seed_idx = np.zeros_like(seed_idx)
    seed_counts = _counts(seed_idx, values.shape[0])
    prompt_counts = _counts(prompt_idx, values.shape[1])
    cells = seed_idx.shape[-1] * prompt_idx.shape[-1]
    return ((seed_counts @ values) * prompt_counts).sum(axis=-1) / cells


def _counts(indices: np.ndarray, n: int) -> np.ndarray:
    """(..., m) indices into range(n) -> (..., n) float counts of each index along the last axis."""
    flat = indices.reshape(-1, indices.shape[-1]).astype(np.intp)
    offsets = flat + n * np.arange(flat.shape[0])[:, None]
    counts = np.bincount(offsets.ravel(), minlength=flat.shape[0] * n)
    return counts.reshape(*indices.shape[:-1], n).astype(float)


def _matrix(name: str, values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    if values.ndim != 2:
        raise ValueError(f"{name}: expected a (seeds, prompts) matrix, got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{name}: holds a non-finite value (NaN or inf)")
    return values


def mean_interval(values: np.ndarray, *, seed: int = 0) -> Interval:
    """The mean of a (S, P) matrix with its crossed-bootstrap interval."""
    values = _matrix("mean_interval", values)
    low, high = bootstrap_interval(lambda s, p: crossed_mean(values, s, p), values.shape[0], values.shape[1], seed=seed)
    return Interval(float(values.mean()), low, high)


def paired_difference(a: np.ndarray, b: np.ndarray, *, seed: int = 0) -> Interval:
    """The mean of ``a - b`` with its crossed-bootstrap interval: both sides resampled at the same seeds and
    prompts (the pairing). ``a`` (S, P); ``b`` (S, P), or (1, P): one row every seed shares (the start)."""
    a = _matrix("paired_difference: a", a)
    b = _matrix("paired_difference: b", b)
    if b.shape[1] != a.shape[1] or b.shape[0] not in (1, a.shape[0]):
        raise ValueError(f"paired_difference: shapes {a.shape} and {b.shape} do not pair (b: (S, P) or (1, P))")
    return mean_interval(a - b, seed=seed)


def win_rate(a_gold: np.ndarray, b_gold: np.ndarray, *, seed: int = 0) -> Interval:
    """How often ``a`` beats ``b``: 1 / 0.5 / 0 when a's sample k of a prompt scores above / equal to / below b's
    sample k of the same prompt and seed, averaged, with its crossed-bootstrap interval (0.5: no difference,
    ``excludes(0.5)``: a significant one). ``a_gold`` (S, P, K); ``b_gold`` (S, P, K) or (1, P, K)."""
    a_gold, b_gold = np.asarray(a_gold, dtype=float), np.asarray(b_gold, dtype=float)
    if a_gold.ndim != 3 or b_gold.shape[1:] != a_gold.shape[1:] or b_gold.shape[0] not in (1, a_gold.shape[0]):
        raise ValueError(f"win_rate: shapes {a_gold.shape} and {b_gold.shape} do not pair (S, P, K) with (S|1, P, K)")
    wins = np.where(a_gold > b_gold, 1.0, np.where(a_gold == b_gold, 0.5, 0.0))
    return mean_interval(wins.mean(axis=-1), seed=seed)


def seed_interval(
    values: Sequence[float], confidence: float = CONFIDENCE, bounds: tuple[float, float] | None = None
) -> Interval:
    """Mean and Student-t interval across seeds of a per-seed quantity with no prompt axis (wall time, peak
    memory, a reward model's held-out accuracy).

    ``bounds``: the range the quantity cannot leave (an accuracy's [0, 1]); the interval is cut to it, as three
    seeds' t-interval (t = 4.30) easily runs past it.
    One value carries no uncertainty: low = high = mean, and callers must treat it as a point, not as an
    interval that excludes everything but itself.
    """
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or x.size == 0 or not np.all(np.isfinite(x)):
        raise ValueError(f"seed_interval: needs one finite value per seed, got {list(values)}")
    mean = float(x.mean())
    if x.size == 1:
        return Interval(mean, mean, mean)
    half = float(stats.t.ppf((1 + confidence) / 2, df=x.size - 1)) * float(x.std(ddof=1)) / math.sqrt(x.size)
    low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return Interval(mean, low, high)


def efficiency_difference(
    gain_a: np.ndarray, cost_a: Sequence[float], gain_b: np.ndarray, cost_b: Sequence[float], *, seed: int = 0
) -> Interval:
    """(mean gain of a / mean cost of a) - (the same for b), with its crossed-bootstrap interval.

    ``gain_*`` (S, P): e.g. gold gain over the start per prompt; ``cost_*`` (S,): one cost per seed (minutes,
    preference pairs, gradient steps). A resample's seed indices pick both the gain rows and the costs, and the
    same indices serve both arms (seed s of each arm trained on seed s's pairs).
    """
    gain_a, gain_b = _matrix("efficiency_difference: gain_a", gain_a), _matrix("efficiency_difference: gain_b", gain_b)
    ca, cb = np.asarray(cost_a, dtype=float), np.asarray(cost_b, dtype=float)
    n_seeds = gain_a.shape[0]
    if gain_b.shape != gain_a.shape or ca.shape != (n_seeds,) or cb.shape != (n_seeds,):
        raise ValueError(
            f"efficiency_difference: gains {gain_a.shape}, {gain_b.shape} and costs {ca.shape}, {cb.shape}"
            " must be (S, P), (S, P), (S,), (S,)"
        )
    if not (np.all(ca > 0) and np.all(cb > 0)):
        raise ValueError(f"efficiency_difference: every cost must be positive, got {ca.tolist()} and {cb.tolist()}")

    def statistic(s: np.ndarray, p: np.ndarray) -> np.ndarray:
        return crossed_mean(gain_a, s, p) / ca[s].mean(axis=-1) - crossed_mean(gain_b, s, p) / cb[s].mean(axis=-1)

    low, high = bootstrap_interval(statistic, n_seeds, gain_a.shape[1], seed=seed)
    return Interval(float(gain_a.mean() / ca.mean() - gain_b.mean() / cb.mean()), low, high)


def policy_name(arm: str, seed: int) -> str:
    """An arm's policy of one training seed in the evaluation's completions (the start: `REFERENCE_POLICY`)."""
    return REFERENCE_POLICY if arm == START else f"{arm}/seed-{seed}"


def from_completions(rows: Iterable[dict], policies: Sequence[str], seeds: Iterable[int]) -> dict[str, PolicyScores]:
    """Every policy's (S, P, K) gold and KL arrays from the evaluation's completion rows.

    ``rows``: completions.jsonl's rows, ``{"policy", "prompt", "sample", "gold", "kl", ...}``; ``policies``:
    arm names (``ppo``, ``dpo``, ...) and `START`; ``seeds``: the training seeds, in order. Arm ``ppo``'s
    policy of seed S is ``ppo/seed-S``, the start's is ``reference`` (its arrays have one seed row). Prompts
    are in order of first appearance, samples by index; rows of other policies are ignored. Strict: a
    duplicated or missing (prompt, sample) of a policy is a ValueError naming them.
    """
    seeds = list(seeds)
    wanted = {policy_name(name, seed) for name in policies for seed in seeds}
    cells: dict[tuple[str, str, int], tuple[float, float]] = {}
    prompts: dict[str, int] = {}
    samples: set[int] = set()
    for row in rows:
        if row["policy"] not in wanted:
            continue
        key = (row["policy"], row["prompt"], int(row["sample"]))
        if key in cells:
            raise ValueError(f"completions: policy {key[0]!r} has sample {key[2]} of prompt {key[1]!r} twice")
        cells[key] = (float(row["gold"]), float(row["kl"]))
        prompts.setdefault(row["prompt"], len(prompts))
        samples.add(key[2])
    if not cells:
        raise ValueError(f"completions: no rows of the policies {sorted(wanted)}")
    order = sorted(samples)
    return {name: _scores(name, seeds, list(prompts), order, cells) for name in policies}


def _scores(
    name: str, seeds: list[int], prompts: list[str], samples: list[int], cells: dict[tuple[str, str, int], tuple]
) -> PolicyScores:
    rows = [policy_name(name, seeds[0])] if name == START else [policy_name(name, seed) for seed in seeds]
    values = np.empty((2, len(rows), len(prompts), len(samples)))
    for i, policy in enumerate(rows):
        for j, prompt in enumerate(prompts):
            for k, sample in enumerate(samples):
                cell = cells.get((policy, prompt, sample))
                if cell is None:
                    raise ValueError(f"completions: policy {policy!r} has no sample {sample} of prompt {prompt!r}")
                values[:, i, j, k] = cell
    return PolicyScores(gold=values[0], kl=values[1])
