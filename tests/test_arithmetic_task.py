"""The arithmetic task (issue 14): its judge, the prompt rows' columns reaching the judges of ``eval`` and ``prefs``,
the packaged prompts and their generator, and ``prefalign compare --task``."""

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import run_cli, write_jsonl

from prefalign.errors import UserError
from prefalign.judges import ArithmeticJudge, first_integer
from prefalign.resources import make_arithmetic, movie_prefixes, resource_path
from prefalign.reward_mix import WeightedRewards, check_reward_columns
from prefalign.rewards import JUDGES, VaderJudge, load_reward_source, score_with_columns

# ------------------------------------------------------------------------------------------------ judge


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("71", "71", 1.0),  # right
        (" 71\n12 + 5 = 17", "71", 1.0),  # right, then the model goes on with another line
        (" 71 apples", "71", 1.0),
        (" 72", "71", 0.0),  # wrong number
        (" 7 1", "71", 0.0),  # the first integer is 7
        ("\n71", "71", 0.0),  # the number only on the second line
        (" is\n 71", "71", 0.0),
        (" -3", "-3", 1.0),  # negative
        (" 3", "-3", 0.0),
        (" -71", "71", 0.0),
        (" about -12 or so", -12, 1.0),  # an integer answer as well as a string one
        (" seventy-one", "71", 0.0),  # malformed: no number on the first line
        ("", "71", 0.0),  # empty
        ("   ", "71", 0.0),
        (" 71.", "71", 1.0),  # a full stop after the number
        (" 71.0", "71", 1.0),
        (" 71.5", "71", 0.0),  # a decimal is not the integer it starts with
        (" 70.99", "71", 0.0),
    ],
)
def test_arithmetic_judge_scores_the_first_integer_of_the_first_line(completion, answer, expected):
    scores = ArithmeticJudge().score(["23 + 48 ="], [completion], {"answer": [answer]})
    assert scores.dtype == torch.float32 and scores.tolist() == [expected]


def test_arithmetic_judge_scores_a_batch_against_each_rows_answer():
    judge = load_reward_source("arithmetic")
    assert isinstance(judge, ArithmeticJudge) and JUDGES["arithmetic"] is ArithmeticJudge
    scores = judge.score(["a", "b", "c"], [" 5", " 5", "\n"], {"answer": ["5", "6", "0"], "id": [1, 2, 3]})
    assert scores.tolist() == [1.0, 0.0, 0.0]
    assert first_integer(" 12 + 5 = 17") == 12 and first_integer("x-4y") == -4 and first_integer("none") is None


def test_arithmetic_judge_without_an_answer_column_is_one_line_error():
    judge = ArithmeticJudge()
    for columns in (None, {}, {"id": [7]}):
        with pytest.raises(UserError, match=r"judge 'arithmetic' needs an 'answer' column") as err:
            judge.score(["1 + 1 ="], [" 2"], columns)
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match=r"found columns: id\)"):
        judge.score(["1 + 1 ="], [" 2"], {"id": [7]})


@pytest.mark.parametrize("answer", [None, "7.5", "seven", True])
def test_arithmetic_judge_refuses_a_row_whose_answer_is_no_integer(answer):
    pattern = r"^judge 'arithmetic': the row of prompt '1 \+ 1 =' has answer .* not an integer; give every row"
    with pytest.raises(UserError, match=pattern):
        ArithmeticJudge().score(["1 + 1 ="], [" 2"], {"answer": [answer]})


def test_check_reward_columns_refuses_the_arithmetic_judge_without_the_column():
    for source in (ArithmeticJudge(), WeightedRewards({"arithmetic": ArithmeticJudge()}, [1.0])):
        with pytest.raises(UserError, match=r"judge 'arithmetic' needs an 'answer' column.*found columns: none"):
            check_reward_columns(source, {})
        check_reward_columns(source, {"answer": [], "id": []})  # present: nothing to refuse
    check_reward_columns(VaderJudge(), {})  # vader reads no column


def test_check_reward_columns_refuses_rows_that_lack_a_column_other_rows_have(tmp_path):
    # a prompt file whose first row has no answer: the column exists (later rows), the row's value is None
    from prefalign.data.prompts import load_prompt_rows

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "1 + 1 ="}\n{"prompt": "2 + 2 =", "answer": 4}\n{"prompt": "3 + 3 ="}\n')
    _, columns = load_prompt_rows(str(path))
    with pytest.raises(
        UserError,
        match=r"^judge 'arithmetic' needs 'answer' in every prompt row, but 2 of 3 lack "
        r"it \(the first: prompt 1\); give every row one$",
    ):
        check_reward_columns(ArithmeticJudge(), columns)


