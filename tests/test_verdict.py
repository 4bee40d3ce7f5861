"""prefalign.compare.verdict: every row's rule at its boundaries on synthetic measurements, and the renderers.

The synthetic gains are constant over prompts and seeds wherever a row should be decisive, so every crossed
interval is a point."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from prefalign.compare.evidence import HeldOutPairs, heldout_pairs
from prefalign.compare.stats import START, PolicyScores
from prefalign.compare.verdict import (
    DOES_NOT_HOLD,
    HOLDS,
    INCONCLUSIVE,
    VERDICTS,
    VerdictRow,
    verdict_inputs,
    verdict_rows,
)
from prefalign.compare.verdict_render import verdict_markdown, verdict_text

PROMPTS = 4
COSTS = {
    "ppo": {"wall_seconds": 600.0, "peak_rss_mb": 4096.0, "gradient_steps": 100, "tokens_generated_training": 50_000,
            "pairs_used": 1000, "rm_wall_seconds": 90.0, "rm_gradient_steps": 40},
    "grpo": {"wall_seconds": 400.0, "peak_rss_mb": 3072.0, "gradient_steps": 100, "tokens_generated_training": 60_000,
             "pairs_used": 1000},
    "rloo": {"wall_seconds": 410.0, "peak_rss_mb": 3072.0, "gradient_steps": 100, "tokens_generated_training": 60_000,
             "pairs_used": 1000},
    "dpo": {"wall_seconds": 120.0, "peak_rss_mb": 2048.0, "gradient_steps": 50, "tokens_generated_training": 0,
            "pairs_used": 1000},
    "dpo_rf": {},
}  # fmt: skip
GAINS = {"ppo": 0.2, "grpo": 0.25, "rloo": 0.15, "dpo": 0.3, "dpo_rf": 0.0}
"""Gold gain over the start (whose gold is 0): DPO's is the highest, so at equal pairs it is the more efficient."""


def _scores(gains: dict, n_seeds: int) -> dict[str, PolicyScores]:
    scores = {START: PolicyScores(gold=np.zeros((1, PROMPTS, 1)), kl=np.zeros((1, PROMPTS, 1)))}
    for arm, gain in gains.items():
        gold = np.broadcast_to(np.asarray(gain, dtype=float), (n_seeds, PROMPTS))[..., None].copy()
        scores[arm] = PolicyScores(gold=gold, kl=np.full_like(gold, 0.5))
    return scores


def _rows(arms=("ppo", "dpo"), n_seeds=2, gains=None, costs=None, rm=None, dpo=None):
    """The rows for ``arms`` with the default measurements, ``gains`` {arm: gain} and ``costs`` {(arm, key):
    per-seed values} replaced; accuracies default to 0.70 (reward model) and 0.68 (DPO) in every seed."""
    gains = {**GAINS, **(gains or {})}
    per_seed = {arm: [dict(COSTS[arm]) for _ in range(n_seeds)] for arm in arms}
    for (arm, key), values in (costs or {}).items():
        for cost, value in zip(per_seed[arm], values):
            cost[key] = value
    rm = (0.70,) * n_seeds if rm is None else rm
    dpo = (0.68,) * n_seeds if dpo is None else dpo
    return verdict_rows(verdict_inputs(arms, per_seed, _scores({a: gains[a] for a in arms}, n_seeds), rm, dpo))


def _row(number, **kwargs):
    return _rows(**kwargs)[number - 1]


# ---------------------------------------------------------------------------------------------- the table


def test_the_table_needs_ppo_and_dpo():
    assert _rows(arms=("ppo", "grpo")) == []
    assert _rows(arms=("dpo", "rloo")) == []


