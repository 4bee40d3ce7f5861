"""The shared real files, and a subprocess smoke run of ``prefalign data inspect``."""

import json
import os
import subprocess
import sys

import pytest
from conftest import HH_RLHF, RT_POLARITY

from prefalign.data import detect_format, load_preferences, load_prompts, read_table, tokenize_preferences

needs_hh = pytest.mark.skipif(not HH_RLHF.is_file(), reason=f"{HH_RLHF} not present")


@needs_hh
def test_hh_rlhf_harmless_test_split(tokenizer):
    assert detect_format(read_table(HH_RLHF)) == "implicit"
    examples, report = load_preferences(HH_RLHF)
    assert report.total == 2312
    # 4 rows whose chosen reply is empty ("...\n\nAssistant: " and nothing after), 4 whose chosen
    # transcript has extra "\n\nAssistant:" turns inside the final reply, so rejected does not share its prompt
    assert report.counts == {"empty_chosen": 4, "prompt_mismatch": 4}
    assert report.first["empty_chosen"].startswith("line 87:")
    assert report.first["prompt_mismatch"].startswith("line 1255:")
    assert len(examples) == report.kept == 2304
    assert all(e.prompt.endswith("\n\nAssistant:") and e.prompt.startswith("\n\nHuman:") for e in examples)
    assert all(e.chosen.strip() and e.rejected.strip() and e.chosen != e.rejected for e in examples)
    assert examples[0].chosen.startswith(" No, sorry!")
    pairs, _ = tokenize_preferences(examples[:50], tokenizer, max_length=256)
    assert all(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) <= 256 for p in pairs)
    assert all(p.chosen_ids[-1] == p.rejected_ids[-1] == tokenizer.eos_token_id for p in pairs)


@pytest.mark.skipif(not (RT_POLARITY / "rt-polarity.pos").is_file(), reason="rt-polarity not present")
def test_rt_polarity_is_plain_text_without_a_txt_extension():
    prompts = load_prompts(RT_POLARITY / "rt-polarity.pos")
    assert len(prompts) == 5331
    assert prompts[2] == "effective but too-tepid biopic"


def test_percentiles_are_nearest_rank():
    from prefalign.cli.data import percentiles

    assert percentiles(list(range(100, 0, -1))) == [50, 90, 99, 100]
    assert percentiles([7, 3]) == [3, 7, 7, 7]
    assert percentiles([]) == [None] * 4


def _run(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "prefalign", *args], capture_output=True, text=True, env=env, timeout=120
    )


@needs_hh
def test_cli_inspect_hh():
    out = _run("data", "inspect", str(HH_RLHF))
    assert out.returncode == 0, out.stderr
    assert "rows: 2312   kept: 2304   dropped: 8" in out.stdout.splitlines()


@needs_hh
def test_cli_inspect_hh_with_max_length():
    out = _run("data", "inspect", str(HH_RLHF), "--max-length", "512")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "format: implicit (detected)" in lines
    assert "rows: 2312   kept: 2301   dropped: 11" in lines
    assert any(line.strip().startswith("dropped 4 empty_chosen (first: line 87") for line in lines)
    assert any(line.strip().startswith("dropped 3 too_long") for line in lines)
    assert [line.split()[0] for line in lines[-3:]] == ["prompt", "chosen", "rejected"]


def test_cli_bad_file_is_one_error_line(tmp_path):
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_text('{"chosen": "a", "rejected": "b"}\n')
    out = _run("data", "inspect", str(bad))
    assert out.returncode == 2
    assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1, out.stderr
    assert str(bad) in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("rows", ['{"prompt": "p"}', '{"chosen": "a", "rejected": "b"}'])
def test_cli_inspect_names_the_prompt_column_asked_for(tmp_path, rows):
    data = tmp_path / "d.jsonl"
    data.write_text(rows + "\n")
    out = _run("data", "inspect", str(data), "--format", "prompt", "--column", "nope")
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith(f"error: {data}: missing column 'nope' (found columns: ")
    assert out.stderr.rstrip().endswith("pass --column with the name of the prompt column")


def test_cli_data_without_subcommand_prints_usage():
    out = _run("data")
    assert out.returncode == 2 and "inspect" in out.stdout


def test_cli_inspect_of_data_without_a_usable_row_exits_1(tmp_path):
    same = tmp_path / "same.jsonl"
    same.write_text('{"prompt": "p", "chosen": "a", "rejected": "a"}\n')  # chosen == rejected: dropped
    out = _run("data", "inspect", str(same))
    assert out.returncode == 1, out.stderr
    assert "warning: no usable rows: training on this data would stop with an error" in out.stdout.splitlines()


def _inspect(*args):
    from prefalign.cli.data import InspectConfig, inspect

    path, *rest = args
    flags = dict(zip([a.lstrip("-").replace("-", "_") for a in rest[::2]], rest[1::2]))
    typed = {k: int(v) if k.startswith("max") else v for k, v in flags.items()}
    return inspect(InspectConfig(path=str(path), **typed))


def test_inspect_reads_sft_rows_as_sft_does(tmp_path):
    """prompt/completion rows were reported as prompt-only data: their completions never counted or fitted."""
    rows = [{"prompt": "Say it:", "completion": " word" * (100 if i % 2 else 3)} for i in range(6)]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = _inspect(data, "--max-length", "64")
    assert lines[1] == "format: prompt-completion (detected: sft's rows)"
    assert lines[2] == "rows: 6   kept: 3   dropped: 3"
    assert lines[3].startswith("  dropped 3 too_long (first: line 2: prompt 3 + completion 101 tokens do not fit")
    assert [line.split()[0] for line in lines[-2:]] == ["prompt", "completion"]


def test_inspect_applies_a_prompt_cap_given_alone_to_prompt_only_data(tmp_path):
    """ppo, rl, generate and eval take --max-prompt-length alone; inspect reported no truncation without
    --max-length."""
    data = tmp_path / "p.txt"
    data.write_text("a b c d e f g h\nshort\n")
    assert "  1 prompts longer than 4 tokens would keep only their last 4" in _inspect(data, "--max-prompt-length", "4")


def test_inspect_reports_pairs_identical_as_tokens_and_exits_1(tmp_path, capsys):
    """Different texts, the same tokens (one ends in the EOS's text): inspect stopped with exit 2 and no report."""
    from prefalign.cli.data import main

    data = tmp_path / "same.jsonl"
    data.write_text(json.dumps({"prompt": "p", "chosen": " a", "rejected": " a<|im_end|>"}) + "\n")
    assert main(["inspect", str(data)]) == 1
    out = capsys.readouterr().out
    assert "  dropped 1 identical (first: line 1: chosen and rejected are the same tokens)" in out.splitlines()


@needs_hh
def test_inspect_format_prompt_reads_a_pair_file_s_prompts_as_ppo_does():
    lines = _inspect(HH_RLHF, "--format", "prompt")
    assert lines[1:3] == ["format: prompt (forced)", "rows: 2312   kept: 2304   dropped: 8"]