def test_score_with_columns_hands_the_answers_to_the_judge():
    assert score_with_columns(ArithmeticJudge(), ["p", "q"], [" 4", " 4"], {"answer": ["4", "5"]}).tolist() == [1, 0]


# ------------------------------------------------------------------------------- columns in eval / prefs


def _answer_judge(tmp_path) -> str:
    """A ``file.py:function`` judge whose score of a completion is 100 x its prompt row's answer + its length."""
    path = tmp_path / "answer_judge.py"
    path.write_text(
        "def score(prompts, completions, answer):\n"
        "    return [100 * int(a) + len(c) for c, a in zip(completions, answer)]\n"
    )
    return f"{path}:score"


@pytest.fixture()
def two_rows(tmp_path):
    return write_jsonl(
        tmp_path / "two.jsonl", [{"prompt": "3 + 4 =", "answer": "7"}, {"prompt": "1 + 2 =", "answer": "3"}]
    )


def test_read_prompt_rows_aligns_every_column_with_the_prompts(tmp_path, two_rows):
    from prefalign.data.prompts import read_prompt_rows

    other = write_jsonl(tmp_path / "other.jsonl", [{"prompt": "5 + 5 =", "id": 9}])
    prompts, columns = read_prompt_rows([str(two_rows), "a literal", str(other)])
    assert prompts == ["3 + 4 =", "1 + 2 =", "a literal", "5 + 5 ="]
    assert columns == {"answer": ["7", "3", None, None], "id": [None, None, None, 9]}
    assert read_prompt_rows(["only literal"]) == (["only literal"], {})


def test_eval_passes_each_samples_row_to_the_judge(tmp_path, tiny_model_dir, two_rows):
    from prefalign.eval.evaluate import EvalConfig, evaluate

    out = tmp_path / "eval"
    cfg = EvalConfig(
        policies=[f"same={tiny_model_dir}"],
        reference=str(tiny_model_dir),
        prompts=[str(two_rows)],
        judge=_answer_judge(tmp_path),
        proxy="arithmetic",
        chat=False,
        num_samples=2,
        max_new_tokens=4,
        output=str(out),
    )
    evaluate(cfg)
    rows = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    answers = {"3 + 4 =": 7, "1 + 2 =": 3}
    assert len(rows) == 8  # 2 policies x 2 prompts x 2 samples
    for row in rows:
        assert row["gold"] == 100 * answers[row["prompt"]] + len(row["completion"])
        assert row["proxy"] == float(first_integer(row["completion"]) == answers[row["prompt"]])


def test_eval_and_prefs_refuse_the_arithmetic_judge_without_answers_before_writing(tmp_path, tiny_model_dir):
    from prefalign.eval.evaluate import EvalConfig, evaluate
    from prefalign.eval.prefs import PrefsConfig, make_preferences

    no_answer = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "3 + 4 =", "id": 1}])
    for prompts in ([str(no_answer)], ["3 + 4 ="]):
        with pytest.raises(UserError, match=r"judge 'arithmetic' needs an 'answer' column"):
            evaluate(
                EvalConfig(
                    policies=[f"a={tiny_model_dir}"],
                    reference=str(tiny_model_dir),
                    prompts=prompts,
                    judge="vader",
                    proxy="arithmetic",
                    output=str(tmp_path / "eval"),
                )
            )
        with pytest.raises(UserError, match=r"judge 'arithmetic' needs an 'answer' column"):
            make_preferences(
                PrefsConfig(model=str(tiny_model_dir), prompts=prompts, judge="arithmetic", output=str(tmp_path / "p"))
            )
    assert not (tmp_path / "eval").exists() and not (tmp_path / "p").exists()


def test_prefs_passes_each_samples_row_to_the_judge(tmp_path, tiny_model_dir, two_rows):
    from prefalign.eval.prefs import PrefsConfig, make_preferences

    out = tmp_path / "prefs"
    cfg = PrefsConfig(
        model=str(tiny_model_dir),
        prompts=[str(two_rows)],
        judge=_answer_judge(tmp_path),
        chat=False,
        num_samples=4,
        max_new_tokens=6,
        pair_rule="all",
        output=str(out),
    )
    metrics = make_preferences(cfg)
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert metrics["pairs"] == len(pairs) >= 1
    answers = {"3 + 4 =": 7, "1 + 2 =": 3}
    for pair in pairs:
        assert pair["score_chosen"] == 100 * answers[pair["prompt"]] + len(pair["chosen"])
        assert pair["score_rejected"] == 100 * answers[pair["prompt"]] + len(pair["rejected"])


# ------------------------------------------------------------------------------------------- resources

_QUESTION = re.compile(r"(-?\d+) ([+-]) (-?\d+) =")


def _solve(line: str) -> int:
    a, op, b = _QUESTION.fullmatch(line).groups()
    return int(a) + int(b) if op == "+" else int(a) - int(b)


