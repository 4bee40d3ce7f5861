"""The arm table of `prefalign compare`: the stage plan it builds (the same command lines as before it was a
table), the SimPO and ORPO arms, costs charged by stage, and that one entry is all a new arm needs."""

import json
from pathlib import Path

import numpy as np
import pytest

from prefalign.cli._args import parse
from prefalign.compare import CompareConfig
from prefalign.compare.arms import ARMS, DEFAULT_ARMS, DPO_LIKE, Arm, arms_help, final_model
from prefalign.compare.plan import plan_stages
from prefalign.compare.stages import StageResult
from prefalign.compare.summary import mean_over_seeds, summarize
from prefalign.eval.report.tables import comparison_table, method_cells

GOLDEN = Path(__file__).with_name("compare_argv_golden.json")
OUT = Path("OUT")


@pytest.fixture(autouse=True)
def auto_precision_is_bf16(monkeypatch):
    """The golden command lines were recorded where --precision auto meant bf16 (sampling in bfloat16)."""
    from prefalign.compare import argv

    resolve_here = argv.sampler_dtype
    monkeypatch.setattr(
        argv, "sampler_dtype", lambda precision: resolve_here("bf16" if precision == "auto" else precision)
    )


def plan_of(*flags: str) -> list[list]:
    """``[name, command, argv]`` of every stage of ``prefalign compare FLAGS``, as the runner passes them."""
    cfg = parse(CompareConfig, [*flags, "--output", str(OUT)], prog="prefalign compare").resolved()
    plan = plan_stages(cfg, OUT, OUT / "prompts" / "train.jsonl", OUT / "prompts" / "heldout.jsonl")
    return [[stage.name, stage.command, [str(arg) for arg in stage.args]] for stage in plan]


def stage_args(plan: list[list], name: str) -> list[str]:
    return next(args for stage, _, args in plan if stage == name)


@pytest.mark.parametrize("scenario", sorted(json.loads(GOLDEN.read_text())["scenarios"]))
def test_plan_is_the_recorded_plan(scenario):
    """The default race (and --arms ppo dpo dpo_rf ppo_gt --seeds 2 --sweep, presets, budgets) runs exactly
    the command lines it ran before the arm table: the same numbers."""
    golden = json.loads(GOLDEN.read_text())["scenarios"][scenario]
    assert plan_of(*golden["flags"]) == golden["stages"]


def test_the_default_race_is_the_classic_table():
    """PPO-RLHF and DPO, three seeds each (reference-free DPO and the rest are one --arms away)."""
    assert DEFAULT_ARMS == ["ppo", "dpo"] == CompareConfig().arms and CompareConfig().resolved().seeds == 3
    assert list(ARMS) == ["ppo", "dpo", "dpo_rf", "ppo_gt", "simpo", "orpo", "grpo", "rloo", "grpo_gt"]


def test_simpo_and_orpo_run_dpo_with_their_loss_on_the_dpo_budget():
    plan = plan_of("--preset", "quick", "--arms", "dpo", "simpo", "orpo", "--dpo-lr", "3e-5", "--dpo-steps", "7")
    assert [(name, command) for name, command, _ in plan] == [
        ("pairs", "prefs"),
        ("seed-0/dpo", "dpo"),
        ("seed-0/simpo", "dpo"),
        ("seed-0/orpo", "dpo"),
        ("seed-0/eval", "eval"),
    ]
    budget = [
        "--model",
        "smollm2-135m",
        "--seed",
        "0",
        "--precision",
        "auto",
        "--data",
        "OUT/pairs/pairs.jsonl",
        "--eval-split",
        "0.1",
        "--eval-split-seed",
        "0",
        "--max-steps",
        "7",
        "--learning-rate",
        "3e-05",
        "--batch-size",
        "4",
        "--lr-scheduler",
        "constant",
        "--max-length",
        "256",
    ]
    assert stage_args(plan, "seed-0/dpo") == [*budget, "--beta", "0.1"]
    # no --beta / --simpo-gamma / --orpo-lambda: the loss's own defaults
    assert stage_args(plan, "seed-0/simpo") == [*budget, "--loss-type", "simpo"]
    assert stage_args(plan, "seed-0/orpo") == [*budget, "--loss-type", "orpo"]
    evaluation = stage_args(plan, "seed-0/eval")
    policies = evaluation[evaluation.index("--policies") + 1 : evaluation.index("--reference")]
    assert policies == [  # the starting policy is --reference, sampled once
        "dpo=OUT/seed-0/dpo/final",
        "simpo=OUT/seed-0/simpo/final",
        "orpo=OUT/seed-0/orpo/final",
    ]
    assert "--proxy" not in evaluation  # no arm trained a reward model


