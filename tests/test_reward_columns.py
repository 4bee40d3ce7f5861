"""A prompt row's other dataset columns reach a ``module:function`` reward as keyword arguments (issue 12):
`load_prompt_rows` keeps them, `take_rows` aligns them with the completions (K per prompt in rl),
`CallableReward` passes the ones the function's signature asks for."""

import json

import pytest
import torch

from prefalign.data import load_prompt_rows, load_prompts, parse_prompts, read_table, take_rows
from prefalign.errors import UserError
from prefalign.reward_mix import WeightedRewards
from prefalign.rewards import CallableReward, VaderJudge, score_with_columns
from prefalign.trainers.ppo import PPOConfig, PPOTrainer
from prefalign.trainers.rl import RLConfig, RLTrainer


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def qa_file(tmp_path):
    """8 prompts with a reference answer and an id: the answer of prompt i is ``a{i}``."""
    return _jsonl(
        tmp_path / "qa.jsonl", [{"prompt": f"Q{i}: what is {i} + {i}?", "answer": f"a{i}", "id": i} for i in range(8)]
    )


# ------------------------------------------------------------------------------------------- loading


def test_a_table_keeps_its_other_columns_aligned_with_the_kept_prompts(tmp_path):
    path = _jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "one", "answer": "1", "id": 10},
            {"prompt": "  ", "answer": "dropped", "id": 11},
            {"prompt": "three", "answer": "3"},
        ],
    )
    prompts, columns = load_prompt_rows(path)
    assert prompts == ["one", "three"]
    assert columns == {"answer": ["1", "3"], "id": [10, None]}  # the blank prompt's row went with it
    assert load_prompts(path) == prompts  # the existing callers see the texts only
    assert parse_prompts(read_table(path))[0] == prompts


def test_csv_columns_and_sources_without_columns(tmp_path):
    csv = tmp_path / "p.csv"
    csv.write_text("question,answer\nfirst,x\nsecond,y\n")
    assert load_prompt_rows(csv, column="question") == (["first", "second"], {"answer": ["x", "y"]})
    txt = tmp_path / "p.txt"
    txt.write_text("first\nsecond\n")
    assert load_prompt_rows(txt) == (["first", "second"], {})
    assert load_prompt_rows(["hi"]) == (["hi"], {})


def test_take_rows_repeats_each_prompt_once_per_completion():
    columns = {"answer": ["a0", "a1", "a2"], "id": [0, 1, 2]}
    rows = [i for i in [2, 0] for _ in range(3)]  # rl: prompts 2 and 0, K = 3 completions each
    assert take_rows(columns, rows) == {"answer": ["a2"] * 3 + ["a0"] * 3, "id": [2, 2, 2, 0, 0, 0]}
    assert take_rows({}, rows) == {}


# ------------------------------------------------------------------------------------------ the call


COLUMNS = {"answer": ["4", "6"], "id": [2, 3]}


def test_a_named_parameter_gets_its_column_and_nothing_else():
    seen = {}

    def exact_match(prompts, completions, answer):
        seen.update(prompts=prompts, answer=answer)
        return [float(c.strip() == a) for c, a in zip(completions, answer)]

    scores = CallableReward("m:exact_match", exact_match).score(["2+2=", "3+3="], [" 4", "5"], COLUMNS)
    assert scores.tolist() == [1.0, 0.0]
    assert seen == {"prompts": ["2+2=", "3+3="], "answer": ["4", "6"]}


def test_kwargs_get_every_column_and_a_copy():
    seen = {}

    def fn(prompts, completions, **kwargs):
        seen.update(kwargs)
        kwargs["answer"].append("mutated")  # must not reach the caller's columns
        return [0.0] * len(completions)

    CallableReward("m:fn", fn).score(["p", "q"], ["x", "y"], COLUMNS)
    assert seen == {"answer": ["4", "6", "mutated"], "id": [2, 3]}
    assert COLUMNS["answer"] == ["4", "6"]


def test_a_column_named_like_a_positional_parameter_is_not_passed_twice():
    def fn(prompts, completions, **kwargs):
        return [float(len(kwargs))] * len(completions)

    assert CallableReward("m:fn", fn).score(["p"], ["x"], {"prompts": ["raw"], "id": [1]}).tolist() == [1.0]


def test_a_two_argument_function_is_called_as_before():
    def fn(prompts, completions):
        return [float(len(c)) for c in completions]

    assert CallableReward("m:fn", fn).score(["p", "q"], ["abc", "d"], COLUMNS).tolist() == [3.0, 1.0]
    assert CallableReward("m:fn", fn).score(["p"], ["ab"]).tolist() == [2.0]


def test_a_default_is_kept_when_the_column_is_absent():
    def fn(prompts, completions, answer, bonus=5.0):
        return [bonus + float(a) for a in answer]

    assert CallableReward("m:fn", fn).score(["p", "q"], ["x", "y"], COLUMNS).tolist() == [9.0, 11.0]


