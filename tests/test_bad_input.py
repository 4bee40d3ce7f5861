"""Every kind of bad input: exit code 2, one line naming the file / row / flag, no traceback, nothing written.

Commands run in-process through ``prefalign.cli.main`` (the same entry point as the console script);
one subprocess run at the end checks the real console behaviour.
"""

import pytest
from conftest import learnable_pairs, run_cli, write_jsonl

from prefalign.cli import main


def _bad(capsys, tmp_path, argv, *needles):
    out = tmp_path / "out"
    argv = [*map(str, argv)]
    code = main(argv if "--output" in argv else [*argv, "--output", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) >= 1
    line = err[-1]
    assert line.startswith("error: ") and "Traceback" not in "\n".join(err)
    for n in needles:
        assert n in line, (n, line)
    assert not out.exists(), "bad input must not leave an output directory"
    return line


@pytest.fixture()
def model(tiny_model_dir):
    return tiny_model_dir


def _dpo(data, model, *extra):
    return [
        "dpo",
        "--data",
        data,
        "--model",
        model,
        "--max-steps",
        "1",
        "--batch-size",
        "2",
        "--precision",
        "fp32",
        *extra,
    ]


def test_missing_file(capsys, tmp_path, model):
    _bad(capsys, tmp_path, _dpo(tmp_path / "nope.jsonl", model), "nope.jsonl")


def test_gzip_that_is_not_gzip(capsys, tmp_path, model):
    f = tmp_path / "pairs.jsonl.gz"
    f.write_text('{"prompt": "a"}\n')
    _bad(capsys, tmp_path, _dpo(f, model), "pairs.jsonl.gz")


def test_fewer_examples_than_one_global_batch(capsys, tmp_path, model):
    data = write_jsonl(tmp_path / "pairs.jsonl", learnable_pairs(3))
    argv = _dpo(data, model, "--grad-accum", "2")  # --batch-size 2
    line = _bad(capsys, tmp_path, argv)
    assert line == (
        "error: 3 training examples are fewer than one global batch (4 = batch_size 2 x grad_accum 2 x 1 processes); "
        "lower --batch-size"
    )


def test_empty_file(capsys, tmp_path, model):
    f = tmp_path / "empty.jsonl"
    f.write_text("")
    _bad(capsys, tmp_path, _dpo(f, model), "empty.jsonl")


@pytest.mark.parametrize("name", ["empty.txt", "empty.jsonl"])
def test_a_file_holding_only_a_bom_is_empty(capsys, tmp_path, model, name):
    """How some editors save an empty UTF-8 file: a prompt file of it gave 0 prompts, 0 pairs and exit 0."""
    f = tmp_path / name
    f.write_bytes(b"\xef\xbb\xbf\r\n")
    _bad(capsys, tmp_path, _ppo(tmp_path, model, "vader", "--prompts", str(f)), f"{name}: file is empty")


def test_unknown_format(capsys, tmp_path, model):
    f = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    _bad(capsys, tmp_path, _dpo(f, model), "odd.jsonl", "question")


def test_missing_column(capsys, tmp_path, model):
    f = write_jsonl(tmp_path / "half.jsonl", [{"prompt": "p", "chosen": "c"}])
    _bad(capsys, tmp_path, _dpo(f, model), "half.jsonl", "rejected")


def test_wrong_type(capsys, tmp_path, model):
    f = write_jsonl(tmp_path / "types.jsonl", [{"prompt": "p", "chosen": 3, "rejected": "r"}])
    _bad(capsys, tmp_path, _dpo(f, model), "types.jsonl", "line 1")


def test_bad_json_line(capsys, tmp_path, model):
    f = tmp_path / "broken.jsonl"
    f.write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n{"prompt": oops}\n')
    _bad(capsys, tmp_path, _dpo(f, model), "broken.jsonl", "line 2")


def test_only_empty_strings(capsys, tmp_path, model):
    f = write_jsonl(tmp_path / "blank.jsonl", [{"prompt": "p", "chosen": "", "rejected": "r"}] * 3)
    _bad(capsys, tmp_path, _dpo(f, model), "blank.jsonl")


def test_chosen_identical_to_rejected(capsys, tmp_path, model):
    f = write_jsonl(tmp_path / "same.jsonl", [{"prompt": "p", "chosen": "x", "rejected": "x"}] * 3)
    _bad(capsys, tmp_path, _dpo(f, model), "same.jsonl")


def test_invalid_utf8(capsys, tmp_path, model):
    f = tmp_path / "latin1.jsonl"
    f.write_bytes(b'{"prompt": "caf\xe9", "chosen": "c", "rejected": "r"}\n')
    _bad(capsys, tmp_path, _dpo(f, model), "latin1.jsonl", "UTF-8")


def test_chat_message_with_unknown_role(capsys, tmp_path, model):
    def msgs(text):
        return [{"role": "user", "content": "hi"}, {"role": "robot", "content": text}]

    f = write_jsonl(tmp_path / "chat.jsonl", [{"chosen": msgs("a"), "rejected": msgs("b")}])
    _bad(capsys, tmp_path, _dpo(f, model), "chat.jsonl", "robot")


def test_chat_message_without_content(capsys, tmp_path, model):
    bad = [{"role": "user", "content": "hi"}, {"role": "assistant"}]
    ok = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "b"}]
    f = write_jsonl(tmp_path / "chat.jsonl", [{"chosen": bad, "rejected": ok}])
    _bad(capsys, tmp_path, _dpo(f, model), "chat.jsonl", "content")


