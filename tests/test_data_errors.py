"""Bad input: one-line UserErrors naming the file and the row, or counted drops with exact counts."""

import gzip
import json

import pytest

from prefalign.data import load_preferences, load_prompts, tokenize_preferences
from prefalign.errors import UserError

OK = {"prompt": "p", "chosen": " a", "rejected": " b"}


def _jsonl(path, rows):
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


def _file_error(path, *parts, fn=load_preferences, **kwargs):
    msg = _error(fn, path, **kwargs)
    assert msg.startswith(f"{path}: "), msg
    for part in parts:
        assert part in msg, (part, msg)
    return msg


# --- errors: the whole input is unusable ---------------------------------------------------------------------


def test_missing_file(tmp_path):
    _file_error(tmp_path / "nope.jsonl", "file not found")


def test_hub_id_offline_is_a_clear_error():
    msg = _error(load_preferences, "nosuchorg/nosuchdata")
    assert msg.startswith("nosuchorg/nosuchdata: ") and "hub dataset" in msg and "offline" in msg


def test_gz_that_is_not_gzip(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl.gz", [OK])
    _file_error(path, "not gzip")


def test_truncated_gzip(tmp_path):
    path = tmp_path / "p.jsonl.gz"
    path.write_bytes(gzip.compress(json.dumps(OK).encode() * 50)[:30])
    _file_error(path, "corrupt or truncated gzip")


def test_gzip_data_without_gz_name(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(gzip.compress(json.dumps(OK).encode()))
    _file_error(path, "rename it to p.jsonl.gz")


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    _file_error(path, "empty")


def test_csv_header_without_rows(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt,chosen,rejected\n")
    _file_error(path, "no rows")


def test_unknown_format_lists_found_and_expected_columns(tmp_path):
    _file_error(
        _jsonl(tmp_path / "p.jsonl", [{"question": "q", "answer": "a"}]),
        "unknown format",
        "question, answer",
        "prompt+chosen+rejected",
        "chosen+rejected",
    )


def test_missing_column(tmp_path):
    _file_error(_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "a"}]), "missing column 'rejected'")


def test_missing_column_on_a_later_row(tmp_path):
    _file_error(_jsonl(tmp_path / "p.jsonl", [OK, {"prompt": "p", "chosen": "a"}]), "line 2", "'rejected'")


def test_forced_format_missing_column(tmp_path):
    _file_error(
        _jsonl(tmp_path / "p.jsonl", [{"chosen": "a", "rejected": "b"}]),
        "missing column 'prompt'",
        "format explicit needs",
        format="explicit",
    )


def test_bad_json_line(tmp_path):
    _file_error(_jsonl(tmp_path / "p.jsonl", [OK, '{"prompt": "p", "chosen": \n']), "line 2", "invalid JSON")


