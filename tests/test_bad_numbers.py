"""Bad numbers and contradicting flags: exit 2, one line naming the flag, nothing written (as in
tests/test_bad_input.py, whose helpers run each command in-process through ``prefalign.cli.main``).

A non-finite number passes every range check written ``x <= 0``: before `prefalign.validation.require_finite`,
``--learning-rate inf`` trained an all-NaN model and exited 0, and ``compare --ppo-lr inf`` ran its stages before
failing in the summary."""

import pytest
from conftest import learnable_pairs, read_metrics, write_jsonl
from test_bad_input import _bad, _dpo, _ppo


@pytest.fixture()
def model(tiny_model_dir):
    return tiny_model_dir


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--learning-rate", "inf"], "--learning-rate must be a finite number, got inf"),
        (["--learning-rate", "nan"], "--learning-rate must be a finite number, got nan"),
        (["--max-grad-norm", "nan"], "--max-grad-norm must be a finite number, got nan"),
        (["--weight-decay", "nan"], "--weight-decay must be a finite number, got nan"),
        (["--epochs", "inf"], "--epochs must be a finite number, got inf"),
        (["--adam-betas", "0.9", "nan"], "--adam-betas must be a finite number, got (0.9, nan)"),
        (["--adam-betas", "1.5", "0.9"], "--adam-betas must each be in [0, 1), got 1.5 0.9"),
        (["--lora-r", "2", "--lora-alpha", "0"], "--lora-alpha must be > 0 (the update is scaled by alpha / r), got 0"),
        (["--lora-r", "4", "--lora-dropout", "1.5"], "--lora-dropout must be in [0, 1), got 1.5"),
        (["--resume", "latest", "--overwrite"], "--resume and --overwrite contradict each other"),
        # LoRA's own options without --lora-r: a full fine-tune ran and ignored them
        (["--lora-alpha", "8"], "--lora-alpha does nothing without LoRA (--lora-r 0: full fine-tuning)"),
        (["--warmup-steps", "-1"], "--warmup-steps must be >= 0, got -1"),
        (["--weight-decay", "-0.1"], "--weight-decay must be >= 0, got -0.1"),
        (["--lora-dropout", "0.1"], "--lora-dropout does nothing without LoRA (--lora-r 0: full fine-tuning)"),
        (["--lora-target-modules", "q_proj"], "--lora-target-modules does nothing without LoRA"),
        # no held-out set: the run evaluated nothing, exit 0
        (["--eval-steps", "1"], "--eval-steps 1 needs an evaluation set: give --eval-split or --eval-data"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_dpo_refuses(capsys, tmp_path, model, extra, needle):
    data = write_jsonl(tmp_path / "p.jsonl", learnable_pairs(4))
    _bad(capsys, tmp_path, _dpo(data, model, *extra), needle)


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--value-learning-rate", "-1"], "--value-learning-rate must be > 0, got -1.0"),
        (["--score-clip", "-1"], "--score-clip must be > 0, got -1.0"),
        (["--kl-coef", "nan"], "--kl-coef must be a finite number, got nan"),
        (["--reward", "vader"], "--reward given more than once; give it once"),  # ppo scores with one source
        (["--stop", "a", "--stop", "b"], "--stop given more than once; give it once (--stop A B)"),
        # on-policy: the update's log-probs must be those of the distribution that sampled
        (["--top-p", "0.9"], "--top-p 0.9 / --top-k 0: on-policy RL samples the full distribution at --temperature"),
        (["--top-k", "50"], "--top-p 1.0 / --top-k 50: on-policy RL samples the full distribution"),
        (["--lora-r", "4", "--lora-dropout", "0.1"], "--lora-dropout must be 0 in on-policy RL, got 0.1"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_ppo_refuses(capsys, tmp_path, model, extra, needle):
    _bad(capsys, tmp_path, _ppo(tmp_path, model, "vader", *extra), needle)


def test_rl_refuses_sampling_off_the_policy(capsys, tmp_path, model):
    argv = _ppo(tmp_path, model, "vader", "--num-generations", "2", "--top-p", "0.5")
    _bad(capsys, tmp_path, ["rl", *argv[1:]], "--top-p 0.5 / --top-k 0: on-policy RL samples the full distribution")
    argv = _ppo(tmp_path, model, "vader", "--num-generations", "2", "--lora-r", "2", "--lora-dropout", "0.05")
    _bad(capsys, tmp_path, ["rl", *argv[1:]], "--lora-dropout must be 0 in on-policy RL, got 0.05")


def test_rl_refuses_an_empty_reward_and_takes_repeated_ones(capsys, tmp_path, model):
    argv = _ppo(tmp_path, model, "vader", "--reward", "", "--num-generations", "2")
    _bad(capsys, tmp_path, ["rl", *argv[1:]], "--reward must not be empty: name a reward-model directory")
    argv = _ppo(tmp_path, model, "vader", "--reward-weights", "1", "--reward-weights", "2")  # list[float] | None
    _bad(
        capsys,
        tmp_path,
        ["rl", *argv[1:]],
        "--reward-weights given more than once; give it once (--reward-weights A B)",
    )
    argv = _ppo(tmp_path, model, "vader", "--reward", "vader", "--num-generations", "2")
    _bad(capsys, tmp_path, ["rl", *argv[1:]], "--reward given twice: vader vader")  # repeats collect, then checked


def test_sft_refuses_a_data_format_it_cannot_read(capsys, tmp_path, model):
    pairs = write_jsonl(tmp_path / "p.jsonl", learnable_pairs(4))
    sft = ["sft", "--model", model, "--max-steps", "1", "--batch-size", "2", "--precision", "fp32"]
    _bad(capsys, tmp_path, [*sft, "--data", pairs, "--data-format", "bogus"], "--data-format must be one of explicit")
    completions = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "a", "completion": " b"}] * 4)
    _bad(capsys, tmp_path, [*sft, "--data", completions, "--data-format", "implicit"], "c.jsonl", "drop --data-format")