def test_everything_longer_than_max_length(capsys, tmp_path, model):
    long = " ".join(["word"] * 300)
    f = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "p", "chosen": long, "rejected": long + " x"}] * 3)
    _bad(capsys, tmp_path, _dpo(f, model, "--max-length", "64"), "max_length")


def _sft(data, model):
    return ["sft", "--data", data, "--model", model, "--max-steps", "1", "--batch-size", "1", "--precision", "fp32"]


def test_sft_row_without_a_completion_names_the_missing_column(capsys, tmp_path, model):
    f = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "p", "completion": "c"}, {"prompt": "q"}])
    _bad(capsys, tmp_path, _sft(f, model), "sft.jsonl: line 2: missing column 'completion'")


def test_sft_completion_of_the_wrong_type_names_the_field_and_its_type(capsys, tmp_path, model):
    f = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "p", "completion": "c"}, {"prompt": "q", "completion": 3}])
    _bad(capsys, tmp_path, _sft(f, model), "sft.jsonl: line 2: 'completion' must be a string, got number")


def test_sft_data_without_a_completion_column_says_what_sft_reads(capsys, tmp_path, model):
    f = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "p", "response": "r"}])
    line = _bad(capsys, tmp_path, _sft(f, model), "sft.jsonl", "found columns: prompt, response")
    assert "prompt and completion" in line and "prompt-only" not in line, line


