import json

import pytest
from conftest import run_cli


def test_generate_smoke_from_file_and_literal(tmp_path, tiny_model_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the movie was\n\nthis film\n")  # blank line skipped
    out = tmp_path / "gen"
    r = run_cli(
        "generate",
        "--model",
        tiny_model_dir,
        "--prompts",
        prompts,
        "a literal prompt",
        "--no-chat",
        "--num-samples",
        "2",
        "--max-new-tokens",
        "5",
        "--batch-size",
        "4",
        "--output",
        out,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["the movie was"] * 2 + ["this film"] * 2 + ["a literal prompt"] * 2
    assert [r["sample"] for r in rows] == [0, 1] * 3
    assert all(1 <= r["num_tokens"] <= 5 and isinstance(r["completion"], str) for r in rows)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["completions"] == 6 and metrics["new_tokens"] == sum(r["num_tokens"] for r in rows)
    assert (out / "config.yaml").is_file()
    # a second run into the same directory is refused, with one line
    again = run_cli("generate", "--model", tiny_model_dir, "--prompts", "x", "--output", out)
    assert again.returncode == 2 and "not empty" in again.stderr and "Traceback" not in again.stderr
    assert "pass --overwrite" in again.stderr and "--resume" not in again.stderr  # generate has no --resume


def test_generate_chat_mode_wraps_prompts_in_the_template(tmp_path, tiny_model_dir):
    out = tmp_path / "chat"
    r = run_cli(
        "generate",
        "--model",
        tiny_model_dir,
        "--prompts",
        "hello",
        "--max-new-tokens",
        "2",
        "--greedy",
        "--output",
        out,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    row = json.loads((out / "generations.jsonl").read_text().splitlines()[0])
    assert row["prompt"].startswith("<|im_start|>") and row["prompt"].endswith("<|im_start|>assistant\n")
    assert "hello" in row["prompt"]


def test_generate_bad_number_is_one_line(tmp_path, tiny_model_dir):
    r = run_cli("generate", "--model", tiny_model_dir, "--top-p", "0", "--output", tmp_path / "x")
    assert r.returncode == 2 and r.stderr.strip() == "error: --top-p must be in (0, 1], got 0.0"
    assert not (tmp_path / "x").exists()  # nothing half-written


def test_generate_stop_cuts_the_row_that_hits_it_and_ends_it(tmp_path, tiny_model_dir, tokenizer):
    from prefalign.cli.generate import GenerateConfig, run

    prompts = ["the movie was", "this film"]
    common = ["--model", tiny_model_dir, "--prompts", *prompts, "--no-chat", "--greedy", "--max-new-tokens", "12"]
    # the same greedy run without a stop string, for what the stopped run must be a prefix of
    base = run(
        GenerateConfig(
            model=str(tiny_model_dir),
            prompts=prompts,
            chat=False,
            greedy=True,
            max_new_tokens=12,
            output=str(tmp_path / "base"),
        )
    )
    stop = "anci"
    # the fixture model (seed 0) repeats ' film' 5 times, then ' anci': the stop is hit mid-completion by one row only
    assert stop not in base[0]["completion"] and base[1]["completion"].find(stop) > 0, base
    assert not base[1]["ended"] and base[1]["num_tokens"] == 12

    out = tmp_path / "stop"
    r = run_cli("generate", *common, "--stop", stop, "--batch-size", "2", "--output", out)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    assert rows[0] == base[0]  # no stop string in it: untouched, in the same batch as a row that stopped
    cut = base[1]["completion"][: base[1]["completion"].find(stop)]
    assert rows[1]["completion"] == cut  # the stop string and everything after it are gone
    assert rows[1]["ended"] is True
    # the response ends with the token that completed the stop string, not later (nor padded on to 12)
    assert rows[1]["num_tokens"] == len(tokenizer(cut + stop, add_special_tokens=False).input_ids) < 12
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eos_rate"] == 0.5


PROMPTS = ["the movie was", "I watched it twice and honestly", "this film"]  # unequal lengths: padding differs


def _run(tmp_path, tiny_model_dir, name, **kwargs):
    from prefalign.cli.generate import GenerateConfig, run

    base = dict(
        model=str(tiny_model_dir),
        prompts=PROMPTS,
        chat=False,
        num_samples=2,
        max_new_tokens=8,
        output=str(tmp_path / name),
    )
    return run(GenerateConfig(**{**base, **kwargs}))


@pytest.mark.parametrize(
    "sampling",
    [{"temperature": 1.0}, {"temperature": 0.8, "top_k": 50, "top_p": 0.9}, {"temperature": 1.0, "stop": ["e"]}],
    ids=["plain", "top-k-top-p", "stop"],
)
def test_sampled_generations_do_not_depend_on_the_batch_size(tmp_path, tiny_model_dir, sampling):
    """Keyed sampling: 6 completions in batches of 1, 3 (3 + 3) and 4 (4 + 2) are the same rows."""
    runs = {b: _run(tmp_path, tiny_model_dir, f"b{b}", batch_size=b, **sampling) for b in (1, 3, 4)}
    assert runs[1] == runs[3] == runs[4]
    assert len({r["completion"] for r in runs[1]}) > 1  # they are samples, not one repeated text
    other_seed = _run(tmp_path, tiny_model_dir, "seed1", batch_size=3, seed=1, **sampling)
    assert [r["completion"] for r in other_seed] != [r["completion"] for r in runs[1]]


def test_greedy_generations_are_the_backend_greedy_decode(tmp_path, tiny_model_dir, tokenizer):
    """--greedy through the keyed sampler is what one unkeyed greedy `generate` call gives (as before)."""
    from prefalign.data import PromptCollator, tokenize_prompts
    from prefalign.models import load_causal_lm
    from prefalign.rollout import SamplingConfig, eos_token_ids, generate

    rows = _run(tmp_path, tiny_model_dir, "greedy", greedy=True, num_samples=1, batch_size=3)
    model = load_causal_lm(str(tiny_model_dir))
    batch = PromptCollator(tokenizer.pad_token_id)(tokenize_prompts(PROMPTS, tokenizer, 512))
    gen = generate(
        model,
        batch["input_ids"],
        batch["attention_mask"],
        SamplingConfig(max_new_tokens=8, greedy=True),
        eos_ids=eos_token_ids(model, tokenizer),
        pad_id=tokenizer.pad_token_id,
    )
    want = tokenizer.batch_decode(gen.response_ids, skip_special_tokens=True)
    assert [r["completion"] for r in rows] == want
    assert [r["num_tokens"] for r in rows] == gen.response_mask.sum(1).tolist()
    assert [r["prompt"] for r in rows] == PROMPTS and [r["sample"] for r in rows] == [0, 0, 0]


def test_no_prompts_samples_the_built_in_ones(tmp_path, tiny_model_dir):
    from prefalign.cli.generate import BUILTIN_PROMPTS

    rows = _run(tmp_path, tiny_model_dir, "builtin", prompts=[], num_samples=1, max_new_tokens=2, greedy=True)
    assert [r["prompt"] for r in rows] == BUILTIN_PROMPTS


def test_a_prompt_file_without_a_prompt_column_says_what_to_do(tmp_path, tiny_model_dir):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"text": "hi"}\n')
    r = run_cli("generate", "--model", tiny_model_dir, "--prompts", prompts, "--output", tmp_path / "gen")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr[-2000:]
    assert f"{prompts}: missing column 'prompt' (found columns: text); rename the column" in r.stderr
    assert "column=" not in r.stderr  # not a flag of generate, rl or ppo


def test_a_stopped_run_leaves_no_directory_and_an_overwrite_that_fails_leaves_the_old_run(
    tmp_path, tiny_model_dir, monkeypatch
):
    """config.yaml was written before sampling: Ctrl-C left it alone in a new directory (a rerun was refused as
    "not empty"), and a failed --overwrite left it beside the previous run's outputs, naming other settings."""
    import prefalign.eval.sampling as sampling
    from prefalign.cli import main

    out = tmp_path / "gen"
    args = ["generate", "--model", str(tiny_model_dir), "--prompts", "a film", "--max-new-tokens", "2", "--output"]
    assert main([*args, str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(sampling, "sample_completions", stop)
    assert main([*args, str(tmp_path / "new")]) == 130  # "interrupted"
    assert not (tmp_path / "new").exists()
    assert main([*args, str(out), "--overwrite", "--max-new-tokens", "3"]) == 130
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name in before} == before
