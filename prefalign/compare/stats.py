"""The race's statistics: intervals for what one evaluation measured, across training seeds and prompts.

In `prefalign compare`'s evaluation every policy (each arm's policy of each training seed, and the starting
policy) samples completions for the same P held-out prompts with keyed sampling: the same random numbers for
the same (prompt, sample index). So a policy's scores form a matrix indexed ``[seed, prompt]``, and the
starting policy's is one row that every seed shares.

Why a crossed interval: two independent sources of chance move a mean of that matrix, which training seeds ran
(a method's own variance) and which prompts were held out (the evaluation's). Prompts are shared across seeds, so
the cells of one column are not independent draws, and treating cells (or prompts alone, or seeds alone) as the
sample would leave one source out and give too narrow an interval. `crossed_interval` adds the two: the variance of
the seed means over S plus that of the prompt means over P (the variance the pigeonhole bootstrap of a crossed
design estimates, Owen 2007; it counts the seed x prompt interaction twice, so it errs wide), and reads a Student-t
interval with Welch-Satterthwaite degrees of freedom. With three seeds the seed part has 2 degrees of freedom
(t = 4.30): a percentile bootstrap over 3 seeds, used before, never reaches past the extreme seed means and put 0
outside its "95%" interval of a zero effect in 10-28% of simulated races of 3 seeds x 50 prompts, this interval in
4.5-8% (2,000-6,000 races per setting; ~8% where seed and prompt variances are alike, as Welch-Satterthwaite then
overstates the degrees of freedom; with 2 seeds up to 12%).
A difference of two policies is the interval of their cell-by-cell difference: paired by seed and prompt.

Everything here is numpy and scipy: arrays in, `Interval` out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

START = "start"
"""The starting policy's name among ``from_completions``'s policies (as `prefalign.compare.arms.START`)."""
REFERENCE_POLICY = "reference"
"""The starting policy's name in the evaluation's completions.jsonl (one for all seeds)."""
CONFIDENCE = 0.95


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


def crossed_interval(values: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Student-t interval of the mean of a (S, P) matrix of seeds x prompts, both sources of variance in it.

    ``var = var_s(row means) / S + var_p(column means) / P`` (unbiased variances; the seed part is 0 for S = 1),
    degrees of freedom ``var^2 / (v_seed^2 / (S - 1) + v_prompt^2 / (P - 1))`` (Welch-Satterthwaite), the
    interval ``mean +- t(df) sqrt(var)``; a matrix without spread is a point. Naive loop::

        rows = [sum(values[s]) / P for s in range(S)];  cols = [sum(values[:, p]) / S for p in range(P)]
        v_seed = sum((r - mean(rows)) ** 2 for r in rows) / (S - 1) / S   (0 when S == 1)
        v_prompt = sum((c - mean(cols)) ** 2 for c in cols) / (P - 1) / P
    """
    s, p = values.shape
    if p < 2:
        raise ValueError(f"crossed_interval: {p} prompt(s); an interval needs at least 2 (evaluate on more prompts)")
    mean = float(values.mean())
    v_prompt = float(values.mean(axis=0).var(ddof=1)) / p
    v_seed = float(values.mean(axis=1).var(ddof=1)) / s if s > 1 else 0.0
    var = v_seed + v_prompt
    if var == 0.0:
        return mean, mean
    df = var**2 / (v_prompt**2 / (p - 1) + (v_seed**2 / (s - 1) if s > 1 else 0.0))
    half = float(stats.t.ppf((1 + confidence) / 2, df)) * math.sqrt(var)
    return mean - half, mean + half