def test_model_that_does_not_exist(capsys, tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", learnable_pairs(4))
    _bad(capsys, tmp_path, _dpo(f, "no-such-model"), "no-such-model")


def test_directory_that_is_not_a_model(capsys, tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", learnable_pairs(4))
    (tmp_path / "notamodel").mkdir()
    _bad(capsys, tmp_path, _dpo(f, tmp_path / "notamodel"), "notamodel", "config.json")


def _dpo_given_as(tmp_path, model, given, flag):
    """A dpo command line with ``given`` as its ``flag`` (--model or --ref), ``model`` as the other."""
    f = write_jsonl(tmp_path / "p.jsonl", learnable_pairs(4))
    return _dpo(f, given, "--ref", model) if flag == "--model" else _dpo(f, model, "--ref", given)


@pytest.mark.parametrize("role", ["dpo --model", "dpo --ref", "ppo --model", "ppo --reward", "ppo --value-model"])
def test_a_lora_adapter_where_a_whole_model_is_needed_says_so(capsys, tmp_path, model, tiny_reward_model_dir, role):
    """A LoRA run's final/ (adapter_config.json, no config.json) given to a trainer or as a reward model: one line
    saying it is an adapter and what to give instead (it said "not a model directory (no config.json)")."""
    adapter = tmp_path / "lora-final"
    adapter.mkdir()
    task = "SEQ_CLS" if role.endswith(("--reward", "--value-model")) else "CAUSAL_LM"
    (adapter / "adapter_config.json").write_text(f'{{"base_model_name_or_path": "{model}", "task_type": "{task}"}}')
    command, flag = role.split()
    if command == "dpo":
        argv = _dpo_given_as(tmp_path, model, adapter, flag)
    elif flag == "--model":
        argv = _ppo(tmp_path, adapter, tiny_reward_model_dir)
    elif flag == "--reward":
        argv = _ppo(tmp_path, model, adapter)
    else:
        argv = _ppo(tmp_path, model, tiny_reward_model_dir, flag, adapter)
    _bad(capsys, tmp_path, argv, f"{adapter}: a LoRA adapter, not a whole model", "final-merged/")


@pytest.mark.parametrize("role", ["dpo --model", "dpo --ref", "ppo --model", "generate --model"])
def test_a_reward_model_where_a_causal_lm_is_needed_says_so(capsys, tmp_path, model, tiny_reward_model_dir, role):
    """A reward model's final/ as a policy or reference: it loaded as a causal LM (its score head dropped, the tied
    LM head over its backbone) and sampled or trained without a word; now one line."""
    rm = tiny_reward_model_dir
    command, flag = role.split()
    if command == "dpo":
        argv = _dpo_given_as(tmp_path, model, rm, flag)
    elif command == "ppo":
        argv = _ppo(tmp_path, rm, rm)
    else:
        (tmp_path / "prompts.txt").write_text("a film\n")
        argv = ["generate", "--model", rm, "--prompts", tmp_path / "prompts.txt", "--max-new-tokens", "2"]
    _bad(capsys, tmp_path, argv, f"{rm}: a scalar-head model (a reward or value model), not a causal LM")


def _ppo(tmp_path, model, reward, *extra):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a film\nthe plot\nthe cast\nits score\n")
    return [
        "ppo",
        "--prompts",
        prompts,
        "--reward",
        reward,
        "--model",
        model,
        "--max-steps",
        "1",
        "--rollout-batch-size",
        "2",
        "--max-new-tokens",
        "2",
        "--precision",
        "fp32",
        *extra,
    ]


def test_reward_model_whose_head_is_not_scalar(capsys, tmp_path, model, tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_labels=3,
        pad_token_id=tokenizer.pad_token_id,
    )
    rm = tmp_path / "rm3"
    LlamaForSequenceClassification(cfg).save_pretrained(rm)
    tokenizer.save_pretrained(rm)
    _bad(capsys, tmp_path, _ppo(tmp_path, model, rm), "rm3")


@pytest.mark.parametrize(
    "body,needle",
    [
        ("raise RuntimeError('judge exploded')", "judge exploded"),
        ("return [1.0]", "returned 1 scores for 2 completions"),
        ("return [float('nan')] * len(completions)", "non-finite score"),
    ],
)
def test_reward_function_faults(capsys, tmp_path, model, body, needle):
    judge = tmp_path / "judge.py"
    judge.write_text(f"def score(prompts, completions):\n    {body}\n")
    _bad(capsys, tmp_path, _ppo(tmp_path, model, f"{judge}:score"), "judge.py:score", needle)


def test_conflicting_flags(capsys, tmp_path, model):
    f = write_jsonl(tmp_path / "p.jsonl", learnable_pairs(4))
    _bad(capsys, tmp_path, _dpo(f, model, "--lora-r", "4", "--ref", model), "--ref", "LoRA")


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--beta", "-0.1"], "--beta"),
        (["--batch-size", "0"], "--batch-size"),
        (["--learning-rate", "0"], "--learning-rate"),
        (["--eval-split", "1.5"], "--eval-split"),
    ],
)
def test_invalid_numbers(capsys, tmp_path, model, argv, needle):
    f = write_jsonl(tmp_path / "p.jsonl", learnable_pairs(4))
    _bad(capsys, tmp_path, [*_dpo(f, model), *argv], needle)


def test_clip_range_of_one_or_more(capsys, tmp_path, model):
    _bad(capsys, tmp_path, _ppo(tmp_path, model, "vader", "--clip-eps", "1.0"), "--clip-eps")


def test_output_directory_of_another_run(capsys, tmp_path, model):
    f = write_jsonl(tmp_path / "p.jsonl", learnable_pairs(4))
    out = tmp_path / "taken"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    code = main([str(a) for a in _dpo(f, model, "--output", out)])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "--overwrite" in line and "--resume" in line
    assert (out / "metrics.jsonl").read_text() == "{}\n"  # untouched


def test_yaml_config_with_an_unknown_key(capsys, tmp_path, model):
    cfg = tmp_path / "dpo.yaml"
    cfg.write_text("beta: 0.1\nlearning_rat: 1e-5\n")
    f = write_jsonl(tmp_path / "p.jsonl", learnable_pairs(4))
    argv = _dpo(f, model)
    _bad(capsys, tmp_path, [argv[0], "--config", cfg, *argv[1:]], "dpo.yaml", "learning_rat")


def test_csv_row_with_missing_field_names_the_row(capsys, tmp_path, model):
    f = tmp_path / "p.csv"
    f.write_text("prompt,chosen,rejected\na,b,c\nd,e\n")
    _bad(capsys, tmp_path, _dpo(f, model), "p.csv")


def test_console_script_prints_one_line_and_exits_2(tmp_path, model):
    r = run_cli(*_dpo(tmp_path / "missing.jsonl", model), "--output", tmp_path / "o")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: ") and "missing.jsonl" in r.stderr
    assert not (tmp_path / "o").exists()
