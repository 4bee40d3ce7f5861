"""Each format and file type, parsed from small hand-made files into exact values."""

import copy
import gzip
import io
import json

import pytest

from prefalign.data import PreferenceExample, detect_format, load_preferences, load_prompts, read_table

ROWS = [
    {"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5", "margin": 1.5},
    {"prompt": "Say hi,\nplease", "chosen": ' "hi", friend', "rejected": " no", "margin": 0},
]
EXPECTED = [
    PreferenceExample("Q: 2+2?", " 4", " 5", 1.5),
    PreferenceExample("Say hi,\nplease", ' "hi", friend', " no", 0.0),
]
# the CSV form of ROWS: a quoted field with a comma and a newline, doubled quotes, margins as strings
CSV = 'prompt,chosen,rejected,margin\nQ: 2+2?, 4, 5,1.5\n"Say hi,\nplease"," ""hi"", friend", no,0\n'
SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def _jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_explicit_jsonl(tmp_path):
    examples, report = load_preferences(_write(tmp_path / "p.jsonl", _jsonl(ROWS)))
    assert examples == EXPECTED
    assert examples[1].where == "line 2"
    assert (report.total, report.kept, report.dropped) == (2, 2, 0)


def _parquet(rows) -> bytes:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


@pytest.mark.parametrize(
    "kind, where",
    [
        ("jsonl", ["line 1", "line 2"]),
        ("json", ["row 1", "row 2"]),
        ("csv", ["line 2", "line 3"]),
        ("parquet", ["row 1", "row 2"]),
    ],
)
def test_gzipped_files(tmp_path, kind, where):
    data = {
        "jsonl": lambda: _jsonl(ROWS).encode(),
        "json": lambda: json.dumps(ROWS, indent=2).encode(),
        "csv": lambda: CSV.encode(),
        "parquet": lambda: _parquet(ROWS),
    }[kind]()
    gz = tmp_path / f"p.{kind}.gz"
    gz.write_bytes(gzip.compress(data))
    assert read_table(gz).kind == kind
    examples, report = load_preferences(gz)
    assert examples == EXPECTED
    assert [e.where for e in examples] == where  # lines of the decompressed file
    assert (report.source, report.total) == (str(gz), 2)


def test_json_array_and_json_lines_in_a_json_file(tmp_path):
    assert load_preferences(_write(tmp_path / "p.json", json.dumps(ROWS, indent=2)))[0] == EXPECTED
    # a .json file holding JSON lines (what datasets' to_json writes) reads too
    assert load_preferences(_write(tmp_path / "lines.json", _jsonl(ROWS)))[0] == EXPECTED


def test_json_array_after_a_byte_order_mark(tmp_path):
    path = tmp_path / "p.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(ROWS, indent=2).encode())
    assert load_preferences(path)[0] == EXPECTED


def test_explicit_csv_with_quoting_and_string_margin(tmp_path):
    path = _write(tmp_path / "p.csv", CSV)
    examples, _ = load_preferences(path)
    assert examples == EXPECTED
    assert [e.where for e in examples] == ["line 2", "line 3"]  # the line where each record starts


def test_explicit_parquet(tmp_path):
    path = tmp_path / "p.parquet"
    path.write_bytes(_parquet(ROWS))
    assert load_preferences(path)[0] == EXPECTED


def test_implicit_transcripts(tmp_path):
    rows = [
        {
            "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke?\n\nAssistant: Knock knock.",
            "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke?\n\nAssistant: No.",
        }
    ]
    path = _write(tmp_path / "hh.jsonl", _jsonl(rows))
    assert detect_format(read_table(path)) == "implicit"
    examples, _ = load_preferences(path)
    assert examples == [
        PreferenceExample("\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke?\n\nAssistant:", " Knock knock.", " No.")
    ]


def test_conversational_without_prompt_column(tmp_path, tokenizer):
    user = {"role": "user", "content": "Hi"}
    rows = [
        {
            "chosen": [user, {"role": "assistant", "content": "Hello!"}],
            "rejected": [user, {"role": "assistant", "content": "Go away."}],
        }
    ]
    path = _write(tmp_path / "c.jsonl", _jsonl(rows))
    assert detect_format(read_table(path)) == "conversational"
    (ex,), _ = load_preferences(path, tokenizer)
    want_prompt = SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert ex == PreferenceExample(want_prompt, "Hello!<|im_end|>", "Go away.<|im_end|>")
    # the same text the template gives; only the newline after the final end-of-turn is left off
    assert ex.prompt == tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(rows[0]["chosen"], tokenize=False)
    assert full == ex.prompt + ex.chosen + "\n"


def test_conversational_with_prompt_column(tmp_path, tokenizer):
    rows = [
        {
            "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
            "chosen": [{"role": "assistant", "content": "4"}],
            "rejected": [{"role": "assistant", "content": "5"}],
        }
    ]
    (ex,), _ = load_preferences(_write(tmp_path / "c.jsonl", _jsonl(rows)), tokenizer)
    assert ex.prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert (ex.chosen, ex.rejected) == ("4<|im_end|>", "5<|im_end|>")


