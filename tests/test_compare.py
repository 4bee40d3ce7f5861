import json

import pytest
from conftest import run_cli

from prefalign.compare import PRESETS, CompareConfig

TINY_BUDGET = [
    "--num-prompts",
    "24",
    "--samples-per-prompt",
    "4",
    "--max-new-tokens",
    "8",
    "--eval-prompts",
    "6",
    "--eval-samples",
    "1",
    "--batch-size",
    "2",
    "--rm-steps",
    "2",
    "--ppo-steps",
    "2",
    "--ppo-rollout-batch",
    "4",
    "--dpo-steps",
    "2",
    "--precision",
    "fp32",
    "--eval-split",
    "0.25",
]


def test_compare_end_to_end_on_a_tiny_model_then_resume(tmp_path, tiny_model_dir):
    """Two seeds: the report carries 95% intervals, paired differences, the over-optimisation curves and the
    verdict per claim, and the terminal prints the verdict."""
    from prefalign.compare.verdict import VERDICTS

    out = tmp_path / "cmp"
    arms = ["ppo", "dpo"]
    r = run_cli(
        "compare",
        "--preset",
        "quick",
        "--model",
        tiny_model_dir,
        "--arms",
        *arms,
        "--seeds",
        "2",
        *TINY_BUDGET,
        "--output",
        out,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [a["name"] for a in summary["arms"]] == ["start", *arms]
    start = summary["arms"][0]
    assert start["eval"]["kl_mean"] == 0.0 and start["eval"]["win_rate"] == 0.5  # the start compared with itself
    assert start["intervals"]["win_rate"] == {"mean": 0.5, "low": 0.5, "high": 0.5}
    for arm in summary["arms"][1:]:
        cost = arm["cost"]
        assert cost["wall_seconds"]["total"] > 0 and cost["peak_rss_mb"] > 0 and cost["gradient_steps"] > 0
        assert set(arm["eval"]) >= {"gold_mean", "kl_mean", "win_rate", "length_mean", "eos_rate", "n"}
        assert arm["eval"]["n"] == 6 and len(arm["seeds"]) == 2 and len(arm["seed_costs"]) == 2
        for key in ("gold_mean", "kl_mean", "win_rate"):
            found = arm["intervals"][key]
            assert found["low"] <= found["mean"] <= found["high"], (arm["name"], key, found)
        gain = arm["vs_start"]["gold"]
        assert gain["mean"] == pytest.approx(arm["eval"]["gold_mean"] - start["eval"]["gold_mean"], abs=1e-9)
    assert [(d["a"], d["b"]) for d in summary["differences"]] == [("ppo", "dpo")]
    by = {a["name"]: a for a in summary["arms"]}
    assert by["ppo"]["cost"]["wall_seconds"]["reward_model"] > 0
    # held-out accuracies: each seed's last evaluation of its stage, averaged over the seeds
    for arm, stage, key, field in (
        ("ppo", "rm", "eval/accuracy", "rm_heldout_accuracy"),
        ("dpo", "dpo", "eval/rewards/accuracies", "implicit_reward_heldout_accuracy"),
    ):
        last = []
        for seed in (0, 1):
            rows = [json.loads(x) for x in (out / f"seed-{seed}" / stage / "metrics.jsonl").read_text().splitlines()]
            last.append([r[key] for r in rows if key in r][-1])
        assert [c[field] for c in by[arm]["seed_costs"]] == last
        assert by[arm]["cost"][field] == pytest.approx(sum(last) / 2)
    assert by["dpo"]["cost"]["pairs_used"] == 4  # 2 steps x 2 pairs
    assert by["dpo"]["cost"]["tokens_generated_training"] == 0 < by["ppo"]["cost"]["tokens_generated_training"]
    # held-out points before training and after each of the 2 iterations (--ppo-steps 2 / --curve-points 4 -> 1)
    curves = {curve["arm"]: curve["points"] for curve in summary["overoptimisation"]}
    assert list(curves) == ["ppo"] and [point["step"] for point in curves["ppo"]] == [0, 1, 2]
    verdict = summary["verdict"]
    assert [row["topic"] for row in verdict] == [
        "Reward model",
        "Policy update",
        "Loss",
        "Compute cost and sample efficiency",
    ]
    assert all(row["verdict"] in VERDICTS for row in verdict)
    assert verdict[1]["verdict"] == "holds"  # PPO sampled while training, DPO did not: the mechanism itself
    # row 1 reads each held-out pair's outcome (eval_pairs.jsonl), paired by seed and pair, grouped by prompt
    pairs = [json.loads(x) for x in (out / "seed-0" / "rm" / "eval_pairs.jsonl").read_text().splitlines()]
    n_prompts = len({row["prompt"] for row in pairs})
    assert f"over 2 seeds and {n_prompts} held-out prompts ({len(pairs)} pairs)" in verdict[0]["reason"]
    difference = by["dpo"]["cost"]["implicit_reward_heldout_accuracy"] - by["ppo"]["cost"]["rm_heldout_accuracy"]
    assert verdict[0]["evidence"]["accuracy_difference"]["mean"] == pytest.approx(difference, abs=1e-6)
    report = (out / "report.md").read_text()
    assert report.index("## Verdict") < report.index("## How to read this report")
    for label in ("Paired differences", "PPO-RLHF vs Starting policy", "PPO-RLHF vs DPO", "Over-optimisation"):
        assert label in report, label
    for png in ("gold_vs_kl.png", "training_curves.png", "gold_vs_wall_time.png", "overoptimisation.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<|im_start|>" not in report  # plain continuation: prompts are not chat-templated
    # the answer on the terminal: every row's verdict, in order
    printed = r.stdout[r.stdout.index("Verdict, claim by claim") :]
    positions = [printed.index(f"{n}. {row['topic']} - {row['verdict']}:") for n, row in enumerate(verdict, 1)]
    assert positions == sorted(positions)
    stages = json.loads((out / "stages.json").read_text())
    assert set(stages) == {"pairs"} | {f"seed-{s}/{n}" for s in (0, 1) for n in ("rm", "ppo", "dpo", "eval")}
    # evaluations while training (held-out pairs, PPO's curve) are measurement: subtracted, reported apart
    for seed in (0, 1):
        for arm, parts in (("ppo", {"reward_model": "rm", "policy": "ppo"}), ("dpo", {"policy": "dpo"})):
            wall, evaluation = by[arm]["seed_costs"][seed]["wall_seconds"], 0.0
            for part, stage in parts.items():
                lines = (out / f"seed-{seed}" / stage / "metrics.jsonl").read_text().splitlines()
                rows = [json.loads(x) for x in lines]
                spent = sum(r.get("eval/seconds", 0) + r.get("time/heldout", 0) for r in rows)
                assert spent > 0 and wall[part] == pytest.approx(stages[f"seed-{seed}/{stage}"]["wall_seconds"] - spent)
                evaluation += spent
            assert wall["evaluation"] == pytest.approx(evaluation, abs=1e-3)
            assert wall["total"] == pytest.approx(wall["pairs"] + wall["reward_model"] + wall["policy"], abs=1e-3)
    # finished stages keep their models, not their optimizer checkpoints (never resumed; ~2 GB per arm at 135M)
    assert not list(out.rglob("checkpoints")) and (out / "seed-0" / "dpo" / "final" / "config.json").is_file()

    # resume: nothing finished is redone (the stage records are unchanged), the report is rewritten
    before = (out / "stages.json").read_text()
    r = run_cli(
        "compare",
        "--preset",
        "quick",
        "--model",
        tiny_model_dir,
        "--arms",
        *arms,
        "--seeds",
        "2",
        *TINY_BUDGET,
        "--output",
        out,
        "--resume",
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "stages.json").read_text() == before


def test_compare_refuses_a_previous_comparison_without_resume_or_overwrite(tmp_path):
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "stages.json").write_text("{}")
    # the quick preset: the default race's disk preflight (13 stages) must not be what refuses it on a small disk
    r = run_cli("compare", "--preset", "quick", "--output", out)
    assert r.returncode == 2 and "--resume" in r.stderr and "Traceback" not in r.stderr


def test_an_arithmetic_race_without_answers_is_refused_before_its_directory_exists(tmp_path, tiny_model_dir):
    prompts = tmp_path / "sums.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{i} + 1 ="}) + "\n" for i in range(30)))
    out = tmp_path / "cmp"
    flags = ["--task", "arithmetic", "--train-prompts", prompts, "--model", tiny_model_dir, "--seeds", "1"]
    r = run_cli("compare", *flags, *TINY_BUDGET, "--output", out)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "judge 'arithmetic' needs an 'answer' column in the prompt rows (found columns: none)" in r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


