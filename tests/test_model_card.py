"""Model cards (issue 15): every model a run saves (``final/``, ``final-merged/``, PPO's ``value/``) carries a
``README.md`` that `huggingface_hub.ModelCard.load` reads, whose Hub metadata is valid, and which holds the method's
loss formula, the data's kept and dropped rows, the final metrics of its run, the versions and a command that
reproduces the run."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from conftest import learnable_pairs, read_metrics, trainer_kwargs, write_jsonl
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.utils import validate_repo_id

from prefalign.cli._args import parse
from prefalign.losses.advantages import ADVANTAGE_ESTIMATORS
from prefalign.losses.dpo import DPO_LOSSES, NOTATION
from prefalign.methods import METHODS
from prefalign.runio import to_plain, write_config, write_json
from prefalign.trainers.card import RUN_ONLY, CardFacts, hub_dataset_id, hub_model_id, write_model_card
from prefalign.trainers.dpo import DPOConfig, DPOTrainer
from prefalign.trainers.ppo import PPOConfig, PPOTrainer
from prefalign.trainers.reward import RewardConfig, RewardTrainer
from prefalign.trainers.rl import RLConfig, RLTrainer
from prefalign.trainers.sft import SFTTrainer


class FirstTokenReward:
    """Toy reward: 1 when a completion's first character is a letter (anything deterministic will do)."""

    name = "first-letter"

    def score(self, prompts, completions):
        return torch.tensor([float(c[:1].isalpha()) for c in completions])


def _load(model_dir) -> ModelCard:
    """The card, checked as the Hub would check its metadata (offline: `ModelCard.validate` posts to the Hub):
    ModelCardData rebuilds it unchanged, base_model and datasets are valid repo ids."""
    card = ModelCard.load(model_dir / "README.md")
    data = card.data.to_dict()
    assert ModelCardData(**data).to_dict() == data
    for repo_id in [data.get("base_model"), *data.get("datasets", [])]:
        if repo_id is not None:
            validate_repo_id(repo_id)
    return card


def _assert_holds_final_metrics(card: ModelCard, out) -> None:
    """The card's metrics table holds every value of metrics.jsonl's last row, and of the training row logged at
    the same step before the final evaluation's, exactly (a float's repr reads back as the same float)."""
    rows = read_metrics(out)
    step = rows[-1]["step"]
    assert f"## Final metrics (step {step})" in card.text
    for row in rows:
        if row["step"] == step:
            for key, value in row.items():
                if key not in ("step", "wall_seconds"):  # the last row's wall time is the run's
                    assert f"| {key} | {json.dumps(value)} |" in card.text
    assert f"| wall_seconds | {json.dumps(rows[-1]['wall_seconds'])} |" in card.text


def _config_block(card: ModelCard) -> str:
    [block] = re.findall(r"```yaml\n(.*?)```", card.text, flags=re.S)
    return block


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, tiny_model_dir):
    """A 2-step dpo run on 16 learnable pairs and one pair that validation drops, a quarter held out."""
    tmp = tmp_path_factory.mktemp("dpo-card")
    data = write_jsonl(
        tmp / "pairs.jsonl", [*learnable_pairs(16), {"prompt": "x", "chosen": "same", "rejected": "same"}]
    )
    cfg = DPOConfig(**trainer_kwargs(tmp, tiny_model_dir, data, max_steps=2, eval_split=0.25))
    DPOTrainer(cfg).train()
    return cfg, tmp / "run"


def test_dpo_card_holds_metadata_formula_data_and_final_metrics(dpo_run):
    cfg, out = dpo_run
    card = _load(out / "final")
    # a local base model and a local data file: no base_model or datasets (the Hub refuses a path there)
    assert card.data.to_dict() == {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["prefalign", "dpo", "sigmoid"],
    }
    assert card.text.startswith("\n# run: Direct Preference Optimization (DPO) family: sigmoid\n")
    assert f"trained with prefalign: `prefalign dpo` from `{cfg.model}`." in card.text
    assert f"Loss: {DPO_LOSSES['sigmoid'].help}; {NOTATION}\n" in card.text
    assert (
        f"`{cfg.data}` (a local file): 17 rows read, 16 kept, 1 dropped (identical 1); 12 train, 4 eval." in card.text
    )
    assert "| beta | 0.1 |" in card.text  # run.json's facts
    _assert_holds_final_metrics(card, out)
    import transformers

    assert f"| transformers | {transformers.__version__} |" in card.text