def test_a_sweep_only_retrains_arms_that_declare_one():
    plan = plan_of("--preset", "quick", "--arms", "simpo", "dpo_rf", "ppo_gt", "--sweep")
    assert [name for name, _, _ in plan] == ["pairs", "seed-0/dpo_rf", "seed-0/ppo_gt", "seed-0/simpo", "seed-0/eval"]
    plan = plan_of("--preset", "quick", "--arms", "orpo", "dpo", "--sweep", "--sweep-betas", "0.3")
    assert stage_args(plan, "seed-0/dpo@beta=0.3")[-2:] == ["--beta", "0.3"]


def test_the_reward_model_runs_once_per_seed_and_before_its_arm():
    plan = plan_of("--preset", "quick", "--arms", "dpo", "ppo", "--seeds", "2")
    names = [name for name, _, _ in plan]
    assert names == [
        "pairs",
        "seed-0/rm",
        "seed-0/ppo",
        "seed-0/dpo",
        "seed-0/eval",
        "seed-1/rm",
        "seed-1/ppo",
        "seed-1/dpo",
        "seed-1/eval",
    ]
    assert stage_args(plan, "seed-1/eval")[-2:] == ["--proxy", "OUT/seed-1/rm/final"]


def test_config_and_help_read_the_table():
    help_text = arms_help()
    assert all(f"{name}: " in help_text for name in ARMS)
    with pytest.raises(
        ValueError, match="--arms takes some of ppo, dpo, dpo_rf, ppo_gt, simpo, orpo, grpo, rloo, grpo_gt; got sft"
    ):
        CompareConfig(arms=["sft"])
    assert CompareConfig(arms=["simpo", "orpo"]).arms == ["simpo", "orpo"]
    # the evaluation names each arm's policy once: a repeated arm would fail only there, after every stage
    with pytest.raises(ValueError, match=r"^--arms names dpo, ppo twice; name each arm once$"):
        CompareConfig(arms=["ppo", "dpo", "ppo", "dpo"])
    with pytest.raises(ValueError, match=r"^--eval-prompts must be >= 2 \(the intervals vary over prompts\), got 1$"):
        CompareConfig(eval_prompts=1)


def test_a_repeated_prompt_is_refused_before_the_race(tmp_path):
    from prefalign.compare.runner import _prompts
    from prefalign.errors import UserError

    f = tmp_path / "heldout.txt"
    f.write_text("Great film\nBad\nGreat film\n")
    with pytest.raises(
        UserError, match=r"heldout.txt: prompt 3 repeats prompt 1 \('Great film'\); give each prompt once$"
    ):
        _prompts(str(f), "unused", 3, None)
    assert [row["prompt"] for row in _prompts(str(f), "unused", 2, None)] == ["Great film", "Bad"]  # only the first 2


def test_every_entry_is_complete():
    for name, arm in ARMS.items():
        assert arm.name == name and arm.label and arm.description and arm.reward_model and arm.loss
        assert arm.stages[-1].name == name and arm.stages[-1].charged_as == "policy"
        assert arm.family.update and arm.family.curve_metric
    assert len({arm.label for arm in ARMS.values()}) == len(ARMS)