def test_whole_conversations_beside_a_prompt_column(tmp_path, tokenizer):
    # UltraFeedback's binarized rows: a prompt string, and chosen/rejected that repeat the user's turn
    user = {"role": "user", "content": "2+2?"}
    whole = {
        "chosen": [user, {"role": "assistant", "content": "4"}],
        "rejected": [user, {"role": "assistant", "content": "5"}],
    }
    rows = [
        {"prompt": "2+2?", **whole},
        {"prompt": [user], **whole},  # the prompt as the messages before the reply: the same pair
        {"prompt": "3+3?", **whole},  # a prompt that is not the conversation's: dropped, not guessed
    ]
    examples, report = load_preferences(_write(tmp_path / "uf.jsonl", _jsonl(rows)), tokenizer)
    want = PreferenceExample(
        SYSTEM + "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", "4<|im_end|>", "5<|im_end|>"
    )
    assert examples == [want, want]
    assert report.counts == {"prompt_column_mismatch": 1}
    assert report.first["prompt_column_mismatch"].startswith("line 3: the prompt column is neither")


def test_whole_conversation_with_a_message_after_the_reply_is_dropped(tmp_path, tokenizer):
    # the tail after the last assistant message would train the policy to write the user's next turn
    user, reply = {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}
    rows = [
        {"chosen": [user, reply], "rejected": [user, {"role": "assistant", "content": "5"}]},
        {"chosen": [user, reply], "rejected": [user, {"role": "assistant", "content": "5"}, user]},
    ]
    examples, report = load_preferences(_write(tmp_path / "t.jsonl", _jsonl(rows)), tokenizer)
    assert [(e.chosen, e.rejected) for e in examples] == [("4<|im_end|>", "5<|im_end|>")]
    assert report.counts == {"after_last_assistant": 1}
    assert report.first["after_last_assistant"] == "line 2: rejected has a user message after its last assistant one"


def test_conversation_with_no_words_before_the_reply_is_an_empty_prompt(tmp_path, tokenizer):
    rows = [
        {
            "prompt": [{"role": "user", "content": " "}],
            "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}],
        },
        {
            "prompt": [{"role": "user", "content": "q"}],
            "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}],
        },
    ]
    examples, report = load_preferences(_write(tmp_path / "c.jsonl", _jsonl(rows)), tokenizer)
    assert [e.where for e in examples] == ["line 2"] and report.counts == {"empty_prompt": 1}


def test_whitespace_after_an_end_of_turn_that_is_not_the_eos_is_left_off(tmp_path, tokenizer):
    # Gemma-style turns: <end_of_turn> closes a reply, the EOS is another token, and the template writes a newline
    turns = copy.deepcopy(tokenizer)
    turns.chat_template = (
        "{% for m in messages %}<start>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start>assistant\n{% endif %}"
    )
    assert turns.eos_token != "<end_of_turn>"
    rows = [
        {
            "prompt": [{"role": "user", "content": "hi"}],
            "chosen": [{"role": "assistant", "content": "yo"}],
            "rejected": [{"role": "assistant", "content": "no"}],
        }
    ]
    (ex,), _ = load_preferences(_write(tmp_path / "c.jsonl", _jsonl(rows)), turns)
    assert (ex.prompt, ex.chosen, ex.rejected) == (
        "<start>user\nhi<end_of_turn>\n<start>assistant\n",
        "yo<end_of_turn>",
        "no<end_of_turn>",
    )


def test_forced_format_overrides_detection(tmp_path):
    path = _write(
        tmp_path / "p.jsonl",
        _jsonl(
            [
                {
                    "prompt": "ignored",
                    "chosen": "\n\nHuman: a\n\nAssistant: b",
                    "rejected": "\n\nHuman: a\n\nAssistant: c",
                }
            ]
        ),
    )
    assert load_preferences(path)[0][0].prompt == "ignored"
    assert load_preferences(path, format="implicit")[0] == [PreferenceExample("\n\nHuman: a\n\nAssistant:", " b", " c")]


def test_prompts_from_files_and_lists(tmp_path, tokenizer):
    rows = [{"prompt": "The movie was"}, {"prompt": [{"role": "user", "content": "Hi"}]}]
    got = load_prompts(_write(tmp_path / "p.jsonl", _jsonl(rows)), tokenizer)
    assert got == ["The movie was", SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"]
    assert load_prompts(_write(tmp_path / "p.txt", "first \n\n  \nsecond\r\n")) == ["first ", "second"]
    assert load_prompts(_write(tmp_path / "q.csv", "text,x\nhello,1\n"), column="text") == ["hello"]
    wrapped = SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert load_prompts(["Hi"], tokenizer, chat=True) == [wrapped]
    assert load_prompts(["Hi"]) == ["Hi"]


def test_prompts_from_a_preference_file_are_its_pair_prompts(tmp_path):
    path = _write(tmp_path / "p.jsonl", _jsonl(ROWS))
    assert load_prompts(path) == ["Q: 2+2?", "Say hi,\nplease"]
    hh = _write(
        tmp_path / "hh.jsonl",
        _jsonl([{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}]),
    )
    assert load_prompts(hh) == ["\n\nHuman: a\n\nAssistant:"]
