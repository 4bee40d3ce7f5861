"""The critic-free arms of `prefalign compare` (grpo, rloo, grpo_gt): their command lines, the shared reward
model, the charge for it, and that the arguments parse as a valid `prefalign rl` config."""

from pathlib import Path

from test_compare_arms import auto_precision_is_bf16, plan_of, stage_args  # noqa: F401  (a fixture)

from prefalign.cli._args import parse
from prefalign.compare.arms import ARMS, DEFAULT_ARMS
from prefalign.trainers.rl_config import RLConfig


def test_grpo_and_rloo_train_against_the_ppo_arms_reward_model_on_its_budget():
    plan = plan_of(
        "--preset",
        "quick",
        "--arms",
        "ppo",
        "grpo",
        "rloo",
        "--ppo-steps",
        "5",
        "--ppo-rollout-batch",
        "8",
        "--ppo-epochs",
        "2",
        "--ppo-lr",
        "2e-5",
        "--ppo-kl-coef",
        "0.07",
    )
    assert [(name, command) for name, command, _ in plan] == [
        ("pairs", "prefs"),
        ("seed-0/rm", "reward"),
        ("seed-0/ppo", "ppo"),
        ("seed-0/grpo", "rl"),
        ("seed-0/rloo", "rl"),
        ("seed-0/eval", "eval"),
    ]  # the reward model runs once, before every arm needing it
    for arm in ("grpo", "rloo"):
        args = stage_args(plan, f"seed-0/{arm}")
        want = [
            "--reward",
            "OUT/seed-0/rm/final",
            "--estimator",
            arm,
            "--num-generations",
            "4",
            "--rollout-batch-size",
            "2",
            "--max-steps",
            "5",
            "--ppo-epochs",
            "2",
            "--learning-rate",
            "2e-05",
            "--kl-coef",
            "0.07",
        ]
        i = args.index("--reward")
        assert args[i : i + len(want)] == want
        assert args[args.index("--prompts") + 1] == "OUT/prompts/train.jsonl"
        assert "--value-learning-rate" not in args  # no critic
        cfg = parse(RLConfig, [*args, "--output", "x"], prog="prefalign rl")  # a valid rl command line
        assert cfg.completions_per_iteration == 8  # the PPO arm's rollout batch, in completions
        assert ARMS[arm].needs == ARMS["ppo"].needs  # charged the same reward model


def test_grpo_gt_is_on_the_gold_judge_and_no_arm_joins_the_default_race():
    plan = plan_of("--preset", "quick", "--arms", "grpo_gt")
    assert [name for name, _, _ in plan] == ["pairs", "seed-0/grpo_gt", "seed-0/eval"]
    args = stage_args(plan, "seed-0/grpo_gt")
    assert args[args.index("--reward") + 1] == "vader"
    assert DEFAULT_ARMS == ["ppo", "dpo"]
    assert Path("OUT/seed-0/rm/final").as_posix() not in args


def test_a_critic_free_arm_is_charged_the_completions_it_sampled(tmp_path):
    """--ppo-rollout-batch 2: PPO-RLHF samples 2 completions per iteration, GRPO K = 4 x max(1, 2 // 4) = 4 (what
    its run.json records); its tokens are each iteration's mean response length times those 4."""
    import json

    from prefalign.compare.config import CompareConfig
    from prefalign.compare.stages import StageResult
    from prefalign.compare.summary import _Costs

    cfg = CompareConfig(preset="quick", arms=["grpo"], ppo_rollout_batch=2, ppo_steps=2).resolved()
    dirs = {name: tmp_path / name for name in ("pairs", "rm", "grpo")}
    for d in dirs.values():
        d.mkdir()
    (dirs["pairs"] / "metrics.json").write_text(json.dumps({"new_tokens": 100}))
    (dirs["rm"] / "run.json").write_text(json.dumps({"train_examples": 10, "global_batch": 2}))
    (dirs["rm"] / "metrics.jsonl").write_text("")
    (dirs["grpo"] / "run.json").write_text(json.dumps({"episodes": 8, "total_iterations": 2}))
    (dirs["grpo"] / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": i, "val/response_length": n}) + "\n" for i, n in ((1, 5.0), (2, 7.5)))
    )
    results = {
        "pairs": StageResult("pairs", str(dirs["pairs"]), 1.0, 10.0),
        "seed-0/rm": StageResult("seed-0/rm", str(dirs["rm"]), 2.0, 20.0),
        "seed-0/grpo": StageResult("seed-0/grpo", str(dirs["grpo"]), 3.0, 30.0),
    }
    cost = _Costs(cfg, tmp_path, results).of(ARMS["grpo"], 0)
    assert cost["tokens_generated_training"] == (5.0 + 7.5) * 4  # not x 2, PPO-RLHF's rollout batch
    assert cost["tokens_generated"] == 50 + 100  # and the shared pairs' tokens, through the reward model
