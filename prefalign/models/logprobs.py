"""Per-token log-probs of completion tokens, computing the output layer only where it is needed.

The vocabulary is large (49k for SmolLM2) and most of a preference batch is prompt and padding, so we
run the backbone on the whole sequence but the LM head only on the hidden states that predict a
completion token. Naive equivalent (what the tests check against)::

    logits = model(input_ids, attention_mask).logits            # (B, T, V)
    logps = log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None])[..., 0]
    logps = logps * completion_mask[:, 1:]                     # then shifted back to align with tokens
"""

from __future__ import annotations

import torch

from prefalign.models.loading import base_model


def unwrap_backbone(model):
    """Return ``(backbone, lm_head)`` of a causal LM, seeing through peft wrappers.

    LoRA layers are injected in place, so the backbone of a peft model still runs them (and
    ``disable_adapter()`` still switches them off).
    """
    base = base_model(model)
    return base.get_decoder(), base.get_output_embeddings()


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip padding, so left- and right-padded rows see the same positions. ``(B, T)``."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def completion_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
):
    """Log-probs of the completion tokens of a padded (prompt + completion) batch.

    Args:
        input_ids: ``(B, T)`` token ids, left- or right-padded.
        attention_mask: ``(B, T)`` 1 on real tokens.
        completion_mask: ``(B, T)`` 1 on completion tokens (never position 0: a completion needs a prompt).
        temperature: logits are divided by it (PPO scores the tokens as they were sampled).
        return_entropy: also return the per-token entropy of the (tempered) next-token distribution.

    Returns:
        ``logps (B, T)`` float32, ``logps[b, t] = log p(input_ids[b, t] | input_ids[b, :t])`` where
        ``completion_mask[b, t]`` is 1, else 0. With ``return_entropy``, ``(logps, entropy)``,
        entropy ``(B, T)`` aligned the same way.
    """
    if completion_mask[:, 0].any():
        raise ValueError("completion_mask marks position 0: every completion needs at least one prompt token")
    backbone, head = unwrap_backbone(model)
    hidden = backbone(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).last_hidden_state  # (B, T, H)
    # hidden[:, t] predicts token t+1: select the states whose next token is a completion token.
    select = completion_mask[:, 1:].bool()  # (B, T-1)
    h = hidden[:, :-1][select]  # (N, H), N = number of completion tokens in the batch
    logits = head(h).float()  # (N, V): the only place the LM head runs
    if temperature != 1.0:
        logits = logits / temperature
    targets = input_ids[:, 1:][select]  # (N,)
    lse = torch.logsumexp(logits, dim=-1)
    token_logps = logits.gather(-1, targets[:, None]).squeeze(-1) - lse  # (N,)
    out = _scatter_back(token_logps, select)
    if not return_entropy:
        return out
    # H = logsumexp(z) - sum p z; differentiable when grad is on (PPO's entropy bonus needs it).
    entropy = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return out, _scatter_back(entropy, select)


def _scatter_back(values: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    """Put ``(N,)`` values back at the True places of ``select (B, T-1)``; ``(B, T)`` aligned to tokens."""
    b = select.shape[0]
    shifted = values.new_zeros(select.shape).masked_scatter(select, values)  # keeps the autograd graph
    return torch.cat([values.new_zeros(b, 1), shifted], dim=1)


def sequence_logprobs(logps: torch.Tensor, completion_mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Sum (or mean) of per-token completion log-probs per row: ``(B, T) -> (B,)``."""
    total = (logps * completion_mask).sum(-1)
    if average:
        return total / completion_mask.sum(-1).clamp(min=1)
    return total