def test_dpo_card_command_reproduces_the_config(dpo_run, tmp_path):
    cfg, out = dpo_run
    card = _load(out / "final")
    assert "```bash\nprefalign dpo --config config.yaml --output runs/run\n```" in card.text
    config = tmp_path / "config.yaml"
    config.write_text(_config_block(card))
    assert not set(RUN_ONLY) & set(yaml.safe_load(config.read_text()))
    again = parse(DPOConfig, ["--config", str(config), "--output", "runs/run"], prog="prefalign dpo")
    expected = {**to_plain(cfg), "output": "runs/run", "overwrite": False, "resume": None}
    assert to_plain(again) == expected


def test_resumed_run_card_holds_the_resumed_runs_metrics(tmp_path, tiny_model_dir, pairs):
    kwargs = trainer_kwargs(tmp_path, tiny_model_dir, pairs, max_steps=4, save_steps=2)
    DPOTrainer(DPOConfig(**kwargs)).train()
    out = tmp_path / "run"
    first = _load(out / "final").text
    DPOTrainer(DPOConfig(**kwargs, resume=str(out / "checkpoints" / "step-0000002"))).train()
    card = _load(out / "final")
    assert "| resumed_from_step | 2 |" in card.text and "| resumed_from_step | null |" in first
    _assert_holds_final_metrics(card, out)


def test_lora_run_cards_the_adapter_and_the_merged_model(tmp_path, tiny_model_dir, pairs):
    DPOTrainer(
        DPOConfig(**trainer_kwargs(tmp_path, tiny_model_dir, pairs, max_steps=1, lora_r=4, merge_lora=True))
    ).train()
    out = tmp_path / "run"
    adapter, merged = _load(out / "final"), _load(out / "final-merged")
    tags = ["prefalign", "dpo", "sigmoid", "lora"]
    assert adapter.data.to_dict() == {"library_name": "peft", "pipeline_tag": "text-generation", "tags": tags}
    assert merged.data.to_dict() == {"library_name": "transformers", "pipeline_tag": "text-generation", "tags": tags}
    # ours replaces the card peft writes beside an adapter
    assert "A LoRA adapter (load it onto its base model with `peft.PeftModel.from_pretrained`)" in adapter.text
    assert "A LoRA adapter merged into its base model" in merged.text
    for card in (adapter, merged):
        _assert_holds_final_metrics(card, out)


def test_ppo_cards_the_policy_and_the_value_model(tmp_path, tiny_model_dir):
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl", [{"prompt": f"review {i}: the movie was"} for i in range(8)] + [{"prompt": " "}]
    )
    cfg = PPOConfig(
        prompts=str(prompts),
        reward="first-letter",
        model=str(tiny_model_dir),
        output=str(tmp_path / "run"),
        max_steps=1,
        rollout_batch_size=4,
        num_minibatches=1,
        ppo_epochs=1,
        max_new_tokens=4,
        learning_rate=1e-3,
        precision="fp32",
        seed=0,
    )
    PPOTrainer(cfg, reward_source=FirstTokenReward()).train()
    out = tmp_path / "run"
    policy, value = _load(out / "final"), _load(out / "value")
    assert policy.data.to_dict() == {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["prefalign", "ppo", "rlhf"],
    }
    assert value.data.to_dict() == {
        "library_name": "transformers",
        "pipeline_tag": "text-classification",
        "tags": ["prefalign", "ppo", "rlhf", "value-model"],
    }
    assert f"Loss: {METHODS['ppo'].formula}\n" in policy.text
    assert f"Loss: {METHODS['value'].formula}\n" in value.text
    assert "| reward | first-letter |" in policy.text
    for card in (policy, value):
        assert f"`{prompts}` (a local file): 9 rows read, 8 kept, 1 dropped (empty_prompt 1)." in card.text
        assert "```bash\nprefalign ppo --config config.yaml --output runs/run\n```" in card.text
        _assert_holds_final_metrics(card, out)