def test_the_measured_columns_follow_the_table_order_and_skip_other_arms():
    rows = _rows(arms=("dpo", "rloo", "dpo_rf", "ppo", "grpo"))
    assert [row.topic for row in rows] == [
        "Reward model",
        "Policy update",
        "Loss",
        "Compute cost and sample efficiency",
    ]
    assert all(list(row.measured) == ["PPO-RLHF", "GRPO", "RLOO", "DPO"] for row in rows)
    assert [row.verdict for row in rows] == [HOLDS] * 4


def test_to_dict_carries_the_deciding_intervals():
    loss = _row(3).to_dict()
    assert loss["verdict"] == HOLDS
    assert loss["evidence"]["gain_dpo"] == {"mean": 0.3, "low": 0.3, "high": 0.3}
    assert set(loss) == {"topic", "claim_ppo", "claim_dpo", "measured", "verdict", "reason", "evidence"}


def test_inputs_are_checked():
    scores = _scores({"ppo": 0.2, "dpo": 0.3}, 2)
    costs = {"ppo": [COSTS["ppo"]] * 2, "dpo": [COSTS["dpo"]]}
    with pytest.raises(ValueError, match="arm 'dpo' has 1 seeds of costs, 2 of scores"):
        verdict_inputs(["ppo", "dpo"], costs, scores)
    costs["dpo"] = [{"wall_seconds": 1.0}] * 2
    with pytest.raises(ValueError, match="the costs of arm 'dpo' lack \\['gradient_steps', 'pairs_used'"):
        verdict_inputs(["ppo", "dpo"], costs, scores)
    costs["dpo"] = [COSTS["dpo"]] * 2
    with pytest.raises(ValueError, match="3 reward model accuracies for 2 seeds"):
        verdict_inputs(["ppo", "dpo"], costs, scores, rm_accuracy=[0.7] * 3)
    with pytest.raises(ValueError, match="no scores of the starting policy 'start'"):
        verdict_inputs(["ppo", "dpo"], costs, {arm: scores[arm] for arm in ("ppo", "dpo")})
    with pytest.raises(ValueError, match="no scores of arm 'dpo'"):
        verdict_inputs(["ppo", "dpo"], costs, {arm: scores[arm] for arm in (START, "ppo")})
    with pytest.raises(ValueError, match="different numbers of seeds: \\[1, 2\\]"):
        verdict_inputs(["ppo", "dpo"], costs, {**scores, "dpo": _scores({"dpo": 0.3}, 1)["dpo"]})


# ---------------------------------------------------------------------------------------------- 1. reward model


def test_reward_model_default_holds_with_its_numbers():
    row = _row(1, arms=("ppo", "grpo", "dpo"))
    assert row.verdict == HOLDS
    assert row.reason == (
        "DPO's implicit reward minus the reward model in held-out pair accuracy: -0.020 over 2 seeds,"
        " all above -0.05 (non-inferior)."
    )
    assert row.measured == {
        "PPO-RLHF": "reward model: held-out pair accuracy 0.700 (2 seeds); trained in 1m30s, 40 gradient steps",
        "GRPO": "the same reward model as PPO-RLHF",
        "DPO": "implicit reward: held-out pair accuracy 0.680 (2 seeds)",
    }


@pytest.mark.parametrize(
    ("dpo", "verdict"),
    [
        ((0.651, 0.651), HOLDS),  # 0.049 worse: just inside the margin
        ((0.649, 0.649), DOES_NOT_HOLD),  # 0.051 worse: just outside
        ((0.70, 0.702), HOLDS),  # [-0.012, +0.014]: an interval, above -0.05
        ((0.68, 0.62), INCONCLUSIVE),  # -0.05 [-0.43, +0.33]: straddles the margin
        ((0.60, 0.599), DOES_NOT_HOLD),  # -0.1005 [-0.107, -0.094]: an interval, all below -0.05
    ],
)
def test_reward_model_non_inferiority(dpo, verdict):
    assert _row(1, rm=(0.70, 0.70), dpo=dpo).verdict == verdict


