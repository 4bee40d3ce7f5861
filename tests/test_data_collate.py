"""Collators: exact tensors out of hand-made token ids (pad id 2 = EOS, as with SmolLM2)."""

import pytest
import torch

from prefalign.data import PreferenceCollator, PromptCollator, SFTCollator, TokenizedPair, TokenizedSFT

PAD = 2


def _pairs(margins=(None, None)):
    return [
        TokenizedPair([5, 6], [7, 2], [8, 9, 2], margins[0]),
        TokenizedPair([10], [11, 12, 13, 2], [14, 2], margins[1]),
    ]


def test_preference_collator_stacks_chosen_then_rejected_right_padded():
    batch = PreferenceCollator(PAD)(_pairs())
    assert set(batch) == {"input_ids", "attention_mask", "completion_mask"}  # no margin key without margins
    assert torch.equal(
        batch["input_ids"], torch.tensor([[5, 6, 7, 2, 2], [10, 11, 12, 13, 2], [5, 6, 8, 9, 2], [10, 14, 2, 2, 2]])
    )
    assert torch.equal(
        batch["attention_mask"], torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    )
    # 1 on completion tokens including their EOS; 0 on prompt and on padding (even though pad == EOS)
    assert torch.equal(
        batch["completion_mask"], torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])
    )
    assert all(t.dtype == torch.long for t in batch.values())


def test_preference_collator_margin_and_multiple_of():
    batch = PreferenceCollator(PAD, pad_to_multiple_of=4)(_pairs((1.5, -0.5)))
    assert batch["input_ids"].shape == (4, 8)
    assert torch.equal(batch["input_ids"][3], torch.tensor([10, 14, 2, 2, 2, 2, 2, 2]))
    assert torch.equal(batch["attention_mask"][1], torch.tensor([1, 1, 1, 1, 1, 0, 0, 0]))
    assert torch.equal(batch["completion_mask"][1], torch.tensor([0, 1, 1, 1, 1, 0, 0, 0]))
    assert torch.equal(batch["margin"], torch.tensor([1.5, -0.5]))
    assert batch["margin"].dtype == torch.float32


def test_preference_collator_refuses_mixed_margins_and_empty_batch():
    with pytest.raises(ValueError, match="margin"):
        PreferenceCollator(PAD)(_pairs((1.0, None)))
    with pytest.raises(ValueError, match="empty"):
        PreferenceCollator(PAD)([])


def test_sft_collator():
    batch = SFTCollator(0)([TokenizedSFT([5, 6], [7, 2]), TokenizedSFT([10], [11, 2])])
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7, 2], [10, 11, 2, 0]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]))
    assert torch.equal(batch["completion_mask"], torch.tensor([[0, 0, 1, 1], [0, 1, 1, 0]]))


def test_prompt_collator_pads_on_the_left():
    batch = PromptCollator(0)([[5, 6, 7], [8]])
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7], [0, 0, 8]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [0, 0, 1]]))
    batch = PromptCollator(0, pad_to_multiple_of=4)([[5, 6, 7], [8]])
    assert torch.equal(batch["input_ids"], torch.tensor([[0, 5, 6, 7], [0, 0, 0, 8]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[0, 1, 1, 1], [0, 0, 0, 1]]))


def test_prompt_collator_refuses_an_empty_prompt():
    """Parsing drops empty prompts first; a caller passing one would get an all-padding row to sample from."""
    with pytest.raises(ValueError, match="prompt 1 of the batch has no tokens"):
        PromptCollator(0)([[5, 6], []])
