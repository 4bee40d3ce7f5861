"""The benchmark harness's pure helpers (bench/report.py, bench/common.py): aggregation, ratios, verdicts,
tables. Nothing here installs or imports TRL, and nothing loads a model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ is a folder of the repo, not installed

from bench import report
from bench.common import StepClock, pair_tokens_per_step, real_response_tokens

GIB_KIB = 1024 * 1024


def run(
    side="prefalign",
    workload="dpo",
    precision="fp32",
    steps=(9.0, 4.0, 6.0),
    tokens=(100, 100, 100),
    rss_gib=2.0,
    losses=(0.6931,),
    items=8,
    extra=None,
    cpu=10.0,
    wall=20.0,
):
    return {
        "side": side,
        "workload": workload,
        "precision": precision,
        "step_seconds": list(steps),
        "tokens": list(tokens),
        "items_per_step": items,
        "peak_rss_kib": rss_gib * GIB_KIB,
        "losses": list(losses),
        "extra": extra or {},
        "cpu_seconds": cpu,
        "wall": wall,
    }


def test_timed_drops_warmup_but_never_everything():
    assert report.timed([5.0, 1.0, 2.0], 1) == [1.0, 2.0]
    assert report.timed([5.0], 1) == [5.0]  # too short to drop: keep what there is


def test_figures_pool_timed_steps_across_repeats():
    f = report.figures([run(steps=(9.0, 4.0, 6.0), rss_gib=2.0), run(steps=(8.0, 5.0, 7.0), rss_gib=3.0)], warmup=1)
    assert (f.step_median, f.step_min, f.step_max) == (5.5, 4.0, 7.0)
    assert f.items_per_s == pytest.approx(8 / 5.5)
    assert f.rss_gib == pytest.approx(2.5) and f.rss_max_gib == pytest.approx(3.0)
    assert f.tokens_per_s == pytest.approx(statistics_median([200 / 10, 200 / 12]))
    assert f.cpu_share == pytest.approx(0.5)
    assert f.runs == 2


def statistics_median(xs):
    import statistics

    return statistics.median(xs)


def test_figures_refuses_no_runs():
    with pytest.raises(ValueError):
        report.figures([], 1)


def test_compare_ratios_and_verdicts():
    ours = report.figures([run(steps=(1, 2.0, 2.0), rss_gib=1.0)], 1)
    base = report.figures([run(side="trl", steps=(1, 4.0, 4.0), rss_gib=4.0)], 1)
    c = report.compare("dpo", "fp32", ours, base)
    assert c.speed_ratio == pytest.approx(2.0)  # twice the pairs/s
    assert c.rss_ratio == pytest.approx(0.25)
    assert c.speed_met and c.rss_met
    slow = report.compare("dpo", "fp32", base, ours)
    assert not slow.speed_met and not slow.rss_met


def test_ppo_targets_follow_the_precision_and_the_header_names_each_warmup():
    from bench.__main__ import untimed

    # 1.6x TRL's episodes/s at 0.75x its memory: meets fp32's 1.5x, misses bf16's 2x; <= 0.8 memory in both
    ours = report.figures([run(workload="ppo", steps=(9, 9, 5.0, 5.0), rss_gib=3.0)], 2)
    base = report.figures([run(side="trl", workload="ppo", steps=(9, 9, 8.0, 8.0), rss_gib=4.0)], 2)
    fp32, bf16 = (report.compare("ppo", p, ours, base) for p in ("fp32", "bf16"))
    assert (fp32.speed_target, bf16.speed_target) == (1.5, 2.0)
    assert fp32.speed_met and not bf16.speed_met
    assert fp32.rss_target == 0.8 and fp32.rss_met
    meta = {"steps": {"dpo": 2, "reward": 3, "ppo": 4}, "warmup": {"dpo": 1, "reward": 1, "ppo": 2, "grpo": 1}}
    assert untimed(meta) == "1; ppo 2"


def test_generation_speed_is_tokens_per_second_and_has_no_rss_target():
    ours = report.figures([run(workload="rollout8", steps=(1, 1.0), tokens=(0, 300))], 1)
    base = report.figures([run(side="hf-generate", workload="rollout8", steps=(1, 1.0), tokens=(0, 100))], 1)
    c = report.compare("rollout8", "bf16", ours, base)
    assert c.speed_ratio == pytest.approx(3.0) and c.speed_met
    assert c.rss_met is None and c.same_math is None


def test_same_math_checked_in_fp32_only_with_tolerance():
    def pair(precision, loss_b, logp_b):
        ours = report.figures(
            [run(losses=(0.5,), extra={"first_logps_chosen": -10.0, "first_logps_rejected": -9.0})], 1
        )
        base = report.figures(
            [run(side="trl", losses=(loss_b,), extra={"first_logps_chosen": logp_b, "first_logps_rejected": -9.0})], 1
        )
        return report.compare("dpo", precision, ours, base)

    assert pair("fp32", 0.5 + 5e-5, -10.0).same_math is True
    assert pair("fp32", 0.5 + 2e-4, -10.0).same_math is False  # loss off
    assert pair("fp32", 0.5, -10.001).same_math is False  # log-probs off
    assert pair("bf16", 0.7, -12.0).same_math is None  # not judged in bf16
    c = pair("fp32", 0.5, -10.0)
    assert c.loss_diff == 0.0 and c.logps_diff == 0.0


def test_comparisons_pair_sides_per_workload_and_skip_one_sided():
    runs = [
        run(),
        run(side="trl"),
        run(workload="reward", precision="bf16"),  # reward has no TRL run
        run(workload="rollout16", side="prefalign"),
        run(workload="rollout16", side="hf-generate"),
    ]
    comps = report.comparisons(runs, {"dpo": 1})
    assert [(c.workload, c.precision) for c in comps] == [("dpo", "fp32"), ("rollout16", "fp32")]


def test_grpo_same_math_is_checked_on_the_replay_run_only():
    math = {"first_logps": [-2.0], "first_grad_norm": 3.0}
    ours = run(workload="grpo", losses=(0.0,), extra=math)
    trl = run(workload="grpo", side="trl", steps=(9.0, 6.0), losses=(0.3,), extra={"first_logps": [-2.5]})

    def replay(grad_norm, logp=-2.0 + 1e-5):
        return {
            **run(
                workload="grpo",
                side="trl",
                steps=(1.0, 1.0),
                losses=(5e-5,),
                extra={"first_logps": [logp], "first_grad_norm": grad_norm},
            ),
            "replay": True,
        }

    [alone] = report.comparisons([ours, trl], {"grpo": 1})
    assert alone.same_math is None and alone.loss_diff is None  # different completions: nothing to compare
    [c] = report.comparisons([ours, trl, replay(3.0003)], {"grpo": 1})
    assert c.base.step_median == 6.0 and c.base.runs == 1  # the replay is not a timed run
    assert c.loss_diff == pytest.approx(5e-5) and c.logps_diff == pytest.approx(1e-5)
    assert c.grad_norm_diff == pytest.approx(0.0003 / 3.0003) and c.same_math is True
    [off] = report.comparisons([ours, trl, replay(3.01)], {"grpo": 1})
    assert off.same_math is False  # the gradient norm is 0.3% off
    table = report.main_table([c], params=100, peaks={"fp32": 1.0, "bf16": 1.0})
    assert "‖g‖ 1.0e-04 rel (met)" in table and "episodes/s" in table


def test_mfu_uses_six_for_training_two_for_generation():
    f = report.figures([run(steps=(1, 1.0), tokens=(0, 1000))], 1)
    assert report.mfu("dpo", f, params=100, peak_gflops=1e-3) == pytest.approx(6 * 100 * 1000 / 1e6)
    assert report.mfu("rollout8", f, params=100, peak_gflops=1e-3) == pytest.approx(2 * 100 * 1000 / 1e6)


def test_main_table_has_a_row_per_comparison_with_verdicts():
    ours = report.figures([run(steps=(1, 2.0), rss_gib=1.0)], 1)
    base = report.figures([run(side="trl", steps=(1, 3.0), rss_gib=4.0)], 1)
    table = report.main_table(
        [report.compare("dpo", "fp32", ours, base)], params=134_515_008, peaks={"fp32": 200.0, "bf16": 800.0}
    )
    lines = table.splitlines()
    assert len(lines) == 3 and lines[0].startswith("| workload")
    row = lines[2]
    assert "| dpo | fp32 |" in row
    assert "**1.50** (≥ 1.6: **missed**)" in row
    assert "**0.25** (≤ 0.5: met)" in row
    assert row.count("|") == lines[0].count("|")


def test_ppo_split_table_fills_trl_logprobs_with_the_rest():
    split = {"generation": [9, 2.0], "scoring": [9, 1.0], "update": [9, 3.0]}
    runs = [
        run(workload="ppo", side="trl", steps=(30, 10.0), extra={"split": split}),
        run(workload="ppo", steps=(30, 8.0), extra={"split": {**split, "logprobs": [9, 1.5]}}),
    ]
    table = report.ppo_split_table(runs, warmup=1)
    assert "| fp32 | trl | 2.00 | 4.00 | 1.00 | 3.00 | 10.00 |" in table
    assert "| fp32 | prefalign | 2.00 | 1.50 | 1.00 | 3.00 | 8.00 |" in table
    grpo = [{**r, "workload": "grpo"} for r in runs]
    assert report.ppo_split_table(runs + grpo, warmup=1, workload="grpo").count("| fp32 |") == 2


def test_pair_tokens_per_step_counts_both_rows_of_each_pair():
    pairs = [{"ids": [[1, 2], [3], [4, 5, 6]]}, {"ids": [[1], [2], [3]]}, {"ids": [[9] * 4, [1], [1]]}]
    # pair 1: (2+1) + (2+3) = 8; pair 2: 2 + 2 = 4; pair 3: 5 + 5 = 10
    assert pair_tokens_per_step(pairs, batch=2, steps=2) == [12, 10]


def test_real_response_tokens_stop_at_first_eos():
    import torch

    ids = torch.tensor([[5, 2, 7, 7], [5, 6, 7, 8], [2, 2, 2, 2]])
    assert real_response_tokens(ids, [2]) == 2 + 4 + 1


def test_step_clock_differences():
    clock = StepClock()
    clock.t0 = 1.0
    clock.marks = [3.0, 4.5, 7.0]
    assert clock.seconds() == [2.0, 1.5, 2.5]


def test_critic_free_reads_the_race_command_and_times_iterations_after_the_first(tmp_path):
    from bench import critic_free

    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "seed-0_grpo.log").write_text(
        "$ /v/bin/python3 -m prefalign rl --model m --max-steps 32 --estimator grpo --heldout-prompts h.jsonl "
        "--heldout-judge arithmetic --heldout-every 4 --heldout-limit 32 --output /r/seed-0/grpo "
        "--overwrite\nrl: 100%\n"
    )
    assert critic_free.stage_command(tmp_path, "grpo") == ["rl", "--model", "m", "--estimator", "grpo"]
    with pytest.raises(SystemExit, match=r"seed-0_ppo.log: no such stage log"):
        critic_free.stage_command(tmp_path, "ppo")
    metrics = [
        {"wall_seconds": 4.0, "heldout/gold": 0.5, "time/heldout": 4.0},  # an evaluation's row: not an iteration
        {"wall_seconds": 9.0, "episodes": 16, "time/update": 5.0},
        {"wall_seconds": 12.0, "episodes": 32, "time/update": 2.0},
        {"wall_seconds": 16.0, "episodes": 48, "time/update": 3.0},
        {"wall_seconds": 18.0, "episodes": 64, "time/update": 1.0},
    ]
    fig = critic_free.iteration_figures(metrics)
    assert fig == {"s_per_iteration": 3.0, "episodes_per_iteration": 16, "s_per_episode": 3.0 / 16, "time/update": 2.0}
