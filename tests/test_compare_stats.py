"""prefalign.compare.stats: the crossed bootstrap against hand-computed cases and a naive loop, the paired
statistics, the per-seed t-interval, and the matrices read from completion rows."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from prefalign.compare import arms
from prefalign.compare.stats import (
    START,
    Interval,
    bootstrap_interval,
    crossed_mean,
    efficiency_difference,
    from_completions,
    mean_interval,
    paired_difference,
    seed_interval,
    win_rate,
)

# ---------------------------------------------------------------------------------------------- bootstrap


def test_one_seed_two_prompts_is_exactly_zero_to_one():
    """Resampling [0, 1]: means 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4, so the 2.5th and 97.5th percentiles
    of 10,000 resamples are 0 and 1 exactly."""
    assert mean_interval(np.array([[0.0, 1.0]])) == Interval(0.5, 0.0, 1.0)


def test_a_constant_matrix_has_a_point_interval():
    assert mean_interval(np.full((3, 4), 0.25)) == Interval(0.25, 0.25, 0.25)


def test_seeds_are_resampled_too():
    """Two seeds that differ, prompts that do not: the crossed bootstrap sees the seeds' spread (seed means 0,
    0.5, 1 as above), resampling the prompts of the seed-mean row alone sees none."""
    values = np.array([[0.0, 0.0], [1.0, 1.0]])
    assert mean_interval(values) == Interval(0.5, 0.0, 1.0)
    assert mean_interval(values.mean(axis=0, keepdims=True)) == Interval(0.5, 0.5, 0.5)


def test_a_fixed_seed_gives_the_same_interval_and_another_seed_another():
    values = np.random.default_rng(1).normal(size=(3, 40))
    assert mean_interval(values, seed=7) == mean_interval(values, seed=7)
    assert mean_interval(values, seed=7) != mean_interval(values, seed=8)


def test_crossed_mean_is_the_naive_gather():
    rng = np.random.default_rng(2)
    values = rng.normal(size=(3, 5))
    seed_idx, prompt_idx = rng.integers(0, 3, size=(50, 3)), rng.integers(0, 5, size=(50, 5))
    naive = [values[np.ix_(s, p)].mean() for s, p in zip(seed_idx, prompt_idx)]
    np.testing.assert_allclose(crossed_mean(values, seed_idx, prompt_idx), naive, rtol=1e-12)


def test_a_shared_row_is_read_at_every_resampled_seed():
    """(1, P) values (the start's row): whichever seeds were drawn, only the prompt resample matters."""
    row = np.array([[1.0, 3.0]])
    got = crossed_mean(row, np.array([[0, 2, 2]]), np.array([[1, 1]]))
    assert got.tolist() == [3.0]


def test_the_interval_is_a_naive_crossed_bootstrap():
    """A by-hand loop: draw seeds and prompts with replacement, take the mean of the crossed cells, 10,000 times,
    and read the 2.5th and 97.5th percentiles; scipy's ends agree up to Monte Carlo error."""
    values = np.random.default_rng(3).normal(size=(4, 30)) + np.arange(4)[:, None] * 0.3
    rng = np.random.default_rng(4)
    means = [values[np.ix_(rng.integers(0, 4, size=4), rng.integers(0, 30, size=30))].mean() for _ in range(10_000)]
    low, high = np.percentile(means, [2.5, 97.5])
    got = mean_interval(values)
    assert got.mean == pytest.approx(values.mean(), abs=1e-12)
    assert (got.low, got.high) == pytest.approx((low, high), abs=0.02)


def test_the_interval_narrows_with_more_prompts():
    draws = np.random.default_rng(5).normal(size=2000)
    small, large = mean_interval(draws[None, :20]), mean_interval(draws[None, :])
    # the width shrinks as 1/sqrt(n): ten times narrower expected, at least five asserted
    assert (large.high - large.low) < (small.high - small.low) / 5
    assert large.low < 0 < large.high


def test_the_statistic_receives_resampled_indices():
    shapes = []

    def statistic(seed_idx, prompt_idx):
        shapes.append((seed_idx.shape[-1], prompt_idx.shape[-1], int(seed_idx.max()), int(prompt_idx.max())))
        return np.zeros(seed_idx.shape[:-1])

    assert bootstrap_interval(statistic, 3, 5, n_resamples=100) == (0.0, 0.0)
    assert {shape[:2] for shape in shapes} == {(3, 5)}
    assert max(shape[2] for shape in shapes) == 2 and max(shape[3] for shape in shapes) == 4


def test_one_seed_resamples_prompts_only():
    seen = []

    def statistic(seed_idx, prompt_idx):
        seen.append(np.unique(seed_idx).tolist())
        return prompt_idx.mean(axis=-1)

    low, high = bootstrap_interval(statistic, 1, 2)
    assert {tuple(s) for s in seen} == {(0,)}
    assert (low, high) == (0.0, 1.0)


def test_one_prompt_cannot_be_bootstrapped():
    with pytest.raises(ValueError, match="1 prompt\\(s\\); the bootstrap needs at least 2"):
        mean_interval(np.array([[0.5], [0.7]]))


def test_no_seed_is_refused():
    with pytest.raises(ValueError, match="n_seeds must be at least 1, got 0"):
        bootstrap_interval(lambda s, p: p.mean(axis=-1), 0, 4)


def test_a_nan_is_refused():
    with pytest.raises(ValueError, match="non-finite"):
        mean_interval(np.array([[0.0, np.nan]]))


# ---------------------------------------------------------------------------------------------- paired statistics


def test_a_policy_minus_itself_is_exactly_zero():
    values = np.random.default_rng(6).normal(size=(3, 8))
    assert paired_difference(values, values) == Interval(0.0, 0.0, 0.0)


def test_a_difference_with_the_start_row_pairs_each_seed_with_it():
    start = np.array([[0.0, 1.0]])
    policy = np.array([[1.0, 2.0], [1.0, 2.0]])  # every seed one above the start on every prompt
    assert paired_difference(policy, start) == Interval(1.0, 1.0, 1.0)


def test_unpairable_shapes_are_refused():
    with pytest.raises(ValueError, match=r"shapes \(2, 3\) and \(2, 4\) do not pair"):
        paired_difference(np.zeros((2, 3)), np.zeros((2, 4)))


def test_win_rate_against_itself_is_exactly_one_half():
    gold = np.random.default_rng(7).normal(size=(2, 5, 3))
    assert win_rate(gold, gold) == Interval(0.5, 0.5, 0.5)


def test_win_rate_by_hand():
    """Prompt 0: a wins sample 0, ties sample 1 (0.75); prompt 1: a wins one, loses one (0.5). One seed, so the
    prompt resamples give 0.5, 0.625, 0.75."""
    a = np.array([[[1.0, 0.0], [2.0, 2.0]]])
    b = np.array([[[0.0, 0.0], [1.0, 3.0]]])
    assert win_rate(a, b) == Interval(0.625, 0.5, 0.75)


def test_win_rate_against_the_start_row():
    a = np.array([[[1.0], [1.0]], [[-1.0], [-1.0]]])  # seed 0 beats the start everywhere, seed 1 loses everywhere
    start = np.zeros((1, 2, 1))
    assert win_rate(a, start) == Interval(0.5, 0.0, 1.0)


def test_win_rate_refuses_unpaired_samples():
    with pytest.raises(ValueError, match="win_rate: shapes"):
        win_rate(np.zeros((1, 2, 3)), np.zeros((1, 2, 2)))


# ---------------------------------------------------------------------------------------------- per seed


def test_seed_interval_is_student_t():
    """[1, 2, 3]: mean 2, sd 1; t(0.975, 2 df) = 4.302652729749464, so 2 -/+ 4.3027 / sqrt(3)."""
    got = seed_interval([1.0, 2.0, 3.0])
    half = 4.302652729749464 / np.sqrt(3)
    assert (got.mean, got.low, got.high) == pytest.approx((2.0, 2.0 - half, 2.0 + half), abs=1e-9)


def test_one_seed_is_a_point():
    assert seed_interval([0.7]) == Interval(0.7, 0.7, 0.7)


def test_equal_seeds_have_no_spread():
    assert seed_interval([3.0, 3.0]) == Interval(3.0, 3.0, 3.0)


def test_seed_interval_is_cut_to_the_bounds_of_its_quantity():
    # three accuracies: the t-interval (t = 4.303 for 2 degrees of freedom) runs past 1, which no accuracy reaches
    half = stats.t.ppf(0.975, df=2) * np.std([0.5, 0.95, 0.95], ddof=1) / np.sqrt(3)
    free = seed_interval([0.5, 0.95, 0.95])
    assert free.high == pytest.approx(0.8 + half) and free.high > 1
    cut = seed_interval([0.5, 0.95, 0.95], bounds=(0.0, 1.0))
    assert cut.mean == pytest.approx(0.8) and cut.low == pytest.approx(0.8 - half) and cut.high == 1.0


def test_seed_interval_needs_values():
    with pytest.raises(ValueError, match="one finite value per seed"):
        seed_interval([])


def test_efficiency_difference_of_equal_efficiencies_is_zero():
    """2 gold per 4 pairs and 1 per 2: both 0.5 per pair."""
    got = efficiency_difference(np.full((2, 3), 2.0), [4.0, 4.0], np.full((2, 3), 1.0), [2.0, 2.0])
    assert got == Interval(0.0, 0.0, 0.0)


def test_efficiency_resamples_the_costs_with_the_seeds():
    """Gain 1 everywhere, cost 1 in seed 0 and 2 in seed 1: the resampled seeds give 1/1, 1/1.5 (twice as likely)
    or 1/2; the point is 1 / mean cost."""
    got = efficiency_difference(np.ones((2, 2)), [1.0, 2.0], np.zeros((2, 2)), [1.0, 1.0])
    assert got == Interval(1 / 1.5, 0.5, 1.0)


def test_efficiency_needs_positive_costs():
    with pytest.raises(ValueError, match="every cost must be positive"):
        efficiency_difference(np.ones((1, 2)), [0.0], np.ones((1, 2)), [1.0])


def test_efficiency_needs_one_cost_per_seed():
    with pytest.raises(ValueError, match="must be \\(S, P\\), \\(S, P\\), \\(S,\\), \\(S,\\)"):
        efficiency_difference(np.ones((2, 2)), [1.0], np.ones((2, 2)), [1.0, 1.0])


# ---------------------------------------------------------------------------------------------- from_completions


def _row(policy, prompt, sample, gold, kl=0.0):
    return {"policy": policy, "prompt": prompt, "sample": sample, "gold": gold, "kl": kl, "completion": "..."}


def _rows():
    rows = []
    for prompt_no, prompt in enumerate(["b", "a"]):  # "b" appears first: it is prompt 0
        for sample in (0, 1):
            rows.append(_row("reference", prompt, sample, 10.0 * prompt_no + sample))
            for seed in (0, 1):
                gold = 100.0 * (seed + 1) + 10.0 * prompt_no + sample
                rows.append(_row(f"ppo/seed-{seed}", prompt, sample, gold, kl=gold / 100))
            rows.append(_row("ppo@kl=0.1/seed-0", prompt, sample, -1.0))  # another policy: ignored
    return rows


def test_from_completions_builds_the_arrays():
    scores = from_completions(_rows(), [START, "ppo"], [0, 1])
    np.testing.assert_array_equal(scores[START].gold, [[[0.0, 1.0], [10.0, 11.0]]])
    np.testing.assert_array_equal(scores[START].kl, np.zeros((1, 2, 2)))
    np.testing.assert_array_equal(scores["ppo"].gold, [[[100, 101], [110, 111]], [[200, 201], [210, 211]]])
    np.testing.assert_array_equal(scores["ppo"].kl, scores["ppo"].gold / 100)
    np.testing.assert_array_equal(scores["ppo"].gold_per_prompt, [[100.5, 110.5], [200.5, 210.5]])
    np.testing.assert_array_equal(scores["ppo"].kl_per_prompt, [[1.005, 1.105], [2.005, 2.105]])


def test_a_missing_completion_is_named():
    rows = [row for row in _rows() if not (row["policy"] == "ppo/seed-1" and row["prompt"] == "a" and row["sample"])]
    with pytest.raises(ValueError, match="policy 'ppo/seed-1' has no sample 1 of prompt 'a'"):
        from_completions(rows, [START, "ppo"], [0, 1])


def test_a_missing_seed_is_named():
    with pytest.raises(ValueError, match="policy 'ppo/seed-2' has no sample 0 of prompt 'b'"):
        from_completions(_rows(), ["ppo"], [0, 2])


def test_a_duplicated_completion_is_refused():
    rows = _rows()
    with pytest.raises(ValueError, match="policy 'reference' has sample 0 of prompt 'b' twice"):
        from_completions([*rows, rows[0]], [START], [0])


def test_no_rows_of_the_policies_is_refused():
    with pytest.raises(ValueError, match="no rows of the policies"):
        from_completions(_rows(), ["dpo"], [0])


def test_the_start_is_the_arms_start():
    assert START == arms.START
