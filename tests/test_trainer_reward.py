import json
import math

import pytest
import torch
from conftest import (
    assert_eval_pairs_match,
    assert_resume_is_exact,
    learnable_pairs,
    params_at_build,
    read_metrics,
    run_cli,
    trainer_kwargs,
    write_jsonl,
)
from transformers import AutoModelForSequenceClassification

from prefalign.data import TokenizedPair, load_preferences, tokenize_preferences
from prefalign.losses.reward import bradley_terry_loss
from prefalign.rewards import last_token_rewards, load_reward_source
from prefalign.trainers.reward import RewardConfig, RewardTrainer, load_reward_backbone, without_final_token

_metrics = read_metrics


def _cfg(tmp_path, model_dir, data, **kw):
    return RewardConfig(**trainer_kwargs(tmp_path, model_dir, data, **kw))


@pytest.fixture()
def margin_pairs(tmp_path):
    rows = [{**r, "margin": 0.5 * (i % 3)} for i, r in enumerate(learnable_pairs(48))]
    return write_jsonl(tmp_path / "margin_pairs.jsonl", rows)


def _fresh(model_dir, tokenizer, std=None, seed=0):
    """The model a run starts from: the same loader, the same seeded head."""
    return load_reward_backbone(str(model_dir), tokenizer.pad_token_id, std, seed)[0]


def test_first_step_is_a_fresh_head_and_every_parameter_changes(tmp_path, tiny_model_dir, tokenizer, pairs):
    std = 1e-4
    trainer = RewardTrainer(_cfg(tmp_path, tiny_model_dir, pairs, head_init_std=std, max_steps=4))
    trainer.train()
    rows = _metrics(tmp_path / "run")
    assert rows[0]["step"] == 1 and all(math.isfinite(r["loss"]) for r in rows)

    fresh = _fresh(tiny_model_dir, tokenizer, std)
    w, g = fresh.score.weight.detach(), fresh.model.norm.weight.detach()
    assert w.std().item() == pytest.approx(std, rel=0.3)  # 32 draws
    # Step 1 is the fresh model on the first batch (data order is a pure function of the step).
    batch = trainer.collate(trainer.batch_for(0, 0))
    n = len(batch["index"])
    with torch.no_grad():
        r = last_token_rewards(fresh, batch["input_ids"], without_final_token(batch["attention_mask"]))
    loss, stats = bradley_terry_loss(r[:n], r[n:])
    assert rows[0]["loss"] == pytest.approx(loss.item(), abs=1e-6)
    assert rows[0]["accuracy"] == stats["accuracy"].item()
    # ... and that is ln 2 up to a bound set by the head's size: the final RMSNorm gives ||h|| <= max|g| sqrt(H),
    # so |r_c - r_r| <= 2 ||w|| max|g| sqrt(H), and -log sigmoid is 1-Lipschitz.
    bound = 2 * w.norm().item() * g.abs().max().item() * math.sqrt(w.shape[1])
    assert bound < 0.01
    assert abs(rows[0]["loss"] - math.log(2)) <= bound

    after = dict(trainer.accelerator.unwrap_model(trainer.model).named_parameters())
    for name, p in fresh.named_parameters():
        assert not torch.equal(p, after[name].detach()), f"{name} did not change"

    final_dir = tmp_path / "run" / "final"
    config = json.loads((final_dir / "config.json").read_text())
    assert len(config["id2label"]) == 1  # transformers stores num_labels as the size of id2label
    assert config["pad_token_id"] == tokenizer.pad_token_id
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    final = AutoModelForSequenceClassification.from_pretrained(final_dir)
    assert final.config.num_labels == 1
    assert torch.equal(final.score.weight, after["score.weight"].detach())