def test_hub_ids_go_into_the_metadata(tmp_path):
    """The embedded default names its Hub model, a hub dataset its id; both validate as repo ids."""
    run = tmp_path / "run"
    write_config(run, DPOConfig(data="Anthropic/hh-rlhf"))
    write_json(
        run / "run.json", {"processes": 2, "data": {"source": "Anthropic/hh-rlhf", "rows": 3, "kept": 3, "dropped": {}}}
    )
    (run / "final").mkdir()
    write_model_card(run / "final", CardFacts(run, "dpo", METHODS["dpo"], "smollm2-135m"))
    card = _load(run / "final")
    assert card.data.to_dict() == {
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "datasets": ["Anthropic/hh-rlhf"],
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["prefalign", "dpo"],
    }
    assert "(on the Hub: `HuggingFaceTB/SmolLM2-135M-Instruct`)" in card.text
    assert "`Anthropic/hh-rlhf` (a Hub dataset): 3 rows read, 3 kept, 0 dropped." in card.text
    assert "## Final metrics\n\nNone logged." in card.text
    assert "accelerate launch --num_processes 2 -m prefalign dpo --config config.yaml" in card.text


def test_hub_model_id(tmp_path):
    assert hub_model_id("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_model_id("org/model") == "org/model"
    assert hub_model_id("org//model") is None
    assert hub_model_id("./not/here") is None
    assert hub_model_id(str(tmp_path)) is None  # a local directory without a card
    (tmp_path / "README.md").write_text("---\nbase_model: org/base\n---\n")
    assert hub_model_id(str(tmp_path)) is None  # someone else's card: its base is not this directory's id
    (tmp_path / "README.md").write_text("---\nbase_model: org/base\ntags:\n- prefalign\n---\n")
    assert hub_model_id(str(tmp_path)) == "org/base"  # an earlier prefalign run: its nearest Hub ancestor


def test_hub_dataset_id(tmp_path):
    assert hub_dataset_id("Anthropic/hh-rlhf") == "Anthropic/hh-rlhf"
    assert hub_dataset_id("data/pairs.jsonl") is None
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "set").write_text("a prompt\n")
    assert hub_dataset_id(str(tmp_path / "org" / "set")) is None
    assert hub_dataset_id(None) is None


@pytest.mark.parametrize("trainer", [SFTTrainer, DPOTrainer, RewardTrainer, PPOTrainer, RLTrainer])
def test_every_trainer_has_a_method(trainer):
    assert trainer.command in METHODS


@pytest.mark.parametrize("loss_type", list(DPO_LOSSES))
def test_dpo_card_names_its_loss_type(loss_type):
    method = DPOTrainer(DPOConfig(data="pairs.jsonl", loss_type=loss_type)).card_method()
    assert method.formula == f"{DPO_LOSSES[loss_type].help}; {NOTATION}"
    assert method.tags == ("dpo", loss_type.replace("_", "-"))


@pytest.mark.parametrize("estimator", [n for n, e in ADVANTAGE_ESTIMATORS.items() if not e.needs_values])
def test_rl_card_names_its_estimator(estimator):
    method = RLTrainer(RLConfig(prompts="p.txt", reward=["vader"], estimator=estimator)).card_method()
    assert method.formula == f"{METHODS['rl'].formula}; A_t: {ADVANTAGE_ESTIMATORS[estimator].help}"
    assert method.tags == ("rlhf", estimator.replace("_", "-"))
    assert method.name == f"Critic-free online RL: {estimator}"


def test_a_reward_adapter_card_names_the_load_that_works(tmp_path, tiny_model_dir, pairs):
    """A LoRA reward model's base is a causal LM, whose config builds a 2-label head: the card's
    `PeftModel.from_pretrained` onto it failed on the saved 1-label score. The card names the load with
    num_labels=1, and that load scores as the trained model does."""
    from peft import AutoPeftModelForSequenceClassification

    trainer = RewardTrainer(
        RewardConfig(**trainer_kwargs(tmp_path, tiny_model_dir, pairs, max_steps=1, lora_r=4, learning_rate=1e-2))
    )
    trainer.train()
    final = tmp_path / "run" / "final"
    card = _load(final)
    assert (
        "A LoRA adapter with a scalar head (load it with "
        "`peft.AutoPeftModelForSequenceClassification.from_pretrained(path, num_labels=1)`" in card.text
    )
    with pytest.raises(RuntimeError, match=r"size mismatch for .*score"):  # what the base's own config gives
        AutoPeftModelForSequenceClassification.from_pretrained(final)
    loaded = AutoPeftModelForSequenceClassification.from_pretrained(final, num_labels=1).eval()
    ids = torch.tensor([[1, 400, 500, 600, 2], [1, 401, 501, 601, 701]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    trained = trainer.prepared.model.eval()
    with torch.no_grad():
        expected = trained(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, expected)
