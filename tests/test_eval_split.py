"""`prefalign.trainers.data.split_eval`: --eval-split holds out whole prompts, seeded, order kept."""

import pytest
import torch

from prefalign.data.tokens import TokenizedPair
from prefalign.errors import UserError
from prefalign.trainers.data import split_eval


def _pair(prompt: int, k: int) -> TokenizedPair:
    return TokenizedPair(prompt_ids=[prompt, prompt], chosen_ids=[k], rejected_ids=[k + 100])


def test_a_prompt_s_pairs_are_all_held_out_or_all_trained():
    # prompts 0..9 in order of first appearance, prompt p with p % 3 + 1 pairs, interleaved
    items = [_pair(p, k) for k in range(3) for p in range(10) if k <= p % 3]
    train, evals = split_eval(items, 0.3, seed=5)
    held = {x.prompt_ids[0] for x in evals}
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(5)).tolist()
    assert held == set(perm[:3])  # round(0.3 x 10 prompts), the seeded permutation of the prompts
    assert not held & {x.prompt_ids[0] for x in train}
    assert evals == [x for x in items if x.prompt_ids[0] in held]  # every pair of theirs, in file order
    assert train == [x for x in items if x.prompt_ids[0] not in held]


def test_one_pair_per_prompt_is_the_item_split():
    items = [_pair(p, 0) for p in range(20)]
    train, evals = split_eval(items, 0.25, seed=3)
    held = set(torch.randperm(20, generator=torch.Generator().manual_seed(3)).tolist()[:5])
    assert [x.prompt_ids[0] for x in evals] == sorted(held) and len(train) == 15


def test_the_seed_picks_the_prompts_and_zero_holds_none_out():
    items = [_pair(p, 0) for p in range(40)]
    assert split_eval(items, 0.1, seed=0)[1] != split_eval(items, 0.1, seed=1)[1]
    assert split_eval(items, 0.0, seed=0) == (items, [])
    assert len(split_eval(items[:3], 0.01, seed=0)[1]) == 1  # at least one prompt


def test_a_split_that_leaves_no_training_prompt_is_refused():
    items = [_pair(0, k) for k in range(6)] + [_pair(1, 0)]  # 7 pairs, 2 prompts
    with pytest.raises(UserError, match=r"^--eval-split 0.9 holds out 2 of 2 distinct prompts and leaves none"):
        split_eval(items, 0.9, seed=0)


def test_a_prompt_cut_differently_beside_longer_completions_stays_one_group():
    """A prompt's ids are cut to fit beside each completion: its pairs carry different prompt ids (20 and 12
    tokens here), and a split by ids sent them to both sides. The split goes by the prompt's text."""
    from prefalign.data.tokens import truncate_pairs

    text = [TokenizedPair(list(range(1, 21)), [7] * c, [8] * c, prompt="one") for c in (4, 12)]
    others = [TokenizedPair([50 + i] * 5, [7], [8], prompt=f"p{i}") for i in range(8)]
    kept, _ = truncate_pairs(text + others, max_length=24, max_prompt_length=20)
    assert [len(p.prompt_ids) for p in kept[:2]] == [20, 12]
    for seed in range(20):
        evals = split_eval(kept, 0.3, seed)[1]
        assert (kept[0] in evals) == (kept[1] in evals), seed