def test_bad_json_array(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('[\n{"prompt": "p"},\n{"prompt" "q"}\n]')
    _file_error(path, "line 3", "invalid JSON")


def test_json_line_that_is_not_an_object(tmp_path):
    _file_error(_jsonl(tmp_path / "p.jsonl", [OK, "[1, 2]\n"]), "line 2", "expected a JSON object")


def test_invalid_utf8(tmp_path):
    path = tmp_path / "p.jsonl"
    first = (json.dumps(OK) + "\n").encode()
    path.write_bytes(first + b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
    _file_error(path, "line 2", "invalid UTF-8", f"byte offset {len(first) + 15}")


@pytest.mark.parametrize(
    "name,lines",
    [
        ("p.jsonl", [json.dumps(OK).encode(), b'{"prompt": "caf\xe9"}']),
        ("p.csv", [b"prompt,chosen,rejected", b"caf\xe9, a, b"]),
        ("prompts.txt", [b"fine", b"caf\xe9"]),
    ],
)
def test_invalid_utf8_after_a_byte_order_mark_reports_the_file_offset(tmp_path, name, lines):
    """A UTF-8 BOM is skipped, but the byte offset in the error is still the offset in the file."""
    path = tmp_path / name
    data = b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n"
    path.write_bytes(data)
    _file_error(
        path,
        "line 2",
        "invalid UTF-8",
        f"byte offset {data.index(b'caf') + 3}",
        fn=load_prompts if name.endswith(".txt") else load_preferences,
    )


def test_invalid_utf8_in_text_prompts(tmp_path):
    path = tmp_path / "prompts.pos"
    path.write_bytes(b"fine\nnot \xff fine\n")
    _file_error(path, "line 2", "invalid UTF-8", "byte offset 9", fn=load_prompts)


def test_invalid_utf8_in_csv(tmp_path):
    path = tmp_path / "p.csv"
    head = b"prompt,chosen,rejected\np, a, b\n"
    path.write_bytes(head + b"caf\xe9, a, b\n")
    _file_error(path, "line 3", "invalid UTF-8 (byte 0xe9", f"byte offset {len(head) + 3}", "re-save the file as UTF-8")


def test_invalid_utf8_in_json_array(tmp_path):
    path = tmp_path / "p.json"
    head = b'[\n{"prompt": "p", "chosen": " a", "rejected": " b"},\n'
    path.write_bytes(head + b'{"prompt": "\xff", "chosen": " a", "rejected": " b"}\n]\n')
    _file_error(
        path, "line 3", "invalid UTF-8 (byte 0xff", f"byte offset {len(head) + 12}", "re-save the file as UTF-8"
    )


def test_directory_given_as_the_data_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.mkdir()
    _file_error(path, "is a directory", "give a data file")
    _file_error(path, "is a directory", fn=load_prompts)


def test_wrong_type(tmp_path):
    _file_error(
        _jsonl(tmp_path / "p.jsonl", [OK, {"prompt": "p", "chosen": 3, "rejected": "b"}]),
        "line 2",
        "'chosen' must be a string, got number",
    )


def test_csv_row_with_too_many_fields(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt,chosen,rejected\np,a,b\np,a,b,c\n")
    _file_error(path, "line 3", "more fields")


def test_json_file_holding_one_object_is_not_rows(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"train": [OK]}, indent=2))
    _file_error(path, "holds one JSON object (keys: 'train'), not rows", "an array of row objects")


def test_csv_header_naming_a_column_twice(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt,chosen,rejected,chosen\np,a,b,c\n")
    _file_error(path, "line 1", "the header names 'chosen' more than once")


def test_csv_rows_after_blank_lines_are_named_by_their_own_line(tmp_path):
    path = tmp_path / "p.csv"
    # line 3 has an empty chosen; line 6 opens a quoted prompt whose own blank line (7) is not a row boundary
    path.write_text('prompt,chosen,rejected\n\np,,b\n\n\n"q\n\nx",a,a\nr,a,b\n')
    examples, report = load_preferences(path)
    assert [e.where for e in examples] == ["line 9"]
    assert report.first == {
        "empty_chosen": "line 3: chosen reply is empty",
        "identical": "line 6: chosen and rejected are identical",
    }


def test_a_column_first_seen_on_a_later_row_is_a_column(tmp_path):
    # the margin on line 2 is not ignored: line 1 lacks it, so the file is refused at line 1
    path = _jsonl(tmp_path / "p.jsonl", [OK, dict(OK, margin=2.0)])
    _file_error(path, "line 1", "missing column 'margin' (the data has a margin column")


def test_a_prompt_column_first_seen_on_a_later_row_is_refused_on_the_row_without_it(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"chosen": "x", "rejected": "y"}, OK])
    _file_error(path, "line 1", "missing column 'prompt'")


def test_csv_header_with_trailing_commas_still_reads(tmp_path):
    # spreadsheet exports end rows with empty columns: '' twice is no column to overwrite
    path = tmp_path / "p.csv"
    path.write_text("prompt,chosen,rejected,,\np, a, b,,\n")
    assert [(e.prompt, e.chosen, e.rejected) for e in load_preferences(path)[0]] == [("p", " a", " b")]


def test_csv_line_numbers_ignore_unicode_line_separators(tmp_path):
    # U+2028 inside a field is no line break to the CSV reader: the next record still starts on line 3
    path = tmp_path / "p.csv"
    path.write_text('prompt,chosen,rejected\nx\u2028\u2028y, a, b\n"p\nq",,b\n', encoding="utf-8")
    _, report = load_preferences(path)
    assert report.first == {"empty_chosen": "line 3: chosen reply is empty"}


