"""DAPO's refill of groups of equal scores (`prefalign/trainers/refill.py`) on hand-made groups: which slot gets
which round's group, the tensors of the assembled batch, the stats, and how rounds end."""

import pytest
import torch

from prefalign.rollout.generate import Generation
from prefalign.trainers.refill import Groups, group_varied, refill

PAD = 0
K = 2


def _groups(prompt_rows, scores, prompt_width=1, responses=None):
    """K rows per prompt of ``prompt_rows`` (one entry per group); prompt tokens ``[100 + i] * prompt_width`` with no
    padding, response row ``b`` of ``responses`` (default: one token ``b + 1``) right-padded with PAD."""
    rows = [i for i in prompt_rows for _ in range(K)]
    b = len(rows)
    responses = responses or [[r + 1] for r in range(b)]
    width = max(len(r) for r in responses)
    ids = torch.tensor([r + [PAD] * (width - len(r)) for r in responses])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in responses])
    gen = Generation(
        torch.tensor([[100 + i] * prompt_width for i in rows]),
        torch.ones(b, prompt_width, dtype=torch.long),
        ids,
        mask,
        torch.ones(b, dtype=torch.bool),
    )
    scores = torch.tensor(scores, dtype=torch.float32)
    texts = [f"c{i}.{j}" for i in prompt_rows for j in range(K)]
    return Groups(gen, rows, [f"p{i}" for i in rows], texts, scores, {"judge": scores * 10})


def test_group_varied_by_hand():
    assert group_varied(torch.tensor([1.0, 1.0, 0.0, 1.0, 2.0, 2.0]), K) == [False, True, False]


def test_cat_pads_prompts_left_and_responses_right():
    a = _groups([7], [0.0, 1.0], prompt_width=1, responses=[[5], [6]])
    b = _groups([8], [2.0, 3.0], prompt_width=2, responses=[[1, 2, 3], [4]])
    both = Groups.cat([a, b], PAD)
    assert both.gen.prompt_ids.tolist() == [[PAD, 107], [PAD, 107], [108, 108], [108, 108]]
    assert both.gen.prompt_mask.tolist() == [[0, 1], [0, 1], [1, 1], [1, 1]]
    assert both.gen.response_ids.tolist() == [[5, PAD, PAD], [6, PAD, PAD], [1, 2, 3], [4, PAD, PAD]]
    assert both.gen.response_mask.tolist() == [[1, 0, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0]]
    assert both.prompt_rows == [7, 7, 8, 8] and both.texts == ["c7.0", "c7.1", "c8.0", "c8.1"]
    assert both.scores.tolist() == [0.0, 1.0, 2.0, 3.0] and both.parts["judge"].tolist() == [0.0, 10.0, 20.0, 30.0]


def test_take_trims_the_response_width_to_the_rows_kept():
    g = _groups([1, 2], [0.0, 1.0, 2.0, 3.0], responses=[[1], [2], [3, 4, 5], [6]])
    kept = g.take([1, 0, 3])
    assert kept.gen.response_ids.tolist() == [[2], [1], [6]] and kept.prompt_rows == [1, 1, 2]
    assert kept.scores.tolist() == [1.0, 0.0, 3.0]


def _recorded(g: Groups, base: float) -> Groups:
    """``g`` with decode-time log-probs ``-(base + 0.1 * column)`` and entropies ``base + column`` on its responses,
    0 past them."""
    r = g.gen.response_ids.shape[1]
    col = torch.arange(r, dtype=torch.float32).expand_as(g.gen.response_mask)
    on = g.gen.response_mask.bool()
    g.gen.logps = torch.where(on, -(base + 0.1 * col), 0.0)
    g.gen.entropy = torch.where(on, base + col, 0.0)
    return g