def test_compare_refuses_an_infinite_rate_before_any_stage(capsys, tmp_path, model):
    _bad(capsys, tmp_path, ["compare", "--model", model, "--ppo-lr", "inf"], "--ppo-lr must be a finite number")


def test_compare_refuses_one_sample_per_prompt_before_its_directory(capsys, tmp_path, model):
    # a pair needs two completions: the race made its directory, then its pairs stage refused its --num-samples
    argv = ["compare", "--model", model, "--samples-per-prompt", "1"]
    _bad(capsys, tmp_path, argv, "--samples-per-prompt must be >= 2 (a pair needs two completions), got 1")


@pytest.mark.parametrize("option", ["--sweep-betas", "--sweep-kl-coefs"])
def test_compare_refuses_sweep_values_without_sweep(capsys, tmp_path, option):
    # the race ran without the sweep; --model is refused next, so a race that ignores the option never starts
    argv = ["compare", "--model", tmp_path / "not-a-model", option, "0.3"]
    _bad(capsys, tmp_path, argv, f"{option} does nothing without --sweep; add --sweep or drop {option}")


def test_compare_refuses_to_resume_a_directory_with_no_race(capsys, tmp_path, model):
    _bad(capsys, tmp_path, ["compare", "--model", model, "--resume"], "--resume:", "holds no comparison to resume")


