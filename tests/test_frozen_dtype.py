"""--frozen-dtype: PPO's and rl's frozen models (the reference and a reward model as --reward) hold their linear
weights in bf16 under bf16 precision (auto) or when asked, and run under bf16 autocast of their own at fp32."""

import json
import math

import pytest
import torch

from prefalign.errors import UserError
from prefalign.models.frozen import resolve_frozen_dtype
from prefalign.rewards import RewardModel
from prefalign.trainers.ppo import PPOConfig, PPOTrainer
from prefalign.trainers.rl import RLConfig, RLTrainer


@pytest.fixture()
def prompts(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("".join(f"review {i}: the movie was\n" for i in range(16)))
    return p


def _cfg(tmp_path, model_dir, prompts, reward, cls=PPOConfig, **kw):
    base = dict(
        prompts=str(prompts),
        reward=reward,
        model=str(model_dir),
        output=str(tmp_path / "run"),
        max_steps=2,
        rollout_batch_size=4,
        num_minibatches=1,
        ppo_epochs=1,
        max_new_tokens=4,
        learning_rate=1e-3,
        lr_scheduler="constant",
        temperature=1.0,
        seed=0,
    )
    base.update(kw)
    return cls(**base)


def _linear_and_embedding_dtypes(model) -> tuple[set, set]:
    """The dtypes of the linear layers' parameters (bar an LM head tied to the embedding) and of the embedding."""
    embedding = model.get_input_embeddings().weight
    linear = {
        p.dtype
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) and m.weight is not embedding
        for p in m.parameters()
    }
    return linear, {embedding.dtype}


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_auto_follows_the_precision():
    assert resolve_frozen_dtype("auto", "bf16") == torch.bfloat16
    assert resolve_frozen_dtype("auto", "fp32") == torch.float32
    assert resolve_frozen_dtype("bfloat16", "fp32") == torch.bfloat16
    assert resolve_frozen_dtype("float32", "bf16") == torch.float32


def test_bf16_precision_holds_both_frozen_models_in_bf16_and_the_first_kl_is_zero(
    tmp_path, tiny_model_dir, prompts, tiny_reward_model_dir
):
    """Under bf16 autocast the policy casts its float32 linear weights to the same bf16 bits the reference holds:
    before the first update the two give identical log-probs, so the first iteration's KL is exactly 0."""
    trainer = PPOTrainer(_cfg(tmp_path, tiny_model_dir, prompts, str(tiny_reward_model_dir), precision="bf16"))
    trainer.train()
    assert _linear_and_embedding_dtypes(trainer.ref_model) == ({torch.bfloat16}, {torch.float32})
    assert _linear_and_embedding_dtypes(trainer.reward_source.model) == ({torch.bfloat16}, {torch.float32})
    rows = _rows(tmp_path / "run")
    assert len(rows) == 2
    for row in rows:
        for key in ("loss/policy", "loss/value", "objective/scores", "objective/kl"):
            assert math.isfinite(row[key]), key
    assert rows[0]["objective/kl"] == 0.0
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["precision"] == "bf16" and run["frozen_dtype"] == "bfloat16"


def test_fp32_precision_with_bf16_frozen_models_runs_them_under_their_own_autocast(
    tmp_path, tiny_model_dir, prompts, tiny_reward_model_dir
):
    """Without autocast a float32 input would meet a bf16 weight (a dtype error) in the reference's forward and the
    reward model's: both run under autocast of their own, the policy stays float32."""
    cfg = _cfg(tmp_path, tiny_model_dir, prompts, str(tiny_reward_model_dir), precision="fp32", frozen_dtype="bfloat16")
    trainer = PPOTrainer(cfg)
    trainer.train()
    assert _linear_and_embedding_dtypes(trainer.ref_model) == ({torch.bfloat16}, {torch.float32})
    assert _linear_and_embedding_dtypes(trainer.reward_source.model) == ({torch.bfloat16}, {torch.float32})
    assert {p.dtype for p in trainer.policy.parameters()} == {torch.float32}
    rows = _rows(tmp_path / "run")
    assert len(rows) == 2 and all(math.isfinite(r["loss/policy"]) and math.isfinite(r["objective/kl"]) for r in rows)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["precision"] == "fp32" and run["frozen_dtype"] == "bfloat16"


