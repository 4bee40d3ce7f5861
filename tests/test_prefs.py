import json

import pytest
from conftest import run_cli

from prefalign.eval.prefs import PrefsConfig, make_pairs, make_preferences, skip_reason


def _pair(chosen, rejected, sc, sr, prompt="p"):
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "score_chosen": sc, "score_rejected": sr}


def test_best_worst_is_one_pair_highest_vs_lowest_first_occurrence_on_ties():
    completions = ["a", "b", "c", "d", "e"]
    scores = [1.0, 3.0, -2.0, 3.0, -2.0]  # max at b and d, min at c and e: the first of each wins
    assert make_pairs("p", completions, scores, "best_worst") == [_pair("b", "c", 3.0, -2.0)]


def test_all_pairs_every_i_lt_j_with_the_higher_score_chosen():
    completions = ["a", "b", "c"]
    scores = [0.0, 2.0, 1.0]
    assert make_pairs("p", completions, scores, "all") == [
        _pair("b", "a", 2.0, 0.0),  # (0, 1)
        _pair("c", "a", 1.0, 0.0),  # (0, 2)
        _pair("b", "c", 2.0, 1.0),  # (1, 2)
    ]


def test_min_gap_is_strict():
    completions, scores = ["a", "b", "c"], [0.0, 1.0, 1.5]
    assert make_pairs("p", completions, scores, "all", min_gap=1.0) == [_pair("c", "a", 1.5, 0.0)]
    assert make_pairs("p", completions, scores, "best_worst", min_gap=1.5) == []
    assert make_pairs("p", completions, scores, "best_worst", min_gap=1.4) == [_pair("c", "a", 1.5, 0.0)]
    assert skip_reason(completions, scores, 1.5) == "small_gap"


def test_ties_give_no_pair():
    for rule in ("best_worst", "all"):
        assert make_pairs("p", ["a", "b", "c"], [0.5, 0.5, 0.5], rule) == []
    # a tie inside a larger set is skipped, the rest paired
    assert make_pairs("p", ["a", "b", "c"], [1.0, 1.0, 0.0], "all") == [
        _pair("a", "c", 1.0, 0.0),
        _pair("b", "c", 1.0, 0.0),
    ]
    assert skip_reason(["a", "b", "c"], [0.5, 0.5, 0.5], 0.0) == "tied"


def test_identical_and_blank_texts_are_never_paired():
    # a judge that scores the same text differently (random) must still not pair it with itself
    assert make_pairs("p", ["same", "same"], [1.0, 0.0], "best_worst") == []
    assert make_pairs("p", ["same", "same"], [1.0, 0.0], "all") == []
    assert skip_reason(["same", "same"], [1.0, 0.0], 0.0) == "no_distinct_text"
    # blank completions take no part (load_preferences would drop them): best/worst among the rest
    assert make_pairs("p", ["  ", "x", "yy"], [-5.0, 1.0, 2.0], "best_worst") == [_pair("yy", "x", 2.0, 1.0)]
    assert make_pairs("p", ["", "x"], [-5.0, 1.0], "all") == []
    assert skip_reason(["", "x"], [-5.0, 1.0], 0.0) == "no_distinct_text"


def test_make_pairs_checks_its_arguments():
    with pytest.raises(ValueError, match="2 completions but 1 scores"):
        make_pairs("p", ["a", "b"], [1.0], "all")
    with pytest.raises(ValueError, match="unknown pair rule"):
        make_pairs("p", ["a", "b"], [1.0, 0.0], "best")


def _length_judge(tmp_path):
    judge = tmp_path / "judge.py"
    judge.write_text("def score(prompts, completions):\n    return [float(len(c)) for c in completions]\n")
    return f"{judge}:score"


@pytest.mark.parametrize("rule", ["best_worst", "all"])
def test_prefs_end_to_end_pairs_load_and_counts_add_up(tmp_path, tiny_model_dir, tokenizer, rule):
    from prefalign.data import load_preferences

    prompts = ["the movie was", "this film", "a story about", "my cat"]
    cfg = PrefsConfig(
        model=str(tiny_model_dir),
        prompts=prompts,
        chat=False,
        judge=_length_judge(tmp_path),
        num_samples=4,
        max_new_tokens=6,
        batch_size=8,
        pair_rule=rule,
        seed=0,
        output=str(tmp_path / "out"),
    )
    m = make_preferences(cfg)
    out = tmp_path / "out"
    rows = [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(rows) == m["pairs"] >= 1
    assert all(r["score_chosen"] > r["score_rejected"] for r in rows)
    assert all(r["score_chosen"] == len(r["chosen"]) and r["score_rejected"] == len(r["rejected"]) for r in rows)
    assert all(r["chosen"] != r["rejected"] and r["prompt"] in prompts for r in rows)
    examples, report = load_preferences(out / "pairs.jsonl", format="explicit")
    assert [(e.prompt, e.chosen, e.rejected) for e in examples] == [
        (r["prompt"], r["chosen"], r["rejected"]) for r in rows
    ]
    assert report.dropped == 0
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == m
    assert m["prompts"] == 4 and m["completions"] == 16
    with_pairs = len({r["prompt"] for r in rows})
    assert m["prompts_with_pairs"] == with_pairs
    skipped = m["prompts_skipped_tied"] + m["prompts_skipped_small_gap"] + m["prompts_skipped_no_distinct_text"]
    assert with_pairs + skipped == 4
    if rule == "best_worst":
        assert m["pairs"] == with_pairs  # one per prompt
    assert 16 <= m["new_tokens"] <= 16 * 6
    assert (out / "config.yaml").is_file()


def test_prefs_cli_smoke(tmp_path, tiny_model_dir):
    out = tmp_path / "prefs"
    r = run_cli(
        "prefs",
        "--model",
        tiny_model_dir,
        "--prompts",
        "the movie was",
        "this film",
        "--no-chat",
        "--judge",
        _length_judge(tmp_path),
        "--num-samples",
        "3",
        "--max-new-tokens",
        "5",
        "--output",
        out,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["prompts"] == 2 and m["completions"] == 6
    assert len((out / "pairs.jsonl").read_text().splitlines()) == m["pairs"]
    assert (out / "config.yaml").is_file() and f"-> {m['pairs']} pairs" in r.stdout


def test_prefs_cli_refuses_one_sample_with_one_line(tmp_path, tiny_model_dir):
    r = run_cli(
        "prefs",
        "--model",
        tiny_model_dir,
        "--prompts",
        "x",
        "--judge",
        "vader",
        "--num-samples",
        "1",
        "--output",
        tmp_path / "x",
    )
    assert r.returncode == 2
    assert r.stderr.strip() == "error: --num-samples must be >= 2 (a pair needs two completions), got 1"
    assert not (tmp_path / "x").exists()