def _matrix(name: str, values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    if values.ndim != 2:
        raise ValueError(f"{name}: expected a (seeds, prompts) matrix, got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{name}: holds a non-finite value (NaN or inf)")
    return values


def mean_interval(values: np.ndarray) -> Interval:
    """The mean of a (S, P) matrix with its `crossed_interval`."""
    values = _matrix("mean_interval", values)
    low, high = crossed_interval(values)
    return Interval(float(values.mean()), low, high)


def paired_difference(a: np.ndarray, b: np.ndarray) -> Interval:
    """The mean of ``a - b`` with its `crossed_interval`, taken over the cell-by-cell differences (the pairing by
    seed and prompt). ``a`` (S, P); ``b`` (S, P), or (1, P): one row every seed shares (the start)."""
    a = _matrix("paired_difference: a", a)
    b = _matrix("paired_difference: b", b)
    if b.shape[1] != a.shape[1] or b.shape[0] not in (1, a.shape[0]):
        raise ValueError(f"paired_difference: shapes {a.shape} and {b.shape} do not pair (b: (S, P) or (1, P))")
    return mean_interval(a - b)


def win_rate(a_gold: np.ndarray, b_gold: np.ndarray) -> Interval:
    """How often ``a`` beats ``b``: 1 / 0.5 / 0 when a's sample k of a prompt scores above / equal to / below b's
    sample k of the same prompt and seed, averaged, with its `crossed_interval` cut to [0, 1] (0.5: no difference,
    ``excludes(0.5)``: a significant one). ``a_gold`` (S, P, K); ``b_gold`` (S, P, K) or (1, P, K)."""
    a_gold, b_gold = np.asarray(a_gold, dtype=float), np.asarray(b_gold, dtype=float)
    if a_gold.ndim != 3 or b_gold.shape[1:] != a_gold.shape[1:] or b_gold.shape[0] not in (1, a_gold.shape[0]):
        raise ValueError(f"win_rate: shapes {a_gold.shape} and {b_gold.shape} do not pair (S, P, K) with (S|1, P, K)")
    if not (np.all(np.isfinite(a_gold)) and np.all(np.isfinite(b_gold))):  # a NaN compares as neither: a loss
        raise ValueError("win_rate: a gold score is non-finite (NaN or inf)")
    wins = np.where(a_gold > b_gold, 1.0, np.where(a_gold == b_gold, 0.5, 0.0))
    rate = mean_interval(wins.mean(axis=-1))
    # a rate's t-interval runs past 1 (or 0) near a clean sweep: cut to what a rate can be, as `seed_interval`'s
    return Interval(rate.mean, max(rate.low, 0.0), min(rate.high, 1.0))


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


def grouped_interval(
    values: np.ndarray, groups: Sequence[object], bounds: tuple[float, float] | None = None
) -> Interval:
    """The mean of a (S, N) matrix of per-item values over seeds and items, where items come in groups that are
    not independent (a held-out prompt's preference pairs), with the `crossed_interval` over seeds and groups.

    The group is the sampling unit. The item mean is a ratio (sum of values / number of items) of group totals,
    so, by the delta method, column ``g`` of the (S, G) matrix is ``ybar + (T[s, g] - ybar n[g]) G / N``
    (``T``: the group's sum, ``n``: its items, ``ybar``: the overall mean): its mean is the item mean, its row
    means the seeds' item means, and a group's weight is its number of items (the plain item mean, not the mean
    of group means). ``groups`` (N,): each item's group key; at least 2 groups. ``bounds``: as `seed_interval`'s.
    Naive loop::

        ybar = mean(values);  keys = distinct(groups);  G = len(keys)
        for s, g: M[s][g] = ybar + (sum(values[s][i] for i if groups[i] == keys[g]) - ybar * count(keys[g])) * G / N
    """
    values = _matrix("grouped_interval", values)
    keys = {key: g for g, key in enumerate(dict.fromkeys(groups))}
    if len(groups) != values.shape[1]:
        raise ValueError(f"grouped_interval: {len(groups)} group keys for {values.shape[1]} items")
    of = np.array([keys[key] for key in groups])
    onehot = np.eye(len(keys))[of]  # (N, G)
    ybar = float(values.mean())
    matrix = ybar + (values @ onehot - ybar * onehot.sum(axis=0)) * len(keys) / values.shape[1]
    low, high = crossed_interval(matrix)
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return Interval(ybar, low, high)


def efficiency_difference(
    gain_a: np.ndarray, cost_a: Sequence[float], gain_b: np.ndarray, cost_b: Sequence[float]
) -> Interval:
    """(mean gain of a / mean cost of a) - (the same for b), with the `crossed_interval` of its linearisation.

    ``gain_*`` (S, P): e.g. gold gain over the start per prompt; ``cost_*`` (S,): one cost per seed (minutes,
    preference pairs, gradient steps); seed s of each arm trained on seed s's pairs, so the seeds pair. The ratio
    ``G / C`` of two means moves, to first order (the delta method), as ``g[s, p] / C - G (c[s] - C) / C^2``: that
    (S, P) matrix, a minus b, has the point estimate as its mean, and a seed's cost enters with its gains.
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

    def linear(gain: np.ndarray, cost: np.ndarray) -> np.ndarray:
        g, c = gain.mean(), cost.mean()
        return gain / c - (g * (cost - c) / c**2)[:, None]

    low, high = crossed_interval(linear(gain_a, ca) - linear(gain_b, cb))
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
