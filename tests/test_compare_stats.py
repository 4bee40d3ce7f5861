"""prefalign.compare.stats: the crossed interval against hand-computed cases, a naive loop and its coverage, the paired
statistics, the per-seed t-interval, and the matrices read from completion rows."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from prefalign.compare import arms
from prefalign.compare.stats import (
    START,
    Interval,
    crossed_interval,
    efficiency_difference,
    from_completions,
    grouped_interval,
    mean_interval,
    paired_difference,
    seed_interval,
    win_rate,
)

# ---------------------------------------------------------------------------------------------- crossed interval

T975 = {1: 12.706204736174707, 2: 4.302652729749464}
"""Student-t 97.5% quantiles by degrees of freedom."""


def test_one_seed_two_prompts_by_hand():
    """[0, 1]: mean 0.5, prompt variance 0.5 / 2 prompts = 0.25, 1 degree of freedom: 0.5 -/+ 12.706 x 0.5."""
    got = mean_interval(np.array([[0.0, 1.0]]))
    assert (got.mean, got.low, got.high) == pytest.approx((0.5, 0.5 - T975[1] * 0.5, 0.5 + T975[1] * 0.5))


def test_a_constant_matrix_has_a_point_interval():
    assert mean_interval(np.full((3, 4), 0.25)) == Interval(0.25, 0.25, 0.25)


def test_seeds_count_too():
    """Two seeds that differ, prompts that do not: the seed means 0 and 1 (variance 0.5 / 2 seeds, 1 degree of
    freedom) make the interval; the prompts of the seed-mean row alone see no spread."""
    values = np.array([[0.0, 0.0], [1.0, 1.0]])
    got = mean_interval(values)
    assert (got.low, got.high) == pytest.approx((0.5 - T975[1] * 0.5, 0.5 + T975[1] * 0.5))
    assert mean_interval(values.mean(axis=0, keepdims=True)) == Interval(0.5, 0.5, 0.5)


def test_the_interval_is_its_naive_loop():
    values = np.random.default_rng(3).normal(size=(3, 7)) + np.arange(3)[:, None] * 0.3
    n_s, n_p = values.shape
    rows = [sum(values[i, j] for j in range(n_p)) / n_p for i in range(n_s)]
    cols = [sum(values[i, j] for i in range(n_s)) / n_s for j in range(n_p)]
    mean = sum(rows) / n_s
    v_seed = sum((r - mean) ** 2 for r in rows) / (n_s - 1) / n_s
    v_prompt = sum((c - mean) ** 2 for c in cols) / (n_p - 1) / n_p
    df = (v_seed + v_prompt) ** 2 / (v_seed**2 / (n_s - 1) + v_prompt**2 / (n_p - 1))
    half = stats.t.ppf(0.975, df) * (v_seed + v_prompt) ** 0.5
    got = mean_interval(values)
    assert (got.mean, got.low, got.high) == pytest.approx((mean, mean - half, mean + half), rel=1e-12)


def test_three_seeds_cover_a_zero_effect_at_the_nominal_rate():
    """400 simulated races with no effect (3 seeds x 50 prompts; a seed effect of sd 0.3, a prompt effect of sd 1,
    noise of sd 0.5): the 95% interval excludes 0 in at most 7% of them. The crossed percentile bootstrap used
    before excluded it in ~10% here (28% where the seed effect dominates): it never reaches past the extreme of
    three seed means."""
    rng = np.random.default_rng(11)
    misses = 0
    for _ in range(400):
        values = rng.normal(0, 0.3, (3, 1)) + rng.normal(0, 1, (1, 50)) + rng.normal(0, 0.5, (3, 50))
        misses += mean_interval(values).excludes(0.0)
    assert misses / 400 <= 0.07, misses


def test_the_interval_narrows_with_more_prompts():
    draws = np.random.default_rng(5).normal(size=2000)
    small, large = mean_interval(draws[None, :20]), mean_interval(draws[None, :])
    # the width shrinks as 1/sqrt(n): ten times narrower expected, at least five asserted
    assert (large.high - large.low) < (small.high - small.low) / 5
    assert large.low < 0 < large.high


def test_one_prompt_has_no_interval():
    with pytest.raises(ValueError, match="1 prompt\\(s\\); an interval needs at least 2"):
        mean_interval(np.array([[0.5], [0.7]]))


def test_crossed_interval_is_what_mean_interval_reads():
    values = np.random.default_rng(6).normal(size=(2, 9))
    got = mean_interval(values)
    assert (got.low, got.high) == crossed_interval(values)


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
    """Prompt 0: a wins sample 0, ties sample 1 (0.75); prompt 1: a wins one, loses one (0.5). One seed: the
    prompts' 0.75 and 0.5 (variance 0.03125 / 2 prompts, 1 degree of freedom)."""
    a = np.array([[[1.0, 0.0], [2.0, 2.0]]])
    b = np.array([[[0.0, 0.0], [1.0, 3.0]]])
    got = win_rate(a, b)  # 0.625 +- 12.71 x 0.125 runs past both ends: cut to [0, 1]
    assert (got.mean, got.low, got.high) == pytest.approx((0.625, 0.0, 1.0))
    # four prompts at 1/2, 1/2, 3/4, 1/4: variance 0.25^2 x 2 / 3 over 4 prompts, 3 degrees of freedom, inside [0, 1]
    a = np.array([[[1.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 0.0]]])
    b = np.array([[[0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]])
    half = stats.t.ppf(0.975, 3) * np.sqrt(0.25**2 * 2 / 3 / 4)
    got = win_rate(a, b)
    assert (got.mean, got.low, got.high) == pytest.approx((0.5, 0.5 - half, 0.5 + half))
    assert 0 < got.low < got.high < 1


def test_win_rate_interval_stays_within_0_and_1():
    """3 seeds of 20 prompts, 58 wins of 60: the t-interval's high end, 1.028 uncut, is 1."""
    a = np.ones((3, 20, 1))
    a[0, :2] = -1.0  # seed 0 loses two prompts
    got = win_rate(a, np.zeros((1, 20, 1)))
    uncut = mean_interval(np.where(a > 0, 1.0, 0.0)[..., 0])
    assert uncut.high > 1 and (got.mean, got.low, got.high) == pytest.approx((58 / 60, uncut.low, 1.0))


def test_win_rate_against_the_start_row():
    a = np.array([[[1.0], [1.0]], [[-1.0], [-1.0]]])  # seed 0 beats the start everywhere, seed 1 loses everywhere
    start = np.zeros((1, 2, 1))
    got = win_rate(a, start)  # seed means 1 and 0: the seeds' spread alone, 1 degree of freedom
    uncut = mean_interval(np.array([[1.0, 1.0], [0.0, 0.0]]))
    assert (uncut.low, uncut.high) == pytest.approx((0.5 - T975[1] * 0.5, 0.5 + T975[1] * 0.5))
    assert (got.mean, got.low, got.high) == pytest.approx((0.5, 0.0, 1.0))  # cut to [0, 1]


def test_win_rate_refuses_a_nan_score():
    with pytest.raises(ValueError, match=r"^win_rate: a gold score is non-finite \(NaN or inf\)$"):
        win_rate(np.array([[[np.nan, 1.0], [0.0, 1.0]]]), np.zeros((1, 2, 2)))


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


# ---------------------------------------------------------------------------------------------- grouped interval


def test_grouped_interval_is_its_naive_loop():
    """Groups of 1, 2 and 3 items: each column is ybar + (group total - ybar x its items) x G / N."""
    values = np.random.default_rng(5).integers(0, 2, size=(3, 6)).astype(float)
    groups = ["a", "b", "b", "c", "c", "c"]
    ybar, keys, n = values.mean(), ["a", "b", "c"], 6
    matrix = np.array(
        [
            [
                ybar + (sum(values[s, i] for i in range(n) if groups[i] == k) - ybar * groups.count(k)) * 3 / n
                for k in keys
            ]
            for s in range(3)
        ]
    )
    low, high = crossed_interval(matrix)
    got = grouped_interval(values, groups)
    assert (got.mean, got.low, got.high) == pytest.approx((ybar, low, high), rel=1e-12)


def test_grouped_interval_weighs_a_group_by_its_items():
    """The item mean, not the mean of group means: group a (1 item, 0) and group b (3 items, 1) mean 0.75, not 0.5."""
    got = grouped_interval(np.array([[0.0, 1.0, 1.0, 1.0]]), ["a", "b", "b", "b"])
    assert got.mean == 0.75


def test_grouped_interval_of_one_item_per_group_is_the_crossed_interval():
    values = np.random.default_rng(6).normal(size=(2, 5))
    got, want = grouped_interval(values, list("abcde")), mean_interval(values)
    assert (got.mean, got.low, got.high) == pytest.approx((want.mean, want.low, want.high), rel=1e-12)


def test_grouped_interval_is_cut_to_its_bounds_and_checks_its_groups():
    got = grouped_interval(np.array([[0.0, 0.0, 1.0, 1.0, 1.0, 1.0]] * 2), list("aabbcc"), bounds=(0.0, 1.0))
    assert got.high == 1.0 and got.low < got.mean  # 0.667 + 3.18 x 0.333 runs past 1
    with pytest.raises(ValueError, match="grouped_interval: 3 group keys for 6 items"):
        grouped_interval(np.zeros((1, 6)), list("abc"))
    with pytest.raises(ValueError, match="1 prompt\\(s\\); an interval needs at least 2"):
        grouped_interval(np.array([[0.0, 1.0]]), ["a", "a"])


def test_efficiency_difference_of_equal_efficiencies_is_zero():
    """2 gold per 4 pairs and 1 per 2: both 0.5 per pair."""
    got = efficiency_difference(np.full((2, 3), 2.0), [4.0, 4.0], np.full((2, 3), 1.0), [2.0, 2.0])
    assert got == Interval(0.0, 0.0, 0.0)


def test_efficiency_carries_each_seed_s_cost_with_its_gains():
    """Gain 1 everywhere, cost 1 in seed 0 and 2 in seed 1: the point is 1 / mean cost = 2/3; linearised, seed s
    moves it by -(1)(c_s - 1.5) / 1.5^2 = +-2/9, so the seed means are 8/9 and 4/9 (variance (2/9)^2 x 2 / 2 seeds,
    1 degree of freedom) and no prompt varies."""
    got = efficiency_difference(np.ones((2, 2)), [1.0, 2.0], np.zeros((2, 2)), [1.0, 1.0])
    half = T975[1] * 2 / 9
    assert (got.mean, got.low, got.high) == pytest.approx((2 / 3, 2 / 3 - half, 2 / 3 + half))


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
