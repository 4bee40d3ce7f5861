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
    out = tmp_path / "cmp"
    r = run_cli(
        "compare",
        "--preset",
        "quick",
        "--model",
        tiny_model_dir,
        "--arms",
        "ppo",
        "dpo",
        "dpo_rf",
        "ppo_gt",
        *TINY_BUDGET,
        "--output",
        out,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [a["name"] for a in summary["arms"]] == ["start", "ppo", "dpo", "dpo_rf", "ppo_gt"]
    start = summary["arms"][0]["eval"]
    assert start["kl_mean"] == 0.0 and start["win_rate"] == 0.5  # the start compared with itself
    for arm in summary["arms"][1:]:
        cost = arm["cost"]
        assert cost["wall_seconds"]["total"] > 0 and cost["peak_rss_mb"] > 0 and cost["gradient_steps"] > 0
        assert set(arm["eval"]) >= {"gold_mean", "kl_mean", "win_rate", "length_mean", "eos_rate", "n"}
        assert arm["eval"]["n"] == 6
    by = {a["name"]: a for a in summary["arms"]}
    assert (
        by["ppo"]["cost"]["wall_seconds"]["reward_model"] > 0 and by["ppo"]["cost"]["rm_heldout_accuracy"] is not None
    )
    assert by["ppo_gt"]["cost"]["pairs_used"] == 0 and by["ppo_gt"]["cost"]["wall_seconds"]["pairs"] == 0
    assert by["dpo"]["cost"]["pairs_used"] == 4  # 2 steps x 2 pairs
    report = (out / "report.md").read_text()
    for label in (
        "Reward model",
        "Policy update",
        "Loss",
        "Compute cost",
        "Sample efficiency",
        "PPO-RLHF",
        "DPO",
        "DPO (reference-free)",
        "PPO on the gold judge",
    ):
        assert label in report, label
    for png in ("gold_vs_kl.png", "training_curves.png", "gold_vs_wall_time.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<|im_start|>" not in report  # plain continuation: prompts are not chat-templated
    stages = json.loads((out / "stages.json").read_text())
    assert set(stages) == {
        "pairs",
        "seed-0/rm",
        "seed-0/ppo",
        "seed-0/dpo",
        "seed-0/dpo_rf",
        "seed-0/ppo_gt",
        "seed-0/eval",
    }
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
        "ppo",
        "dpo",
        "dpo_rf",
        "ppo_gt",
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
    r = run_cli("compare", "--output", out)
    assert r.returncode == 2 and "--resume" in r.stderr and "Traceback" not in r.stderr


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
