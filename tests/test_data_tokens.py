"""Tokenisation once: special tokens, EOS, and the truncation policy (completions are never cut)."""

import pytest

from prefalign.data import (
    MIN_PROMPT_TOKENS,
    PreferenceExample,
    TokenizedPair,
    left_truncate,
    tokenize_preferences,
    tokenize_prompts,
    tokenize_sft,
    truncate_pairs,
)
from prefalign.data.tokens import fit_prompt, leading_bos
from prefalign.errors import UserError

PROMPT = list(range(101, 113))  # 12 prompt tokens


def _completion(n):
    return list(range(201, 200 + n)) + [2]  # n tokens, the last one EOS


def test_smollm2_adds_no_bos_and_completions_end_with_one_eos(tokenizer):
    assert leading_bos(tokenizer) is None
    examples = [
        PreferenceExample("Hello", " world", " there", 0.5),
        PreferenceExample("Hello", " world<|im_end|>", " there", None),  # already ends with EOS: not doubled
    ]
    pairs, report = tokenize_preferences(examples, tokenizer, max_length=16)
    assert pairs == [TokenizedPair([19556], [905, 2], [665, 2], 0.5), TokenizedPair([19556], [905, 2], [665, 2])]
    assert (report.total, report.dropped, report.truncated) == (2, 0, 0)


def test_prompt_over_max_prompt_length_keeps_its_end():
    pair = TokenizedPair(PROMPT, _completion(2), _completion(3))
    kept, report = truncate_pairs([pair], max_length=10)  # max_prompt_length = 10 // 2 = 5
    assert kept == [TokenizedPair([108, 109, 110, 111, 112], [201, 2], [201, 202, 2])]
    assert report.truncated == 1 and report.dropped == 0


def test_prompt_is_cut_further_to_fit_a_long_completion_down_to_the_floor():
    assert MIN_PROMPT_TOKENS == 8
    # max_length 20 -> prompt capped to its last 10; a 11-token completion leaves room for 9
    kept, report = truncate_pairs([TokenizedPair(PROMPT, _completion(11), _completion(3))], max_length=20)
    assert kept[0].prompt_ids == list(range(104, 113))
    assert kept[0].chosen_ids == _completion(11)  # never cut
    # a 13-token completion leaves room for 7 < 8 prompt tokens: dropped, not cut
    kept, report = truncate_pairs([TokenizedPair(PROMPT, _completion(3), _completion(13))], max_length=20)
    assert kept == [] and report.counts == {"too_long": 1}


def test_short_prompt_floor_is_its_own_length():
    short = [5, 6, 7]
    kept, _ = truncate_pairs([TokenizedPair(short, _completion(17), [2])], max_length=20)
    assert kept[0].prompt_ids == short
    kept, report = truncate_pairs([TokenizedPair(short, _completion(18), [2])], max_length=20)
    assert kept == [] and report.counts == {"too_long": 1}


def test_max_prompt_length_and_bos_survives_left_truncation():
    kept, _ = truncate_pairs([TokenizedPair(PROMPT, [2], [2])], max_length=100, max_prompt_length=3)
    assert kept[0].prompt_ids == [110, 111, 112]
    assert left_truncate([1, 5, 6, 7, 8], 3, bos=1) == [1, 7, 8]
    assert left_truncate([5, 6, 7, 8], 3, bos=1) == [6, 7, 8]
    with_bos = [1] + PROMPT  # 13 tokens: capped to [1, 103..112], then cut to the 10 that fit beside 2
    assert fit_prompt(with_bos, longest_completion=2, max_length=12, max_prompt_length=11, bos=1) == [1] + PROMPT[3:]


def test_all_too_long_is_an_error(tokenizer):
    with pytest.raises(UserError, match=r"all 1 rows were dropped.*too_long.*raise max_length"):
        tokenize_preferences([PreferenceExample("Hello", " world world world", " there")], tokenizer, max_length=3)


def test_tokenize_sft_shares_the_policy(tokenizer):
    rows, report = tokenize_sft(
        ["Q: one two three four five six", "Hello"], [" A", " world" * 30], tokenizer, max_length=8, max_prompt_length=6
    )
    assert [(r.prompt_ids, r.completion_ids) for r in rows] == [([582, 827, 1296, 1876, 2531, 2976], [330, 2])]
    assert report.counts == {"too_long": 1} and report.truncated == 1
    assert report.first["too_long"].startswith("example 2:")


def test_tokenize_sft_names_dropped_rows_by_file_and_line(tokenizer):
    rows, report = tokenize_sft(
        ["a", "b"], [" x", " word" * 30], tokenizer, max_length=8, wheres=["line 3", "line 7"], source="sft.jsonl"
    )
    assert [r.where for r in rows] == ["line 3"] and report.first["too_long"].startswith("line 7:")
    with pytest.raises(UserError, match=r"^sft\.jsonl: all 1 rows were dropped \(too_long 1, first at line 7\)"):
        tokenize_sft(["b"], [" word" * 30], tokenizer, max_length=8, wheres=["line 7"], source="sft.jsonl")


def test_tokenize_prompts_left_truncates(tokenizer):
    assert tokenize_prompts(["Q: one two three four five six", "Hello"], tokenizer, 3) == [[1876, 2531, 2976], [19556]]