def _rows(split: str) -> list[dict]:
    text = resource_path(f"arithmetic_{split}.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


def test_arithmetic_prompts_count_disjoint_and_answers_right():
    train, heldout = _rows("train"), _rows("heldout")
    assert (len(train), len(heldout)) == (324, 100)
    prompts = [row["prompt"] for row in train + heldout]
    assert len(set(prompts)) == len(prompts)  # unique, so none is in both files
    questions = [p.rsplit("\n", 1)[1] for p in prompts]
    assert len(set(questions)) == len(questions)  # not even the question repeats
    for row in train + heldout:
        assert set(row) == {"prompt", "answer"} and isinstance(row["answer"], str)
        *shots, question = row["prompt"].split("\n")
        assert row["answer"] == str(_solve(question))
        assert len(shots) == make_arithmetic.SHOTS
        for shot in shots:  # the solved lines are right too: the policy learns nothing wrong from them
            left, right = shot.rsplit(" ", 1)
            assert int(right) == _solve(left)


def test_the_generator_rewrites_the_files_byte_for_byte(tmp_path):
    make_arithmetic.main(tmp_path)
    for split in ("train", "heldout"):
        name = f"arithmetic_{split}.jsonl"
        assert (tmp_path / name).read_bytes() == resource_path(name).read_bytes(), name
    assert make_arithmetic.make_rows(seed=1) != make_arithmetic.make_rows()  # the seed is what fixes them


# ---------------------------------------------------------------------------------------------- compare


def test_compare_task_resolves_its_judge_and_prompts():
    from prefalign.compare import CompareConfig
    from prefalign.compare.tasks import TASKS

    assert CompareConfig().resolved().judge == "vader" and CompareConfig().task == "sentiment"
    arithmetic = CompareConfig(task="arithmetic").resolved()
    assert arithmetic.judge == "arithmetic"
    assert (TASKS["arithmetic"].train, TASKS["arithmetic"].heldout) == (
        "arithmetic_train.jsonl",
        "arithmetic_heldout.jsonl",
    )
    assert CompareConfig(task="arithmetic", judge="my.py:fn").resolved().judge == "my.py:fn"  # the user's wins
    assert CompareConfig(task="arithmetic").judge is None  # resolved() fills a copy, the user's config stays
    with pytest.raises(ValueError, match=r"^--task must be one of sentiment, arithmetic, got 'chess'$"):
        CompareConfig(task="chess")


def test_compare_cli_refuses_an_unknown_task_with_one_line(tmp_path):
    r = run_cli("compare", "--task", "chess", "--output", tmp_path / "cmp")
    assert r.returncode == 2
    assert r.stderr.strip() == "error: --task must be one of sentiment, arithmetic, got 'chess'"
    assert not (tmp_path / "cmp").exists()


def test_compare_plan_uses_the_tasks_judge_everywhere():
    from prefalign.cli._args import parse
    from prefalign.compare import CompareConfig
    from prefalign.compare.plan import plan_stages

    cfg = parse(
        CompareConfig, ["--task", "arithmetic", "--arms", "ppo_gt", "dpo", "--output", "OUT"], prog="compare"
    ).resolved()
    judges = []
    for stage in plan_stages(cfg, Path("OUT"), Path("train.jsonl"), Path("heldout.jsonl")):
        args = [str(arg) for arg in stage.args]
        judges += [args[i + 1] for i, arg in enumerate(args) if arg in ("--judge", "--reward")]
    assert judges and set(judges) == {"arithmetic"}  # pairs, ppo_gt and eval: nothing else scores with the gold


@pytest.mark.parametrize("task", ["sentiment", "arithmetic"])
def test_compare_writes_the_tasks_prompts_with_every_column(tmp_path, tiny_model_dir, task):
    from prefalign.compare import CompareConfig, Comparison

    cfg = CompareConfig(task=task, preset="quick", model=str(tiny_model_dir), output=str(tmp_path / "cmp"))
    comparison = Comparison(cfg)
    train, heldout = comparison._write_prompts(tmp_path, comparison._prompt_rows())
    written = {path: [json.loads(line) for line in path.read_text().splitlines()] for path in (train, heldout)}
    n_train, n_heldout = cfg.resolved().num_prompts, cfg.resolved().eval_prompts
    if task == "arithmetic":
        assert written[train] == _rows("train")[:n_train] and written[heldout] == _rows("heldout")[:n_heldout]
    else:  # as before the task table: the prefixes alone
        assert written[train] == [{"prompt": p} for p in movie_prefixes("train")[:n_train]]
        assert written[heldout] == [{"prompt": p} for p in movie_prefixes("heldout")[:n_heldout]]