def test_reward_model_interval_in_the_reason():
    row = _row(1, rm=(0.70, 0.70), dpo=(0.68, 0.62))
    assert row.reason == (
        "DPO's implicit reward minus the reward model in held-out pair accuracy: -0.050 [-0.431, +0.331]"
        " over 2 seeds, which straddles the margin -0.05."
    )


def test_one_seed_is_inconclusive_even_when_the_point_is_decisive():
    row = _row(1, n_seeds=1, rm=(0.70,), dpo=(0.90,))
    assert row.verdict == INCONCLUSIVE
    assert row.reason == (
        "DPO's implicit reward minus the reward model in held-out pair accuracy: +0.200 from one seed,"
        " a point with no interval to test a margin of 0.05."
    )


def test_an_unmeasured_accuracy_is_inconclusive():
    assert _row(1, rm=()).reason == "the held-out pair accuracy of the reward model was not measured."
    row = _row(1, rm=(0.7, None), dpo=())
    assert row.verdict == INCONCLUSIVE
    assert row.reason == "the held-out pair accuracy of the reward model and DPO was not measured."
    assert row.measured["DPO"] == "implicit reward: held-out pair accuracy not measured"


# held-out pairs: 4 prompts of 2 pairs each (pairs 2g and 2g + 1 are prompt g's), 2 seeds
PAIR_PROMPTS = tuple(f"prompt {i // 2}" for i in range(8))


def _pairs(rm_wrong=(), dpo_wrong=(), n_seeds=2) -> HeldOutPairs:
    """Every pair ranked right in every seed except the pair numbers in ``rm_wrong`` / ``dpo_wrong``."""
    outcome = [[0.0 if i in wrong else 1.0 for i in range(8)] for wrong in (rm_wrong, dpo_wrong)]
    return HeldOutPairs(PAIR_PROMPTS, np.array([outcome[0]] * n_seeds), np.array([outcome[1]] * n_seeds))


def _pair_row(pairs: HeldOutPairs):
    n_seeds = pairs.rm.shape[0]
    rm, dpo = tuple(pairs.rm.mean(axis=1)), tuple(pairs.dpo.mean(axis=1))
    per_seed = {arm: [dict(COSTS[arm])] * n_seeds for arm in ("ppo", "dpo")}
    scores = _scores({"ppo": GAINS["ppo"], "dpo": GAINS["dpo"]}, n_seeds)
    return verdict_rows(verdict_inputs(["ppo", "dpo"], per_seed, scores, rm, dpo, pairs))[0]


def test_pairs_grouped_by_prompt_widen_what_the_seeds_alone_call_decisive():
    """DPO misses both pairs of prompt 0 in both seeds: -0.25 in every seed, so over seeds alone a point below the
    margin (does not hold). Over prompts it is one prompt of four: the (2, 4) matrix is [-1, 0, 0, 0] in each seed,
    prompt variance 0.25 / 4, 3 degrees of freedom: -0.25 -/+ 3.182 x 0.25, cut to [-1, 1]."""
    seeds_alone = _row(1, rm=(1.0, 1.0), dpo=(0.75, 0.75))
    assert seeds_alone.verdict == DOES_NOT_HOLD
    row = _pair_row(_pairs(dpo_wrong=(0, 1)))
    half = stats.t.ppf(0.975, 3) * 0.25
    assert row.evidence["accuracy_difference"] == pytest.approx({"mean": -0.25, "low": -1.0, "high": -0.25 + half})
    assert row.verdict == INCONCLUSIVE
    assert row.reason == (
        "DPO's implicit reward minus the reward model in held-out pair accuracy: -0.250 [-1.000, +0.546] over 2 seeds"
        " and 4 held-out prompts (8 pairs), which straddles the margin -0.05."
    )
    assert row.measured["PPO-RLHF"].startswith("reward model: held-out pair accuracy 1.000 (2 seeds x prompts);")
    # 0.75 -/+ 0.796, cut to [0, 1]
    assert row.measured["DPO"] == "implicit reward: held-out pair accuracy 0.750 [0.000, 1.000] (2 seeds x prompts)"