def test_recorded_logprobs_follow_their_rows_through_cat_and_take():
    a = _recorded(_groups([7], [0.0, 1.0], responses=[[5], [6]]), 1.0)
    b = _recorded(_groups([8], [2.0, 3.0], responses=[[1, 2, 3], [4]]), 2.0)
    both = Groups.cat([a, b], PAD)
    want = torch.tensor([[-1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [-2.0, -2.1, -2.2], [-2.0, 0.0, 0.0]])
    torch.testing.assert_close(both.gen.logps, want, rtol=0, atol=0)
    assert both.gen.entropy.tolist() == [[1.0, 0, 0], [1.0, 0, 0], [2.0, 3.0, 4.0], [2.0, 0, 0]]
    kept = both.take([3, 0])  # both one token wide: the width shrinks to 1
    assert kept.gen.logps.tolist() == [[-2.0], [-1.0]] and kept.gen.entropy.tolist() == [[2.0], [1.0]]
    # a piece sampled by model.generate records nothing: the batch has no recording (its rollout runs the forward)
    assert Groups.cat([a, _groups([9], [0.0, 1.0])], PAD).gen.logps is None
    assert _groups([9], [0.0, 1.0]).take([1]).gen.logps is None
    # log-probs recorded without entropy (generate(record_entropy=False)): the log-probs carried, no entropy
    a.gen.entropy = b.gen.entropy = None
    logps_only = Groups.cat([a, b], PAD)
    torch.testing.assert_close(logps_only.gen.logps, want, rtol=0, atol=0)
    assert logps_only.gen.entropy is None and logps_only.take([3, 0]).gen.entropy is None


def test_refill_replaces_each_equal_group_from_its_own_chain():
    # slots 0 and 2 of 3 are equal; round 1 refills slot 2 and not slot 0; round 2 refills slot 0
    first = _groups([10, 11, 12], [1.0, 1.0, 0.0, 1.0, 5.0, 5.0])
    offered = {
        1: _groups([20, 22], [3.0, 3.0, 0.0, 2.0], responses=[[1, 2], [3], [4, 5, 6], [7]]),
        2: _groups([30], [1.0, 0.0]),
    }
    calls = []

    def sample(r, slots):
        calls.append((r, slots))
        return offered[r]

    batch, stats = refill(first, K, 3, sample, lambda n: n > 0, PAD)
    assert calls == [(1, [0, 2]), (2, [0])]  # round 3 is not run: nothing is missing after round 2
    assert batch.prompt_rows == [30, 30, 11, 11, 22, 22]
    assert batch.scores.tolist() == [1.0, 0.0, 0.0, 1.0, 0.0, 2.0]
    assert batch.texts == ["c30.0", "c30.1", "c11.0", "c11.1", "c22.0", "c22.1"]
    # tokens: 6 of round 0 (one per row), 2 + 1 + 3 + 1 of round 1, 2 of round 2: every round's sampling
    assert stats == {"refill/rounds": 2.0, "refill/groups": 2.0, "refill/completions": 12.0, "refill/tokens": 15.0}
    assert all(group_varied(batch.scores, K))


def test_refill_keeps_an_equal_group_when_the_rounds_run_out():
    first = _groups([10, 11], [1.0, 1.0, 0.0, 1.0])
    batch, stats = refill(first, K, 2, lambda r, slots: _groups([20 + r], [4.0, 4.0]), lambda n: n > 0, PAD)
    assert batch.prompt_rows == [10, 10, 11, 11] and batch.scores.tolist() == [1.0, 1.0, 0.0, 1.0]
    assert stats == {"refill/rounds": 2.0, "refill/groups": 0.0, "refill/completions": 8.0, "refill/tokens": 8.0}


@pytest.mark.parametrize("keep_busy, sampled", [(False, []), (True, [(1, [0]), (2, [0])])])
def test_a_full_process_waits_for_the_others_and_samples_only_when_kept_busy(keep_busy, sampled):
    first = _groups([10], [0.0, 1.0])  # nothing to refill here; another process needs 2 rounds
    calls, others = [], iter([True, True, False])

    def sample(r, slots):
        calls.append((r, slots))
        return _groups([9], [2.0, 3.0])

    batch, stats = refill(first, K, 5, sample, lambda n: next(others), PAD, keep_busy=keep_busy)
    assert calls == sampled and batch is first
    n = 2.0 + 2 * len(sampled)  # one token per completion: the kept-busy rounds' tokens count too
    assert stats == {"refill/rounds": 2.0, "refill/groups": 0.0, "refill/completions": n, "refill/tokens": n}
    assert next(others, "done") == "done"  # asked once per round, the third answer ending the rounds