def test_conversational_row_without_the_prompt_other_rows_have(tmp_path, tokenizer):
    a, b = {"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}
    rows = [
        {"prompt": [{"role": "user", "content": "q"}], "chosen": [a], "rejected": [b]},
        {"chosen": [a], "rejected": [b]},
    ]
    _file_error(_jsonl(tmp_path / "c.jsonl", rows), "line 2: no 'prompt' (other rows have one)", tokenizer=tokenizer)


def test_pair_whose_completions_tokenise_alike_is_dropped(tmp_path, tokenizer):
    # " a" gets the EOS appended; " a<|im_end|>" already ends with it: both are [264, 2]
    rows = [OK, dict(OK, rejected=" a<|im_end|>")]
    examples, _ = load_preferences(_jsonl(tmp_path / "p.jsonl", rows))
    pairs, report = tokenize_preferences(examples, tokenizer, max_length=16, source="p.jsonl")
    assert [p.where for p in pairs] == ["line 1"] and report.counts == {"identical": 1}
    assert report.first["identical"] == "line 2: chosen and rejected are the same tokens"
    msg = _error(tokenize_preferences, examples[1:], tokenizer, 16, source="p.jsonl")
    assert msg == (
        "p.jsonl: all 1 rows were dropped (identical 1, first at line 2); fix the rows: a prompt needs tokens, and "
        "chosen and rejected must differ as token ids"
    )


def test_margin_not_a_number(tmp_path):
    _file_error(
        _jsonl(tmp_path / "p.jsonl", [dict(OK, margin=1), dict(OK, margin="big")]),
        "line 2",
        "'margin' must be a finite number",
    )


def _conv(chosen_last, rejected_last, user=None):
    user = user or {"role": "user", "content": "hi"}
    return {"chosen": [user, chosen_last], "rejected": [user, rejected_last]}


def test_bad_chat_role(tmp_path, tokenizer):
    path = _jsonl(tmp_path / "c.jsonl", [_conv({"role": "bot", "content": "a"}, {"role": "assistant", "content": "b"})])
    _file_error(path, "line 1", "'chosen' message 2", "unknown role 'bot'", tokenizer=tokenizer)


def test_chat_message_without_content(tmp_path, tokenizer):
    path = _jsonl(tmp_path / "c.jsonl", [_conv({"role": "assistant", "content": "a"}, {"role": "assistant"})])
    _file_error(path, "line 1", "'rejected' message 2 has no 'content'", tokenizer=tokenizer)


def test_chat_without_tokenizer(tmp_path):
    path = _jsonl(
        tmp_path / "c.jsonl", [_conv({"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"})]
    )
    _file_error(path, "needs a tokenizer")


def test_plain_text_is_not_preference_data(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("hello\n")
    _file_error(path, "plain-text")


def test_prompt_file_without_prompt_column(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"text": "hi"}])
    msg = _file_error(path, "missing column 'prompt'", "(found columns: text)", fn=load_prompts)
    hint = "rename the column that holds the prompts to 'prompt', or give a .txt file with one prompt per line"
    assert msg.endswith(f"; {hint}"), msg  # `column=` is no flag of generate, rl or ppo


def test_all_rows_dropped_is_an_error(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [dict(OK, chosen=" a", rejected=" a")] * 2)
    _file_error(path, "all 2 rows were dropped", "identical 2, first at line 1")


def test_strict_turns_a_drop_into_an_error(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [OK, dict(OK, chosen="  ")])
    _file_error(path, "line 2", "empty_chosen", strict=True)


# --- drops: counted, reported, not fatal ----------------------------------------------------------------------


def test_explicit_drops_are_counted_by_reason(tmp_path):
    rows = [
        OK,
        dict(OK, prompt=""),
        dict(OK, chosen=""),
        dict(OK, prompt=" \n"),
        dict(OK, rejected="  "),
        dict(OK, rejected=" a"),
        dict(OK, chosen=" b"),
        OK,
    ]
    examples, report = load_preferences(_jsonl(tmp_path / "p.jsonl", rows))
    assert len(examples) == 2 and (report.total, report.kept) == (8, 2)
    assert report.counts == {"empty_prompt": 2, "empty_chosen": 1, "empty_rejected": 1, "identical": 2}
    assert report.first["empty_prompt"].startswith("line 2:")
    assert report.first["identical"].startswith("line 6:")
    assert report.lines()[0] == "dropped 2 empty_prompt (first: line 2: prompt is empty)"
    assert report.summary() == (
        "8 rows, 2 kept, 6 dropped (empty_prompt 2, empty_chosen 1, empty_rejected 1, identical 2)"
    )