def test_presets_fill_only_unset_budgets():
    cfg = CompareConfig(preset="quick", dpo_steps=3).resolved()
    assert cfg.dpo_steps == 3 and cfg.rm_steps == PRESETS["quick"]["rm_steps"]
    with pytest.raises(ValueError, match="--arms"):
        CompareConfig(arms=["sft"])
    with pytest.raises(ValueError, match="--preset"):
        CompareConfig(preset="huge")
    with pytest.raises(ValueError, match="--dpo-beta"):
        CompareConfig(dpo_beta=0.0)


def test_pairing_and_sampling_flags_are_checked():
    for kw, msg in [
        ({"pair_rule": "random"}, "--pair-rule"),
        ({"min_gap": -0.1}, "--min-gap"),
        ({"min_gap": float("nan")}, "--min-gap"),
        ({"sample_batch_size": 0}, "--sample-batch-size"),
    ]:
        with pytest.raises(ValueError, match=msg):
            CompareConfig(**kw)


def test_precision_is_refused_when_parsed():
    """--precision goes to every stage: a value no trainer takes is one line at parse time, not a refusal by the
    first training stage once the pairs are sampled (the race's output directory already written)."""
    from prefalign.cli._args import parse
    from prefalign.errors import UserError

    with pytest.raises(UserError, match=r"^--precision must be auto, fp32 or bf16, got 'fp16'$"):
        parse(CompareConfig, ["--precision", "fp16"], prog="prefalign compare")
    assert parse(CompareConfig, ["--precision", "bf16"], prog="prefalign compare").precision == "bf16"