def test_a_new_arm_is_one_entry(monkeypatch):
    """An entry added to the table is accepted by --arms, planned, evaluated and described in the report."""

    def hinge_args(inputs):
        return ["--data", inputs.pairs, "--loss-type", "hinge", "--seed", inputs.seed]

    arm = Arm(
        "dpo_hinge",
        "DPO (hinge)",
        "hinge loss",
        DPO_LIKE,
        hinge_args,
        reward_model="none: implicit",
        loss="max(0, 1 - beta h)",
    )
    monkeypatch.setitem(ARMS, arm.name, arm)
    plan = plan_of("--preset", "quick", "--arms", "dpo_hinge")
    assert plan[1] == [
        "seed-0/dpo_hinge",
        "dpo",
        ["--data", "OUT/pairs/pairs.jsonl", "--loss-type", "hinge", "--seed", "0"],
    ]
    assert "dpo_hinge=OUT/seed-0/dpo_hinge/final" in plan[2][2]
    cells = method_cells("dpo_hinge")
    assert cells["Reward model"] == ["none: implicit"] and cells["Loss"] == ["max(0, 1 - beta h)"]
    assert cells["Policy update"] == ["offline: supervised on fixed pairs"]


# ---------------------------------------------------------------------------------------------- summary


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _fake_race(out: Path, cfg: CompareConfig) -> dict[str, StageResult]:
    """The files a finished one-seed race leaves behind, with made-up numbers; returns the stage results."""
    (out / "pairs").mkdir(parents=True)
    (out / "pairs" / "metrics.json").write_text(json.dumps({"new_tokens": 1000}))
    results = {"pairs": StageResult("pairs", str(out / "pairs"), 60.0, 2000.0)}
    seed_dir = out / "seed-0"
    # the starting policy is the evaluation's reference
    policies = {name: {"gold_mean": 0.1, "kl_mean": 1.0, "win_rate": 0.6, "n": 4} for name in ["reference", *cfg.arms]}
    (seed_dir / "eval").mkdir(parents=True)
    (seed_dir / "eval" / "eval.json").write_text(json.dumps({"policies": policies}))
    _write_jsonl(
        seed_dir / "eval" / "completions.jsonl",
        [
            {"policy": name, "prompt": prompt, "sample": 0, "completion": f" {name}", "gold": 0.5, "kl": 1.0}
            for name in policies
            for prompt in ("p", "q")
        ],
    )
    for index, stage in enumerate(["rm", *cfg.arms]):
        run = final_model(seed_dir, stage).parent
        rows = [
            {
                "step": 1,
                "wall_seconds": 1.0,
                "objective/scores": 0.5,
                "val/response_length": 10.0,
                "rewards/margins": 0.25,
            },
            {
                "step": 2,
                "wall_seconds": 2.0,
                "val/response_length": 0.0,
                "eval/accuracy": 0.75,
                "eval/rewards/accuracies": 0.625,  # a DPO-like run's implicit reward on the held-out pairs
            },
            # evaluations while training: a loop's held-out pairs, an online run's curve point
            {"step": 2, "eval/seconds": 1.5, "time/heldout": 0.25},
        ]
        _write_jsonl(run / "metrics.jsonl", rows)
        info = {"train_examples": 100, "global_batch": cfg.batch_size}  # a dataset trainer's run.json
        # an online trainer's: its completions per iteration (PPO-RLHF: the rollout batch)
        info |= {"episodes": cfg.ppo_steps * cfg.ppo_rollout_batch, "total_iterations": cfg.ppo_steps}
        (run / "run.json").write_text(json.dumps(info))
        results[f"seed-0/{stage}"] = StageResult(f"seed-0/{stage}", str(run), 10.0 * (index + 1), 3000.0 + index)
    return results