def test_a_required_parameter_that_is_no_column_is_one_line():
    def fn(prompts, completions, solution):
        return [0.0] * len(completions)

    with pytest.raises(
        UserError,
        match=r"^reward function 'm:fn' needs 'solution', which is not a column of the "
        r"prompt rows \(columns: answer, id\); add it to the prompt file or give "
        r"solution a default$",
    ):
        CallableReward("m:fn", fn).score(["p", "q"], ["x", "y"], COLUMNS)
    with pytest.raises(UserError, match=r"not a column of the prompt rows \(columns: none\)"):
        CallableReward("m:fn", fn).score(["p"], ["x"])


def test_a_file_reward_reads_its_column(tmp_path):
    (tmp_path / "check.py").write_text(
        "def score(prompts, completions, answer):\n    return [float(a in c) for c, a in zip(completions, answer)]\n"
    )
    reward = CallableReward(f"{tmp_path / 'check.py'}:score")
    assert reward.score(["p", "q"], ["it is 4", "7"], COLUMNS).tolist() == [1.0, 0.0]


def test_weighted_rewards_pass_columns_to_whoever_takes_them():
    class TwoArg:
        """A source of one's own, written before columns existed."""

        name = "two-arg"

        def score(self, prompts, completions):
            return torch.ones(len(completions))

    def by_id(prompts, completions, id):
        return [float(i) for i in id]

    rewards = WeightedRewards(
        {"id": CallableReward("m:by_id", by_id), "two-arg": TwoArg(), "vader": VaderJudge()}, [1.0, 10.0, 1.0]
    )
    scores = rewards.score(["p", "q"], ["The film is long.", "It was released."], COLUMNS)
    assert rewards.last_parts["id"].tolist() == [2.0, 3.0]
    assert rewards.last_parts["vader"].tolist() == [0.0, 0.0]  # neutral text; VADER ignores the columns
    assert scores.tolist() == [12.0, 13.0]
    assert score_with_columns(TwoArg(), ["p"], ["x"], COLUMNS).tolist() == [1.0]


# ------------------------------------------------------------------------------------------ trainers


class AnswerRecorder:
    """``fn(prompts, completions, answer)`` recording every call's prompts and answers; scores the length."""

    def __init__(self):
        self.calls: list[tuple[list[str], list[str]]] = []

    def __call__(self, prompts, completions, answer):
        self.calls.append((prompts, answer))
        return [float(len(c)) for c in completions]


def test_rl_gives_each_completion_its_prompt_rows_answer(tmp_path, tiny_model_dir, qa_file):
    recorder = AnswerRecorder()
    cfg = RLConfig(
        prompts=str(qa_file),
        reward=["answers"],
        model=str(tiny_model_dir),
        output=str(tmp_path / "run"),
        max_steps=2,
        rollout_batch_size=2,
        num_generations=3,
        num_minibatches=1,
        ppo_epochs=1,
        max_new_tokens=3,
        precision="fp32",
        seed=0,
    )
    trainer = RLTrainer(cfg, reward_source=CallableReward("answers", recorder))
    trainer.train()
    assert len(recorder.calls) == 2
    for step, (prompts, answers) in enumerate(recorder.calls):
        idx = trainer.prompt_batch(step)
        assert answers == [f"a{i}" for i in idx for _ in range(3)]  # K = 3 consecutive rows per prompt
        assert prompts == [f"Q{i}: what is {i} + {i}?" for i in idx for _ in range(3)]


def test_ppo_rollout_gives_each_completion_its_prompt_rows_answer(tmp_path, tiny_model_dir, qa_file):
    recorder = AnswerRecorder()
    cfg = PPOConfig(
        prompts=str(qa_file),
        reward="answers",
        model=str(tiny_model_dir),
        output=str(tmp_path / "run"),
        max_steps=1,
        rollout_batch_size=2,
        num_minibatches=1,
        max_new_tokens=3,
        precision="fp32",
        seed=0,
    )
    trainer = PPOTrainer(cfg, reward_source=CallableReward("answers", recorder))
    trainer.prepare()
    trainer.rollout([5, 2], step=0, timing={})
    assert recorder.calls == [(["Q5: what is 5 + 5?", "Q2: what is 2 + 2?"], ["a5", "a2"])]


@pytest.mark.parametrize("trainer", ["ppo", "rl"])
def test_a_missing_column_is_refused_before_the_output_exists(tmp_path, tiny_model_dir, qa_file, trainer):
    def needs_solution(prompts, completions, solution):
        return [0.0] * len(completions)

    out = tmp_path / "run"
    common = dict(
        prompts=str(qa_file),
        model=str(tiny_model_dir),
        output=str(out),
        max_steps=1,
        rollout_batch_size=2,
        num_minibatches=1,
        max_new_tokens=3,
        precision="fp32",
    )
    if trainer == "ppo":
        run = PPOTrainer(PPOConfig(reward="m:fn", **common), reward_source=CallableReward("m:fn", needs_solution))
    else:  # inside the weighted sum, beside a source that takes no columns
        source = WeightedRewards({"vader": VaderJudge(), "m:fn": CallableReward("m:fn", needs_solution)}, [1.0, 1.0])
        run = RLTrainer(
            RLConfig(reward=["vader", "m:fn"], reward_weights=[1.0, 1.0], num_generations=2, **common),
            reward_source=source,
        )
    with pytest.raises(
        UserError,
        match=r"^reward function 'm:fn' needs 'solution', which is not a column of the "
        r"prompt rows \(columns: answer, id\)",
    ):
        run.train()
    assert not out.exists()