def test_implicit_drops(tmp_path):
    ok = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}
    rows = [
        ok,
        {"chosen": "Human: a Assistant: b", "rejected": "x"},
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: z\n\nAssistant: c"},
        {"chosen": "\n\nHuman: a\n\nAssistant: ", "rejected": "\n\nHuman: a\n\nAssistant: c"},
    ]
    examples, report = load_preferences(_jsonl(tmp_path / "hh.jsonl", rows))
    assert len(examples) == 1
    assert report.counts == {"no_assistant_turn": 1, "prompt_mismatch": 1, "empty_chosen": 1}
    assert [report.first[r].split(":")[0] for r in report.counts] == ["line 2", "line 3", "line 4"]


def test_conversational_drops(tmp_path, tokenizer):
    a = {"role": "assistant", "content": "a"}
    rows = [
        _conv(a, {"role": "assistant", "content": "b"}),
        _conv(a, {"role": "assistant", "content": "a"}),
        {"chosen": [{"role": "user", "content": "x"}, a], "rejected": [{"role": "user", "content": "y"}, a]},
        {"chosen": [{"role": "user", "content": "x"}], "rejected": [{"role": "user", "content": "x"}, a]},
        _conv({"role": "assistant", "content": " "}, a),
    ]
    examples, report = load_preferences(_jsonl(tmp_path / "c.jsonl", rows), tokenizer)
    assert len(examples) == 1
    assert report.counts == {"identical": 1, "prompt_mismatch": 1, "no_assistant_turn": 1, "empty_chosen": 1}


class _OddTemplate:
    """A tokenizer whose template renders a prompt differently on its own than inside a longer chat."""

    chat_template = "odd"
    eos_token = "</s>"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        text = "".join(f"[{m['role']}]{m['content']}" for m in messages)
        return ("<gen>" if add_generation_prompt else "<full>") + text


def test_template_prefix_mismatch_drop(tmp_path):
    rows = [_conv({"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"})]
    path = _jsonl(tmp_path / "c.jsonl", rows)
    with pytest.raises(UserError, match="template_prefix_mismatch 1, first at line 1"):
        load_preferences(path, _OddTemplate())


def test_too_long_drop_names_the_row(tmp_path, tokenizer):
    rows = [OK, dict(OK, chosen=" word" * 40), OK]
    examples, _ = load_preferences(_jsonl(tmp_path / "p.jsonl", rows))
    pairs, report = tokenize_preferences(examples, tokenizer, max_length=16)
    assert len(pairs) == 2 and report.counts == {"too_long": 1}
    assert report.first["too_long"].startswith("line 2: prompt 1 + completion 41 tokens")


def test_empty_prompts_are_dropped(tmp_path):
    prompts = load_prompts(_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": " "}, {"prompt": "b"}]))
    assert prompts == ["a", "b"]
    _file_error(
        _jsonl(tmp_path / "q.jsonl", [{"prompt": ""}]), "all 1 rows were dropped", "empty_prompt", fn=load_prompts
    )


def test_conversational_reply_holding_a_user_turn_is_dropped(tmp_path, tokenizer):
    # beside a prompt column, a chosen of [assistant, user, assistant] would train the policy to write the user's
    # turn; a whole conversation with a message after its reply is dropped already (after_last_assistant)
    user, a, b = ({"role": r, "content": c} for r, c in (("user", "more"), ("assistant", "a"), ("assistant", "b")))
    row = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [a], "rejected": [b]}
    rows = [row, row | {"chosen": [a, user, a]}, row | {"rejected": [b, user]}]
    examples, report = load_preferences(_jsonl(tmp_path / "c.jsonl", rows), tokenizer)
    assert [e.where for e in examples] == ["line 1"]
    assert report.counts == {"reply_not_assistant": 2}
    assert report.first["reply_not_assistant"] == "line 2: chosen holds a user message; a reply is assistant messages"
