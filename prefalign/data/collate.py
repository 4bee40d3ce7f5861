"""Collators: lists of token-id rows in, dicts of padded tensors out.

Every batch is padded to its own longest row (rounded up to ``pad_to_multiple_of`` if given), never to
a global maximum. Training batches are right-padded; generation batches are left-padded so that every
prompt ends at the last column, where generation starts. All tensors are ``torch.long`` except
``margin`` (float32). Masks are 0/1 and named for what they mark: ``attention_mask`` real tokens,
``completion_mask`` completion tokens (the final EOS included; prompt and padding 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prefalign.data.tokens import TokenizedPair, TokenizedSFT


def _width(lengths: list[int], multiple: int | None) -> int:
    if not lengths:
        raise ValueError("cannot collate an empty batch")
    t = max(lengths)
    if multiple:
        t = -(-t // multiple) * multiple
    return t


def _right_pad(rows: list[tuple[list[int], list[int]]], pad_id: int, multiple: int | None) -> dict[str, torch.Tensor]:
    """(prompt, completion) id lists -> input_ids, attention_mask, completion_mask, each ``(B, T)``."""
    t = _width([len(p) + len(c) for p, c in rows], multiple)
    input_ids = torch.full((len(rows), t), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(rows), t), dtype=torch.long)  # (B, T) 1 on real tokens
    completion_mask = torch.zeros((len(rows), t), dtype=torch.long)  # (B, T) 1 on completion tokens
    for b, (prompt, completion) in enumerate(rows):
        n, k = len(prompt) + len(completion), len(prompt)
        input_ids[b, :n] = torch.tensor(prompt + completion, dtype=torch.long)
        attention_mask[b, :n] = 1
        completion_mask[b, k:n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


@dataclass
class PreferenceCollator:
    """N pairs -> ``2N`` right-padded rows: the N chosen sequences, then the N rejected ones.

    Returns ``input_ids (2N, T)`` (row ``i`` = prompt_i + chosen_i, row ``N + i`` = prompt_i +
    rejected_i), ``attention_mask (2N, T)``, ``completion_mask (2N, T)``, and ``margin (N,)`` float32
    when the pairs have margins (all or none of them must).
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, pairs: list[TokenizedPair]) -> dict[str, torch.Tensor]:
        rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
        batch = _right_pad(rows, self.pad_token_id, self.pad_to_multiple_of)
        margins = [p.margin for p in pairs]
        if any(m is not None for m in margins):
            if any(m is None for m in margins):
                raise ValueError("some pairs in the batch have a margin and some do not; all or none must")
            batch["margin"] = torch.tensor(margins, dtype=torch.float32)  # (N,)
        return batch


@dataclass
class SFTCollator:
    """N examples -> right-padded ``input_ids (N, T)``, ``attention_mask (N, T)``, ``completion_mask (N, T)``."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[TokenizedSFT]) -> dict[str, torch.Tensor]:
        return _right_pad(
            [(e.prompt_ids, e.completion_ids) for e in examples], self.pad_token_id, self.pad_to_multiple_of
        )


@dataclass
class PromptCollator:
    """N prompts (id lists) -> LEFT-padded ``input_ids (N, T)`` and ``attention_mask (N, T)``, for generation."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, prompts: list[list[int]]) -> dict[str, torch.Tensor]:
        empty = [b for b, ids in enumerate(prompts) if not ids]
        if empty:  # an all-padding row: nothing to condition on, and no prompt token before the completion
            raise ValueError(f"prompt {empty[0]} of the batch has no tokens: every completion needs a prompt token")
        t = _width([len(p) for p in prompts], self.pad_to_multiple_of)
        input_ids = torch.full((len(prompts), t), self.pad_token_id, dtype=torch.long)  # (N, T)
        attention_mask = torch.zeros((len(prompts), t), dtype=torch.long)  # (N, T) 1 on real tokens
        for b, ids in enumerate(prompts):
            input_ids[b, t - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[b, t - len(ids) :] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}