def test_pairs_ranked_alike_hold():
    row = _pair_row(_pairs(rm_wrong=(3,), dpo_wrong=(3,)))
    assert row.verdict == HOLDS
    assert row.reason == (
        "DPO's implicit reward minus the reward model in held-out pair accuracy: +0.000 over 2 seeds and 4 held-out"
        " prompts (8 pairs), all above -0.05 (non-inferior)."
    )


def test_one_seed_of_pairs_is_inconclusive_with_its_prompt_interval():
    row = _pair_row(_pairs(dpo_wrong=(0, 1), n_seeds=1))
    assert row.verdict == INCONCLUSIVE
    assert row.reason == (
        "DPO's implicit reward minus the reward model in held-out pair accuracy: -0.250 [-1.000, +0.546] over 1 seed"
        " and 4 held-out prompts (8 pairs): from one seed, its interval holds the prompts' variance, not the"
        " seed-to-seed one."
    )
    assert row.measured["DPO"].endswith(" (1 seed x prompts)")


def test_pairs_beside_an_unmeasured_accuracy_are_set_aside():
    """A seed whose final accuracy was not finite (read as None) beside its eval_pairs.jsonl: row 1 says what was
    not measured, as without the pairs, instead of refusing the pairs' shape and losing the race's report."""
    scores, costs = _scores({"ppo": 0.2, "dpo": 0.3}, 2), {arm: [COSTS[arm]] * 2 for arm in ("ppo", "dpo")}
    inputs = verdict_inputs(["ppo", "dpo"], costs, scores, (0.7, None), (1, 1), _pairs())
    row = verdict_rows(inputs)[0]
    assert inputs.pairs is None and row.verdict == INCONCLUSIVE
    assert row.reason == "the held-out pair accuracy of the reward model was not measured."


def test_pair_outcomes_are_checked():
    scores, costs = _scores({"ppo": 0.2, "dpo": 0.3}, 2), {arm: [COSTS[arm]] * 2 for arm in ("ppo", "dpo")}
    good = _pairs()
    with pytest.raises(ValueError, match=r"held-out pair outcomes \(1, 8\), \(2, 8\); expected \(2, 8\)"):
        verdict_inputs(["ppo", "dpo"], costs, scores, (1, 1), (1, 1), HeldOutPairs(PAIR_PROMPTS, good.rm[:1], good.dpo))
    with pytest.raises(ValueError, match="a held-out pair outcome is not 0 or 1"):
        verdict_inputs(["ppo", "dpo"], costs, scores, (1, 1), (1, 1), HeldOutPairs(PAIR_PROMPTS, good.rm / 2, good.dpo))
    with pytest.raises(ValueError, match="fewer than 2 prompts; an interval needs 2"):
        verdict_inputs(["ppo", "dpo"], costs, scores, (1, 1), (1, 1), HeldOutPairs(("p",) * 8, good.rm, good.dpo))


