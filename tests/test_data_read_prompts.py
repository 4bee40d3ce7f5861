"""`read_prompts`: the --prompts values of generate, prefs and eval (files or literal texts); each kind of empty
input is its own one-line UserError."""

import pytest

from prefalign.data import read_prompts
from prefalign.errors import UserError


def _error(values, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        read_prompts(values, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


def test_files_and_literals_in_the_order_given(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("the movie was\n\nthis film\n")  # the blank line is dropped
    assert read_prompts(["first", str(f), "last"]) == ["first", "the movie was", "this film", "last"]


def test_chat_wraps_literals_in_the_template(tokenizer):
    (text,) = read_prompts(["hello"], tokenizer, True)
    assert text.startswith("<|im_start|>") and "hello" in text and text.endswith("<|im_start|>assistant\n")


def test_no_values():
    assert _error([]) == "no prompts: give --prompts FILE or literal prompt texts"
    assert "--eval-prompts" in _error([], flag="--eval-prompts")


def test_empty_value_is_not_read_as_the_working_directory():
    msg = _error(["a prompt", ""])
    assert msg.startswith("--prompts: value 2 is empty")


def test_blank_value():
    assert _error(["   "]).startswith("--prompts: value 1 is empty")


def test_empty_file(tmp_path):
    f = tmp_path / "empty.txt"
    f.write_text("")
    assert _error(["a prompt", str(f)]).startswith(f"{f}: ")


def test_file_of_blank_lines(tmp_path):
    f = tmp_path / "blank.txt"
    f.write_text("\n   \n\n")
    assert _error([str(f)]).startswith(f"{f}: ")


def test_jsonl_whose_prompts_are_all_empty(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": ""}\n{"prompt": "  "}\n')
    msg = _error([str(f)])
    assert msg.startswith(f"{f}: ") and "empty_prompt" in msg


def test_directory(tmp_path):
    d = tmp_path / "prompts"
    d.mkdir()
    assert _error([str(d)]).startswith(f"{d}: ")


@pytest.mark.parametrize("value", ["missing.jsonl", "runs/x/prompts.txt", "data/neg", "prompts.csv.gz", "p.parquet"])
def test_a_missing_file_is_not_sampled_as_the_prompt_text(value, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()  # data/neg: a missing file in a directory that exists
    assert _error(["a prompt", value]) == (
        f"--prompts {value}: file not found; give an existing prompt file (.txt, .jsonl, .json, .csv, .parquet) "
        "or a prompt text"
    )


@pytest.mark.parametrize(
    "value", ["2+2=", "Hello.", "the file prompts.jsonl", "What is 1/2 of 4?", "3/4+1/4=", "and/or"]
)
def test_texts_that_are_not_paths_stay_prompts(value):
    assert read_prompts([value]) == [value]


def test_a_column_the_first_row_lacks_reaches_the_reward(tmp_path):
    from prefalign.data.prompts import load_prompt_rows

    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "1+1="}\n{"prompt": "2+2=", "answer": 4}\n')
    assert load_prompt_rows(str(f)) == (["1+1=", "2+2="], {"answer": [None, 4]})