@pytest.mark.parametrize(
    "argv,line",
    [
        (["dpo", "--bogus-flag", "3"], "error: Unrecognized options: --bogus-flag, 3; see prefalign dpo --help"),
        (
            ["dpo", "--batch-szie", "3"],
            "error: Unrecognized options: --batch-szie, 3 (did you mean --batch-size?); see prefalign dpo --help",
        ),
        (
            ["dpo", "--batch-size", "abc"],
            "error: Error parsing --batch-size: invalid literal for int() with base 10: 'abc'; "
            "see prefalign dpo --help",
        ),
        (
            ["prefs", "--pair-rule", "bogus"],
            "error: invalid choice 'bogus' for argument '--pair-rule'. Expected one of ('best_worst', 'all'); "
            "see prefalign prefs --help",
        ),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_the_parsers_own_refusals_are_one_line(capsys, tmp_path, argv, line):
    """tyro draws these as boxes of 5-9 lines; `prefalign.cli._args.parse` makes each one line."""
    from prefalign.cli import main

    assert main([*argv, "--output", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.splitlines() == [line]
    assert not (tmp_path / "out").exists()


def test_a_scalar_flag_given_twice_takes_the_last_value():
    """As argparse does, and as flags override a --config file: only list flags and ppo's --reward are refused."""
    from prefalign.cli._args import parse
    from prefalign.trainers.dpo import DPOConfig

    cfg = parse(DPOConfig, ["--data", "p.jsonl", "--beta", "0.1", "--beta", "0.2"], prog="prefalign dpo")
    assert cfg.beta == 0.2


def test_a_run_started_with_overwrite_resumes_through_its_config_file(tmp_path, model):
    """What an interrupted run prints: ``--config OUT/config.yaml --resume latest``. Its config.yaml holds the
    ``overwrite: true`` it started with: only --resume and --overwrite given together as flags are refused."""
    from prefalign.cli import main

    data = write_jsonl(tmp_path / "p.jsonl", learnable_pairs(8))
    out = tmp_path / "run"
    assert main([str(a) for a in _dpo(data, model, "--output", out, "--overwrite", "--save-steps", "1")]) == 0
    assert "overwrite: true" in (out / "config.yaml").read_text()
    assert main(["dpo", "--config", str(out / "config.yaml"), "--resume", "latest", "--max-steps", "2"]) == 0
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2]


def test_a_race_started_with_overwrite_resumes_through_its_config_file(capsys, tmp_path):
    """compare, as the trainers: its config.yaml keeps ``overwrite: true``; only the two flags together are refused."""
    from prefalign.cli._args import parse
    from prefalign.compare import CompareConfig

    config = tmp_path / "config.yaml"
    config.write_text(f"output: {tmp_path / 'race'}\noverwrite: true\n")
    cfg = parse(CompareConfig, ["--config", str(config), "--resume"], prog="prefalign compare")
    assert cfg.resume and cfg.overwrite
    _bad(capsys, tmp_path, ["compare", "--resume", "--overwrite"], "--resume and --overwrite contradict each other")


def test_a_coloured_parser_box_is_one_line_too(capsys, tmp_path, monkeypatch):
    """tyro colours its boxes when stdout is a terminal (as in any interactive shell): the codes go first."""
    import tyro._fmtlib

    from prefalign.cli import main

    monkeypatch.setattr(tyro._fmtlib, "_FORCE_ANSI", True)
    assert main(["dpo", "--batch-szie", "3", "--output", str(tmp_path / "out")]) == 2
    line = "error: Unrecognized options: --batch-szie, 3 (did you mean --batch-size?); see prefalign dpo --help"
    assert capsys.readouterr().err.splitlines() == [line]


def test_data_inspect_refuses_a_prompt_cap_over_the_length(capsys, tmp_path):
    """It reported rows dropped for a truncation policy no trainer would run (they refuse the same pair)."""
    from prefalign.cli import main

    data = write_jsonl(tmp_path / "p.jsonl", learnable_pairs(4))
    assert main(["data", "inspect", str(data), "--max-length", "10", "--max-prompt-length", "20"]) == 2
    line = "error: --max-prompt-length must be smaller than --max-length (as the trainers refuse it)"
    assert capsys.readouterr().err.splitlines() == [line]


def test_data_inspect_refuses_a_column_it_would_ignore(capsys, tmp_path):
    """--column is read from prompt-only files; on a pair file it was ignored (exit 0, the pairs inspected)."""
    from prefalign.cli import main

    data = write_jsonl(tmp_path / "p.jsonl", learnable_pairs(4))
    assert main(["data", "inspect", str(data), "--column", "question"]) == 2
    line = (
        f"error: {data}: --column 'question' names a prompt-only file's column, and this file holds explicit "
        "preference rows; drop --column, or add --format prompt to read that column as prompts"
    )
    assert capsys.readouterr().err.splitlines() == [line]