def test_costs_are_charged_by_stage(tmp_path):
    cfg = CompareConfig(preset="quick", arms=["ppo", "simpo", "ppo_gt"]).resolved()
    summary = summarize(cfg, tmp_path, _fake_race(tmp_path, cfg))
    by_name = {arm["name"]: arm for arm in summary["arms"]}
    assert by_name["ppo"]["vs_start"]["gold"] == {"mean": 0.0, "low": 0.0, "high": 0.0}  # every gold 0.5
    assert summary["verdict"] == []  # no DPO arm: the table compares PPO-RLHF with DPO
    assert [arm["label"] for arm in summary["arms"]] == [
        "Starting policy",
        "PPO-RLHF",
        "SimPO",
        "PPO on the gold judge",
    ]
    ppo, simpo, ppo_gt = by_name["ppo"]["cost"], by_name["simpo"]["cost"], by_name["ppo_gt"]["cost"]
    # each stage's 1.75 s of evaluation taken out of its wall time, reported apart
    assert ppo["wall_seconds"] == {
        "pairs": 60.0,
        "reward_model": 10.0 - 1.75,
        "policy": 20.0 - 1.75,
        "total": 60.0 + 8.25 + 18.25,
        "evaluation": 3.5,
    }
    assert ppo["gradient_steps"] == cfg.rm_steps + cfg.ppo_steps * cfg.ppo_epochs
    assert ppo["pairs_used"] == min(100, cfg.rm_steps * cfg.batch_size) and ppo["rm_heldout_accuracy"] == 0.75
    assert ppo["tokens_generated"] == 1000 + 10 * cfg.ppo_rollout_batch  # pairs + one rollout batch of 10 tokens
    assert simpo["wall_seconds"] == {
        "pairs": 60.0,
        "reward_model": 0.0,
        "policy": 30.0 - 1.75,
        "total": 88.25,
        "evaluation": 1.75,
    }
    assert simpo["gradient_steps"] == cfg.dpo_steps and simpo["pairs_used"] == cfg.dpo_steps * cfg.batch_size
    assert simpo["tokens_generated"] == 1000 and simpo["rm_heldout_accuracy"] is None
    assert simpo["implicit_reward_heldout_accuracy"] == 0.625 and ppo["implicit_reward_heldout_accuracy"] is None
    assert ppo_gt["pairs_used"] == 0 and ppo_gt["wall_seconds"]["pairs"] == 0.0 and ppo_gt["peak_rss_mb"] == 3003.0
    assert by_name["simpo"]["curve_metric"] == "rewards/margins" and by_name["simpo"]["curve"][0]["metric"] == 0.25
    assert by_name["ppo"]["curve_metric"] == "objective/scores"
    assert summary["samples"][0]["completions"]["simpo"] == " simpo"
    # seeds' costs averaged leaf by leaf; a number some seeds lack is None, not the others' mean
    assert mean_over_seeds([{"a": 1.0, "b": {"c": 2}}, {"a": 3.0, "b": {"c": 4}}]) == {"a": 2.0, "b": {"c": 3.0}}
    assert mean_over_seeds([{"a": 0.9, "n": "x"}, {"a": None, "n": "y"}, {"a": 0.6, "n": "z"}]) == {"a": None, "n": "x"}

    table = comparison_table(summary["arms"])
    simpo_column = {row[0]: "".join(row[table.header.index("SimPO")]) for row in table.rows}
    assert "length-normalised" in simpo_column["Reward model"]
    assert "1,000 tokens sampled; all before training, for the pairs" in simpo_column["Policy update"]
    assert simpo_column["Loss"] == (
        "-log sigmoid(beta (avg_logp_c - avg_logp_r) - gamma) (avg_logp: per-token mean log-prob)"
    )