def test_learnable_set_is_learned_and_scores_the_same_in_prefalign_rewards(tmp_path, tiny_model_dir, tokenizer, pairs):
    trainer = RewardTrainer(_cfg(tmp_path, tiny_model_dir, pairs, max_steps=6, eval_split=0.25))
    final = trainer.train()
    start = _metrics(tmp_path / "run")[0]
    assert start["step"] == 0 and start["eval/accuracy"] < 1.0  # the random head (seed 0) gets some wrong
    assert final["eval/accuracy"] == 1.0
    assert final["eval/loss"] < start["eval/loss"] - 0.05
    assert final["eval/margin"] > start["eval/margin"]
    assert_eval_pairs_match(tmp_path / "run", trainer, final, "eval/accuracy", "eval/margin")

    # Same texts, end to end: data file -> trainer forward, and final/ -> prefalign.rewards on decoded text.
    rows = learnable_pairs(6)
    examples, _ = load_preferences(write_jsonl(tmp_path / "six.jsonl", rows), tokenizer)
    tokenized, _ = tokenize_preferences(examples, tokenizer, 512)
    with torch.no_grad():
        trained = trainer.rewards(trainer.collate(list(enumerate(tokenized))))  # (12,)
    # PPO, prefs and eval score decoded text without the EOS; the trainer reads the reward at the same token
    source = load_reward_source(str(tmp_path / "run" / "final"), batch_size=4)
    scored = source.score([r["prompt"] for r in rows] * 2, [r["chosen"] for r in rows] + [r["rejected"] for r in rows])
    torch.testing.assert_close(scored, trained, atol=1e-5, rtol=1e-5)
    assert (scored[:6] > scored[6:]).all()