def _eval_pairs(run, correct, prompts=PAIR_PROMPTS):
    run.mkdir(parents=True)
    rows = [
        {"pair": i, "prompt": p, "margin": 1.0 if c else -1.0, "correct": c}
        for i, (p, c) in enumerate(zip(prompts, correct))
    ]
    (run / "eval_pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return run


def test_heldout_pairs_reads_each_seed_s_runs(tmp_path):
    rm = [_eval_pairs(tmp_path / f"rm{s}", [True] * 7 + [s == 0]) for s in range(2)]
    dpo = [_eval_pairs(tmp_path / f"dpo{s}", [False, True] * 4) for s in range(2)]
    got = heldout_pairs(rm, dpo)
    assert got.prompts == PAIR_PROMPTS
    assert got.rm.tolist() == [[1.0] * 8, [1.0] * 7 + [0.0]] and got.dpo.tolist() == [[0.0, 1.0] * 4] * 2


def test_heldout_pairs_is_none_where_the_runs_do_not_line_up(tmp_path):
    """Row 1 then falls back to the interval over seeds: a run without the file (an older prefalign), runs that held
    out other pairs, or pairs of one prompt."""
    rm = [_eval_pairs(tmp_path / "rm", [True] * 8)]
    assert heldout_pairs(rm, [tmp_path / "missing"]) is None
    assert heldout_pairs(rm, [_eval_pairs(tmp_path / "other", [True] * 8, prompts=("x",) * 8)]) is None
    assert heldout_pairs(rm, [_eval_pairs(tmp_path / "fewer", [True] * 7)]) is None
    one = [_eval_pairs(tmp_path / f"one{i}", [True] * 8, prompts=("x",) * 8) for i in range(2)]
    assert heldout_pairs(one[:1], one[1:]) is None
    assert heldout_pairs(rm, [_eval_pairs(tmp_path / "same", [False] * 8)]) is not None


# ---------------------------------------------------------------------------------------------- 2. policy update


def test_policy_update_holds_when_only_the_online_arms_sample():
    row = _row(2, arms=("ppo", "rloo", "dpo"))
    assert row.verdict == HOLDS
    assert row.reason == (
        "tokens generated while training (mean over seeds): PPO-RLHF 50.0k, RLOO 60.0k; DPO 0 beyond the shared pairs."
    )
    assert row.measured["DPO"] == "0 tokens generated while training; 50 gradient steps"


@pytest.mark.parametrize(
    ("arms", "costs", "ending"),
    [
        (("ppo", "dpo"), {("dpo", "tokens_generated_training"): [0, 10]}, "(DPO generated tokens beyond the pairs)."),
        (("ppo", "dpo"), {("ppo", "tokens_generated_training"): [50_000, 0]}, "sampled nothing in some seed)."),
        (("ppo", "grpo", "dpo"), {("grpo", "tokens_generated_training"): [0, 0]}, "sampled nothing in some seed)."),
    ],
)
def test_policy_update_does_not_hold_otherwise(arms, costs, ending):
    row = _row(2, arms=arms, costs=costs)
    assert row.verdict == DOES_NOT_HOLD
    assert row.reason.endswith(ending)


# ---------------------------------------------------------------------------------------------- 3. loss

STRADDLES = [1.0, -1.0, 1.0, -1.0]
"""A gain of 0 on average whose prompts disagree: its interval includes 0."""


@pytest.mark.parametrize(
    ("gains", "verdict", "ending"),
    [
        ({}, HOLDS, ": both above 0."),
        ({"dpo": -0.1}, DOES_NOT_HOLD, ": DPO lowered the gold score."),
        ({"ppo": -0.1, "dpo": -0.2}, DOES_NOT_HOLD, ": PPO-RLHF and DPO lowered the gold score."),
        ({"ppo": STRADDLES}, INCONCLUSIVE, ": an interval includes 0."),
        ({"ppo": STRADDLES, "dpo": -0.1}, DOES_NOT_HOLD, ": DPO lowered the gold score."),
    ],
)
def test_loss(gains, verdict, ending):
    row = _row(3, gains=gains)
    assert (row.verdict, row.reason.endswith(ending)) == (verdict, True)


def test_loss_reason_and_cells():
    row = _row(3, arms=("ppo", "grpo", "dpo"), gains={"dpo": -0.1})
    assert row.reason == "gold gain over the start: PPO-RLHF +0.200, DPO -0.100: DPO lowered the gold score."
    assert row.measured == {
        "PPO-RLHF": "gold 0.200 (+0.200 over the start); KL 0.500 nats",
        "GRPO": "gold 0.250 (+0.250 over the start); KL 0.500 nats",
        "DPO": "gold -0.100 (-0.100 over the start); KL 0.500 nats",
    }


# ---------------------------------------------------------------------------------------------- 4. cost


def test_cost_holds_with_its_numbers():
    row = _row(4)
    assert row.verdict == HOLDS
    assert row.reason == (
        "cost holds (PPO-RLHF minus DPO: wall +8m00s, peak memory +2.00 GiB); sample efficiency holds"
        " (DPO minus PPO-RLHF in gold gain per preference pair: +0.0001)."
    )
    assert row.measured["PPO-RLHF"] == (
        "wall 10m00s, peak 4.00 GiB, 100 steps, 50.0k tokens, 1,000 pairs;"
        " gold gain per pair +0.0002, per step +0.002, per minute +0.02"
    )


@pytest.mark.parametrize(
    ("costs", "gains", "verdict"),
    [
        ({("ppo", "wall_seconds"): [100.0, 100.0]}, {}, DOES_NOT_HOLD),  # PPO-RLHF faster
        ({("ppo", "peak_rss_mb"): [1024.0, 1024.0]}, {}, DOES_NOT_HOLD),  # PPO-RLHF smaller
        ({}, {"dpo": 0.1}, DOES_NOT_HOLD),  # DPO less gain from the same pairs
        ({("ppo", "wall_seconds"): [600.0, 100.0]}, {}, INCONCLUSIVE),  # wall difference +480 s and -20 s
        ({}, {"dpo": [0.8, -0.4, 0.8, -0.4]}, INCONCLUSIVE),  # DPO's gain per pair straddles PPO-RLHF's
        ({("ppo", "wall_seconds"): [600.0, 100.0]}, {"dpo": 0.1}, DOES_NOT_HOLD),  # one part reversed
        ({("ppo", "pairs_used"): [0, 0]}, {}, INCONCLUSIVE),  # no pair count: efficiency not measured
    ],
)
def test_cost_rules(costs, gains, verdict):
    assert _row(4, costs=costs, gains=gains).verdict == verdict


def test_one_seed_costs_are_inconclusive_even_when_the_points_are_decisive():
    row = _row(4, n_seeds=1)
    assert row.verdict == INCONCLUSIVE
    assert row.reason == (
        "cost inconclusive at this budget (PPO-RLHF minus DPO: wall +8m00s, peak memory +2.00 GiB from one seed,"
        " points with no interval); sample efficiency inconclusive at this budget (DPO minus PPO-RLHF in gold gain"
        " per preference pair: +0.0001 from one seed: its interval holds the prompts' variance, not the"
        " seed-to-seed one)."
    )
    # reversed points too: one seed decides neither part
    assert _row(4, n_seeds=1, costs={("ppo", "wall_seconds"): [100.0]}, gains={"dpo": 0.1}).verdict == INCONCLUSIVE


@pytest.mark.parametrize("gains", [{}, {"dpo": -0.1}], ids=["both-above", "dpo-below"])
def test_one_seed_loss_is_inconclusive_even_when_the_intervals_are_decisive(gains):
    row = _row(3, n_seeds=1, gains=gains)
    dpo = "+0.300" if not gains else "-0.100"
    assert (row.verdict, row.reason) == (
        INCONCLUSIVE,
        f"gold gain over the start: PPO-RLHF +0.200, DPO {dpo} from one seed: its interval holds the prompts'"
        " variance, not the seed-to-seed one.",
    )


def test_a_gpu_race_compares_gpu_memory():
    # host RSS as in the defaults (PPO-RLHF 2 GiB above DPO), but on the GPU PPO-RLHF held less: the GPU decides
    gpu = {("ppo", "peak_gpu_mb"): [1024.0, 1024.0], ("dpo", "peak_gpu_mb"): [3072.0, 3072.0]}
    row = _row(4, costs=gpu)
    assert row.verdict == DOES_NOT_HOLD
    assert "PPO-RLHF minus DPO: wall +8m00s, peak GPU memory -2.00 GiB" in row.reason
    assert row.measured["PPO-RLHF"].startswith("wall 10m00s, peak 4.00 GiB (GPU 1.00 GiB), 100 steps")
    assert "peak_gpu_mb_difference" in row.evidence
    # a CPU race (no GPU peak in some seed): host RSS, as before
    assert "peak memory +2.00 GiB" in _row(4, costs={("ppo", "peak_gpu_mb"): [1024.0, 1024.0]}).reason


def test_an_interval_of_the_cost_difference_is_shown():
    reason = _row(4, costs={("ppo", "wall_seconds"): [600.0, 100.0]}).reason
    # differences +480 s and -20 s: 230 s -/+ t(0.975, 1) 12.706 x 353.6 / sqrt(2) = 230 -/+ 3176.6 s
    assert reason.startswith("cost inconclusive at this budget (PPO-RLHF minus DPO: wall +3m50s [-49m07s, +56m47s],")


# ---------------------------------------------------------------------------------------------- renderers


def test_every_verdict_is_one_of_three():
    assert VERDICTS == ("holds", "does not hold", "inconclusive at this budget")


def _hand_rows():
    return [
        VerdictRow("Reward model", "a model", "none", {"PPO-RLHF": "acc 0.7 | 0.8", "DPO": "acc 0.6"}, HOLDS, "why."),
        VerdictRow("Loss", "policy gradient", "a preference loss", {"PPO-RLHF": "+0.1", "DPO": "-0.1"},
                   DOES_NOT_HOLD, "DPO lowered the gold score by a good deal."),
    ]  # fmt: skip


def test_markdown_is_one_table_row_per_claim():
    assert verdict_markdown(_hand_rows()) == (
        "| Claim | PPO-RLHF claim | DPO claim | PPO-RLHF measured | DPO measured | Verdict |\n"
        "|---|---|---|---|---|---|\n"
        "| 1. Reward model | a model | none | acc 0.7 \\| 0.8 | acc 0.6 | **holds**: why. |\n"
        "| 2. Loss | policy gradient | a preference loss | +0.1 | -0.1 | **does not hold**: DPO lowered the gold score"
        " by a good deal. |\n"
    )


def test_text_is_one_block_per_claim_wrapped():
    assert verdict_text(_hand_rows(), width=44).splitlines() == [
        "1. Reward model - holds: why.",
        "   PPO-RLHF claims:   a model",
        "   DPO claims:        none",
        "   PPO-RLHF measured: acc 0.7 | 0.8",
        "   DPO measured:      acc 0.6",
        "",
        "2. Loss - does not hold: DPO lowered the",
        "   gold score by a good deal.",
        "   PPO-RLHF claims:   policy gradient",
        "   DPO claims:        a preference loss",
        "   PPO-RLHF measured: +0.1",
        "   DPO measured:      -0.1",
    ]


def test_no_rows_render_as_nothing():
    assert (verdict_markdown([]), verdict_text([])) == ("", "")


def test_the_race_text_opens_each_block_with_its_verdict():
    rows = _rows(rm=(), costs={("dpo", "tokens_generated_training"): [0, 10]})
    heads = [line for line in verdict_text(rows, width=400).splitlines() if line[:1].isdigit()]
    assert heads == [
        "1. Reward model - inconclusive at this budget: the held-out pair accuracy of the reward model was not"
        " measured.",
        "2. Policy update - does not hold: tokens generated while training (mean over seeds): PPO-RLHF 50.0k; DPO 5"
        " (DPO generated tokens beyond the pairs).",
        "3. Loss - holds: gold gain over the start: PPO-RLHF +0.200, DPO +0.300: both above 0.",
        "4. Compute cost and sample efficiency - holds: cost holds (PPO-RLHF minus DPO: wall +8m00s, peak memory"
        " +2.00 GiB); sample efficiency holds (DPO minus PPO-RLHF in gold gain per preference pair: +0.0001).",
    ]
