"""Hub datasets: the id and the split a user gives reach `datasets.load_dataset`, and its rows are used.

`datasets.load_dataset` is replaced by a fake that serves rows only for the (id, split) pairs it knows, so a
split that is lost on the way (and "train" asked for instead) fails the test rather than passing quietly.
"""

import datasets
import pytest
import torch

from prefalign.data import PreferenceExample, load_preferences, load_prompts
from prefalign.errors import UserError
from prefalign.trainers.data import load_preference_splits, load_sft_splits
from prefalign.trainers.dpo import DPOConfig
from prefalign.trainers.ppo_config import PPOConfig
from prefalign.trainers.reward import RewardConfig
from prefalign.trainers.sft import SFTConfig

PAIRS_TEST = [{"prompt": f"Q{i}:", "chosen": " yes", "rejected": " no"} for i in range(3)]
PAIRS_VALID = [{"prompt": "V:", "chosen": " up", "rejected": " down"}]
PROMPTS_TEST = [{"prompt": "the movie was"}, {"prompt": "  "}, {"prompt": "this film"}]
SFT_TEST = [{"prompt": "2+2=", "completion": " 4"}, {"prompt": "3+3=", "completion": " 6"}]


class FakeHub:
    """Stands in for `datasets.load_dataset`: records each call, serves rows only for known (id, split)."""

    def __init__(self, tables):
        self.tables = tables
        self.calls = []

    def __call__(self, path, split=None, **kwargs):
        self.calls.append((path, split))
        if (path, split) not in self.tables:
            raise ValueError(f"Unknown split {split!r} of {path}")
        return datasets.Dataset.from_list(self.tables[(path, split)])


@pytest.fixture()
def hub(monkeypatch):
    fake = FakeHub(
        {
            ("org/pairs", "test"): PAIRS_TEST,
            ("org/pairs", "validation"): PAIRS_VALID,
            ("org/prompts", "test"): PROMPTS_TEST,
            ("org/sft", "test"): SFT_TEST,
        }
    )
    monkeypatch.setattr(datasets, "load_dataset", fake)
    return fake


def test_preferences_from_a_hub_id_and_split(hub):
    examples, report = load_preferences("org/pairs", split="test")
    assert hub.calls == [("org/pairs", "test")]
    assert examples == [PreferenceExample(f"Q{i}:", " yes", " no") for i in range(3)]
    assert [e.where for e in examples] == ["row 1", "row 2", "row 3"]
    assert (report.source, report.total, report.kept) == ("org/pairs", 3, 3)


def test_prompts_from_a_hub_id_and_split(hub):
    assert load_prompts("org/prompts", split="test") == ["the movie was", "this film"]  # the blank one dropped
    assert hub.calls == [("org/prompts", "test")]


def test_data_inspect_reads_the_split(hub):
    from prefalign.cli.data import InspectConfig, inspect

    lines = inspect(InspectConfig(path="org/pairs", split="test"))
    assert hub.calls == [("org/pairs", "test")]
    assert "format: explicit (detected)" in lines and "rows: 3   kept: 3   dropped: 0" in lines


def test_a_split_the_hub_does_not_have_is_one_line_naming_it(hub):
    with pytest.raises(UserError) as info:
        load_preferences("org/pairs", split="dev")
    msg = str(info.value)
    assert msg.startswith("org/pairs: ") and "split 'dev'" in msg and "\n" not in msg


@pytest.mark.parametrize("config", [DPOConfig, RewardConfig])
def test_preference_trainers_pass_data_split_and_eval_data_split(hub, tokenizer, config):
    cfg = config(data="org/pairs", data_split="test", eval_data="org/pairs", eval_data_split="validation")
    train, evals, info = load_preference_splits(cfg, tokenizer)
    assert hub.calls == [("org/pairs", "test"), ("org/pairs", "validation")]
    assert (len(train), len(evals), info["rows"], info["kept"]) == (3, 1, 3, 3)
    want = tokenizer(" up", add_special_tokens=False).input_ids
    assert evals[0][1].chosen_ids[: len(want)] == want  # the eval pair is the validation split's row


def test_sft_trainer_passes_data_split(hub, tokenizer):
    train, _, info = load_sft_splits(SFTConfig(data="org/sft", data_split="test"), tokenizer)
    assert hub.calls == [("org/sft", "test")]
    assert (len(train), info["rows"]) == (2, 2)
    # preference data for SFT (its chosen side) is read once, at the split asked for
    hub.calls.clear()
    train, _, _ = load_sft_splits(SFTConfig(data="org/pairs", data_split="test"), tokenizer)
    assert hub.calls == [("org/pairs", "test")] and len(train) == 3


class ConstantReward:
    name = "constant"

    def score(self, prompts, completions):
        return torch.zeros(len(completions))


def test_ppo_passes_prompts_split(hub, tmp_path, tiny_model_dir):
    from prefalign.trainers.ppo import PPOTrainer

    cfg = PPOConfig(
        prompts="org/prompts",
        prompts_split="test",
        reward="constant",
        model=str(tiny_model_dir),
        output=str(tmp_path / "run"),
        rollout_batch_size=2,
        precision="fp32",
    )
    trainer = PPOTrainer(cfg, reward_source=ConstantReward())
    trainer.init_backend()
    trainer.setup()
    assert hub.calls == [("org/prompts", "test")]
    assert trainer.prompts == ["the movie was", "this film"]


@pytest.mark.parametrize("load", [load_preferences, load_prompts])
def test_a_local_file_refuses_a_split_other_than_the_default(tmp_path, load):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "p", "chosen": " a", "rejected": " b"}\n')
    assert load(path, split="train")  # the default is what a local file holds
    with pytest.raises(UserError) as info:
        load(path, split="test")
    msg = str(info.value)
    assert msg.startswith(f"{path}: ") and "split 'test'" in msg and "hub datasets only" in msg
    assert "\n" not in msg


def test_a_trainer_refuses_a_split_for_a_local_file(tmp_path, tokenizer):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "p", "chosen": " a", "rejected": " b"}\n')
    with pytest.raises(UserError, match="hub datasets only"):
        load_preference_splits(DPOConfig(data=str(path), data_split="test"), tokenizer)
    with pytest.raises(UserError, match="hub datasets only"):
        load_preference_splits(DPOConfig(data=str(path), eval_data=str(path), eval_data_split="test"), tokenizer)