def test_margin_column_is_used_in_the_loss(tmp_path, tiny_model_dir, tokenizer, margin_pairs):
    trainer = RewardTrainer(_cfg(tmp_path, tiny_model_dir, margin_pairs, center_rewards_coef=0.1))
    trainer.setup()
    assert trainer.margins == "used"
    # hand-built: rows of different lengths (so padding matters), each completion ending with EOS
    eos = tokenizer.eos_token_id
    hand = [
        TokenizedPair([10, 11, 12], [20, eos], [21, 22, 23, eos], margin=0.5),
        TokenizedPair([13], [24, 25, eos], [26, eos], margin=2.0),
    ]
    batch = trainer.collate(list(enumerate(hand)))
    assert batch["margin"].tolist() == [0.5, 2.0]
    model = trainer.model
    with torch.no_grad():
        loss, stats = trainer.compute_loss(batch)
        # naive rewards: each row alone, unpadded, the head on the last content token (the one before EOS)
        rows = [p.prompt_ids + p.chosen_ids for p in hand] + [p.prompt_ids + p.rejected_ids for p in hand]
        naive = torch.stack([model.score(model.model(torch.tensor([ids])).last_hidden_state)[0, -2, 0] for ids in rows])
        pooled = trainer.rewards(batch)
        at_eos = last_token_rewards(model, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(pooled, naive, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(at_eos, pooled)  # the EOS position really is skipped
    want, want_stats = bradley_terry_loss(pooled[:2], pooled[2:], margin=torch.tensor([0.5, 2.0]), center_coef=0.1)
    assert loss.item() == pytest.approx(want.item(), abs=1e-6)
    assert stats["margin"].item() == pytest.approx(want_stats["margin"].item(), abs=1e-6)
    no_margin, _ = bradley_terry_loss(pooled[:2], pooled[2:], center_coef=0.1)
    assert abs(loss.item() - no_margin.item()) > 0.1

    ignoring = RewardTrainer(_cfg(tmp_path, tiny_model_dir, margin_pairs, center_rewards_coef=0.1, use_margin=False))
    ignoring.setup()
    assert ignoring.margins == "ignored"
    with torch.no_grad():
        assert ignoring.compute_loss(batch)[0].item() == pytest.approx(no_margin.item(), abs=1e-6)


def test_lora_trains_only_the_adapter_and_the_head(tmp_path, tiny_model_dir, tokenizer, pairs):
    from peft import PeftModel

    trainer = params_at_build(RewardTrainer)(
        _cfg(tmp_path, tiny_model_dir, pairs, lora_r=4, lora_alpha=8, learning_rate=5e-3, max_steps=4, merge_lora=True)
    )
    trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.model)
    fresh = dict(_fresh(tiny_model_dir, tokenizer).named_parameters())
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert any("score" in name for name in trainable)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert "lora_" in name or "modules_to_save" in name, name
            assert not torch.equal(p, trainer.start[name]), f"{name} did not change"  # lora_A as well as lora_B
            if "modules_to_save" in name:
                assert not torch.equal(p, fresh["score.weight"]), "score head did not train"
        else:
            key = name.replace("base_model.model.", "").replace(".base_layer", "").replace(".original_module", "")
            assert torch.equal(p, fresh[key]), f"frozen {name} changed"

    batch = trainer.collate(trainer.train_data[:4])
    with torch.no_grad():
        want = trainer.rewards(batch)
    out = tmp_path / "run"
    assert (out / "final" / "adapter_config.json").is_file()
    base = AutoModelForSequenceClassification.from_pretrained(
        tiny_model_dir, num_labels=1, pad_token_id=tokenizer.pad_token_id
    )
    adapter = PeftModel.from_pretrained(base, out / "final")
    merged = AutoModelForSequenceClassification.from_pretrained(out / "final-merged")
    assert merged.config.num_labels == 1 and merged.config.pad_token_id == tokenizer.pad_token_id
    with torch.no_grad():
        for loaded in (adapter, merged):
            got = last_token_rewards(loaded, batch["input_ids"], without_final_token(batch["attention_mask"]))
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    load_reward_source(str(out / "final-merged"))  # a complete reward model: no missing weights


def test_resume_ends_exactly_where_an_uninterrupted_run_ends(tmp_path, tiny_model_dir, pairs):
    assert_resume_is_exact(
        RewardTrainer,
        RewardConfig,
        tmp_path,
        tiny_model_dir,
        pairs,
        cut_at=2,
        max_steps=4,
        save_steps=2,
        lr_scheduler="linear",
        warmup_steps=1,
        grad_accum=2,
        batch_size=2,
    )


def test_config_refuses_bad_numbers(pairs):
    for kw, msg in [
        ({"center_rewards_coef": -0.1}, "--center-rewards-coef"),
        ({"data": ""}, "--data"),
        ({"head_init_std": 0.0}, "--head-init-std"),
        ({"batch_size": 0}, "--batch-size"),
    ]:
        with pytest.raises(ValueError, match=msg):
            RewardConfig(**{"data": str(pairs), **kw})


def test_cli_reward_smoke(tmp_path, tiny_model_dir, margin_pairs):
    out = tmp_path / "cli"
    r = run_cli(
        "reward",
        "--data",
        margin_pairs,
        "--model",
        tiny_model_dir,
        "--output",
        out,
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--precision",
        "fp32",
        "--center-rewards-coef",
        "0.01",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "final" / "config.json").is_file() and (out / "config.yaml").is_file()
    rows = _metrics(out)
    assert len(rows) == 2 and {"loss", "accuracy", "rewards/chosen", "rewards/rejected", "margin"} <= set(rows[0])
    info = json.loads((out / "run.json").read_text())
    assert info["margins"] == "used" and info["score_head"]["new"]
    assert info["score_head"]["init_std"] == pytest.approx(1 / math.sqrt(32 + 1))


def test_cli_reward_bad_flags_exit_2_with_one_line(tmp_path, tiny_model_dir, pairs):
    r = run_cli(
        "reward", "--data", pairs, "--model", tiny_model_dir, "--output", tmp_path / "x", "--center-rewards-coef", "-1"
    )
    assert r.returncode == 2
    assert "--center-rewards-coef must be >= 0" in r.stderr and "Traceback" not in r.stderr


def test_existing_heads_are_kept_or_refused(tmp_path, tiny_model_dir, tokenizer):
    from prefalign.errors import UserError

    for labels in (1, 3):
        model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=labels)
        model.save_pretrained(tmp_path / f"seq-cls-{labels}")
        tokenizer.save_pretrained(tmp_path / f"seq-cls-{labels}")
    kept, info = load_reward_backbone(str(tmp_path / "seq-cls-1"), tokenizer.pad_token_id)
    assert info == {"new": False, "init_std": None}
    saved = AutoModelForSequenceClassification.from_pretrained(tmp_path / "seq-cls-1")
    assert torch.equal(kept.score.weight, saved.score.weight)
    with pytest.raises(UserError, match="already has a trained score head"):
        load_reward_backbone(str(tmp_path / "seq-cls-1"), tokenizer.pad_token_id, head_init_std=0.02)
    with pytest.raises(UserError, match="does not have one output"):
        load_reward_backbone(str(tmp_path / "seq-cls-3"), tokenizer.pad_token_id)