def test_rl_with_bf16_frozen_models_at_fp32(tmp_path, tiny_model_dir, prompts, tiny_reward_model_dir):
    """`prefalign rl` loads its reward models through `WeightedRewards` and may run the reference alone
    (--kl-in-loss): both paths see --frozen-dtype."""
    cfg = _cfg(
        tmp_path,
        tiny_model_dir,
        prompts,
        [str(tiny_reward_model_dir)],
        cls=RLConfig,
        precision="fp32",
        frozen_dtype="bfloat16",
        rollout_batch_size=2,
        num_generations=2,
        kl_in_loss=True,
    )
    trainer = RLTrainer(cfg)
    trainer.train()
    (reward_model,) = trainer.reward_source.sources.values()
    assert _linear_and_embedding_dtypes(reward_model.model) == ({torch.bfloat16}, {torch.float32})
    assert _linear_and_embedding_dtypes(trainer.ref_model) == ({torch.bfloat16}, {torch.float32})
    assert json.loads((tmp_path / "run" / "run.json").read_text())["frozen_dtype"] == "bfloat16"


def test_fp32_default_keeps_the_frozen_models_float32(
    tmp_path, tiny_model_dir, prompts, tiny_reward_model_dir, monkeypatch
):
    """fp32 precision, --frozen-dtype auto: nothing is held in bf16 (setup stops before the value model loads)."""
    import prefalign.models.value as value_module

    class Loaded(Exception):
        pass

    def stop(*args, **kwargs):
        raise Loaded

    monkeypatch.setattr(value_module, "load_value_model", stop)
    trainer = PPOTrainer(_cfg(tmp_path, tiny_model_dir, prompts, str(tiny_reward_model_dir), precision="fp32"))
    with pytest.raises(Loaded):
        trainer.init_backend()
        trainer.setup()
    assert trainer.frozen_dtype == torch.float32 and trainer.ref_model is not None
    assert {p.dtype for p in trainer.ref_model.parameters()} == {torch.float32}
    assert {p.dtype for p in trainer.reward_source.model.parameters()} == {torch.float32}


def test_reward_model_held_in_bf16_scores_close_to_float32(tiny_reward_model_dir):
    prompts = ["the movie was", "a long prompt about nothing in particular, and", "x"]
    completions = [" great fun", " then it ended", " y z w v u"]
    fp32 = RewardModel(str(tiny_reward_model_dir), batch_size=2)
    bf16 = RewardModel(str(tiny_reward_model_dir), batch_size=2, autocast_dtype=torch.bfloat16)
    assert {p.dtype for p in fp32.model.parameters()} == {torch.float32}
    linear, embedding = _linear_and_embedding_dtypes(bf16.model)
    assert linear == {torch.bfloat16} and embedding == {torch.float32}
    assert bf16.model.score.weight.dtype == torch.bfloat16
    assert bf16.model.model.norm.weight.dtype == torch.float32
    want, got = fp32.score(prompts, completions), bf16.score(prompts, completions)
    assert got.dtype == torch.float32 and got.shape == (3,)
    scale = want.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(got, want, rtol=0, atol=0.02 * scale)


def test_a_bad_frozen_dtype_names_the_flag(prompts):
    from prefalign.cli._args import parse

    message = r"^--frozen-dtype must be auto, float32 or bfloat16, got 'fp16'$"
    with pytest.raises(ValueError, match=message):
        PPOConfig(prompts=str(prompts), reward="vader", frozen_dtype="fp16")
    with pytest.raises(UserError, match=message):
        parse(RLConfig, ["--prompts", str(prompts), "--reward", "vader", "--frozen-dtype", "fp16"], prog="prefalign rl")