def test_sweep_points_carry_the_crossed_interval_of_the_results_table(tmp_path):
    """A sweep point is read from the evaluation's completions with the interval over seeds and prompts, as the
    arm's own result is: DPO at its own beta gets the same interval in both (a seed-only interval of the seeds'
    means, which prompts shared by every seed leave nearly constant, was narrower)."""
    from prefalign.compare.curves import sweep_points
    from prefalign.compare.evidence import gather
    from prefalign.compare.stats import mean_interval

    cfg = CompareConfig(preset="quick", arms=["dpo"], sweep=True, seeds=2, sweep_betas=[0.3]).resolved()
    prompts = ["p", "q", "r"]
    gold = {  # (seed, policy) -> per-prompt gold; the prompts differ far more than the seeds
        (0, "dpo"): [0.0, 1.0, 2.0],
        (1, "dpo"): [0.1, 1.1, 2.0],
        (0, "dpo@beta=0.3"): [0.5, 1.5, 2.5],
        (1, "dpo@beta=0.3"): [0.4, 1.5, 2.6],
    }
    for seed in (0, 1):
        rows = [{"policy": "reference", "prompt": p, "sample": 0, "gold": 0.0, "kl": 0.0} for p in prompts]
        rows += [
            {"policy": name, "prompt": p, "sample": 0, "gold": gold[seed, name][i], "kl": 1.0 + i + seed}
            for name in ("dpo", "dpo@beta=0.3")
            for i, p in enumerate(prompts)
        ]
        _write_jsonl(tmp_path / f"seed-{seed}" / "eval" / "completions.jsonl", rows)
    points = sweep_points(cfg, tmp_path, [0, 1])
    assert [(pt["arm"], pt["param"], pt["value"]) for pt in points] == [
        ("dpo", "beta", 0.3),
        ("dpo", "beta", cfg.dpo_beta),
    ]
    swept = mean_interval(np.array([gold[0, "dpo@beta=0.3"], gold[1, "dpo@beta=0.3"]])).to_dict()
    assert points[0]["gold"] == pytest.approx(swept) and points[0]["gold_mean"] == pytest.approx(1.5)
    assert points[0]["kl"] == pytest.approx(mean_interval(np.array([[1.0, 2.0, 3.0], [2.0, 3.0, 4.0]])).to_dict())
    own = gather(tmp_path, [0, 1], ["dpo"]).intervals["dpo"]["gold_mean"]
    assert points[1]["gold"] == pytest.approx(own) and own["high"] - own["low"] > 1.0  # prompts' spread in it


def test_a_misspelt_judge_is_refused_before_the_output_exists(tmp_path):
    from prefalign.compare.runner import Comparison
    from prefalign.errors import UserError

    out = tmp_path / "race"
    with pytest.raises(UserError, match=r"^unknown reward source 'vadr': not a built-in judge \(vader, arithmetic\)"):
        Comparison(CompareConfig(judge="vadr", output=str(out))).run()
    assert not out.exists()


def test_a_non_finite_held_out_accuracy_is_not_measured(tmp_path):
    """metrics.jsonl holds a non-finite accuracy as the string "nan": the summary read it as the accuracy (and
    mean_over_seeds, seeing a string among numbers, kept the first seed's value as the mean), then row 1 of the
    verdict raised on it after the whole race had trained."""
    cfg = CompareConfig(preset="quick", arms=["ppo", "dpo"]).resolved()
    results = _fake_race(tmp_path, cfg)
    rm_metrics = tmp_path / "seed-0" / "rm" / "metrics.jsonl"
    _write_jsonl(rm_metrics, [{"step": 2, "wall_seconds": 2.0, "eval/accuracy": "nan"}])

    summary = summarize(cfg, tmp_path, results)

    ppo = next(arm for arm in summary["arms"] if arm["name"] == "ppo")
    assert ppo["cost"]["rm_heldout_accuracy"] is None
    assert summary["verdict"][0]["verdict"] == "inconclusive at this budget"
    assert summary["verdict"][0]["reason"] == "the held-out pair accuracy of the reward model was not measured."
