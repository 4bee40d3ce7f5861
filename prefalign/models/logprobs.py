"""Per-token log-probs of completion tokens, computing the output layer only where it is needed.

The vocabulary is large (49k for SmolLM2) and most of a preference batch is prompt and padding, so we
run the backbone on the whole sequence but the LM head only on the hidden states that predict a
completion token. Naive equivalent (what the tests check against)::

    logits = model(input_ids, attention_mask).logits            # (B, T, V)
    logps = log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None])[..., 0]
    logps = logps * completion_mask[:, 1:]                     # then shifted back to align with tokens

Even the N selected positions' float32 logits are large (N x V x 4 bytes: 1.6 GB for 8k completion
tokens), and with grad on autograd would keep them, and the softmax for the entropy, until backward. So
past ``CHUNK_SIZE`` positions the head, logsumexp, gather and entropy run ``CHUNK_SIZE`` positions at a
time, and with grad on each chunk is activation-checkpointed: backward recomputes its logits instead of
storing them, so at most one chunk's logits exist at a time (the cost: one more head GEMM per chunk).

Processes hold different numbers of completion tokens, so they would run different numbers of chunks; where a
call of the head is a collective, one process then waits forever in a gather the other never joins:

- under DeepSpeed ZeRO-3 every call of the head module all-gathers its partitioned weight (seen on 2 processes,
  DeepSpeed 0.19.8, from the step-0 evaluation on);
- under FSDP2 a wrap policy that names the head's class (``LlamaDecoderLayer,Linear`` for an untied Llama) makes
  the head a unit of its own, which all-gathers its weight at every call and reduce-scatters its gradient after
  every call's backward (the worker hung on 2 processes, torch 2.13). With the shipped config the head belongs to
  the sharded root (prefalign prepares a wrapper module, so accelerate's own grouping of the head with the final
  norm does not apply): gathered before the root's forward and again before its backward, not at each call, and
  processes may run different numbers of chunks (``tests/test_fsdp.py::test_fsdp_chunked_logprobs_match_one_chunk``).

So for an FSDP2 head unit or a head whose weight ZeRO-3 partitions, the processes first agree on the
number of chunks (`prefalign.collectives.process_max`, a MAX all-reduce of their counts); a process with fewer
completion tokens runs empty chunks to match, each a head call, checkpointed like the others, so its forward and
the recompute in backward join every gather (``tests/test_fsdp.py::test_fsdp_chunked_logprobs_match_one_chunk``,
``tests/test_deepspeed.py::test_zero3_processes_agree_on_the_chunk_count``). The cost is communication: under
ZeRO-3 (and for an FSDP2 head unit) each chunk gathers the head's weight in forward and again in
backward's recompute (once each in one call), traded for never holding more than one chunk's ``(chunk, V)``
logits; plus one all-reduce of an integer per call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

from prefalign.collectives import process_max
from prefalign.models.loading import base_model

CHUNK_SIZE = 1024
"""Positions whose logits ``completion_logprobs`` computes at once. 1024 x 49,152 x 4 bytes = 201 MB of
float32 logits per chunk (twice that with the entropy's softmax, and again in backward for their grads):
small beside a 135M model's weights and optimiser state, while a chunk still fills a GEMM, so the extra
kernel launches and the recompute cost little. A batch with at most this many completion tokens runs as one
plain computation (no checkpoint), exactly as before chunking, except for an FSDP2 head unit or under ZeRO-3
when another process needs more chunks (module docstring)."""


def unwrap_backbone(model):
    """Return ``(backbone, lm_head)`` of a causal LM, seeing through peft wrappers.

    LoRA layers are injected in place, so the backbone of a peft model still runs them (and
    ``disable_adapter()`` still switches them off).
    """
    base = base_model(model)
    return base.get_decoder(), base.get_output_embeddings()


def logit_transform(model) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What the model's own forward does to the LM head's output before it returns logits, which the head alone
    skips (None: nothing): Gemma 2 / 3's ``final_logit_softcapping`` (``c tanh(x / c)``), Cohere's ``logit_scale``
    (``x * s``), Granite's ``logits_scaling`` (``x / s``). Without it the trained distribution is not the one the
    model samples from (`tests/test_logprobs.py` checks each against the model's own logits)."""
    config = base_model(model).config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if cap := getattr(config, "final_logit_softcapping", None):
        return lambda x: torch.tanh(x / cap) * cap
    if (scale := getattr(config, "logit_scale", None)) is not None and scale != 1:
        return lambda x: x * scale
    if (scaling := getattr(config, "logits_scaling", None)) is not None and scaling != 1:
        return lambda x: x / scaling
    return None


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
    chunk_size: int | None = None,
):
    """Log-probs of the completion tokens of a padded (prompt + completion) batch.

    Args:
        input_ids: ``(B, T)`` token ids, left- or right-padded.
        attention_mask: ``(B, T)`` 1 on real tokens.
        completion_mask: ``(B, T)`` 1 on completion tokens (never position 0: a completion needs a prompt).
        temperature: logits are divided by it (PPO scores the tokens as they were sampled).
        return_entropy: also return the per-token entropy of the (tempered) next-token distribution.
        chunk_size: positions per LM-head chunk (default ``CHUNK_SIZE``); tests set it small to exercise chunking.
            With an FSDP2 head unit or a head whose weight DeepSpeed ZeRO-3 partitions every process runs the most
            chunks any needs (a collective; module docstring).

    Returns:
        ``logps (B, T)`` float32, ``logps[b, t] = log p(input_ids[b, t] | input_ids[b, :t])`` where
        ``completion_mask[b, t]`` is 1, else 0. With ``return_entropy``, ``(logps, entropy)``,
        entropy ``(B, T)`` aligned the same way.
    """
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1 position, got {chunk_size}")
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
    targets = input_ids[:, 1:][select]  # (N,)
    size = chunk_size or CHUNK_SIZE
    chunks = -(-h.shape[0] // size)  # ceil
    if _gathers_per_call(head):
        # every head call is a collective: every process runs as many, the most any needs (module docstring)
        chunks = process_max(chunks, h.device)
    head_fn = _with_transform(head, logit_transform(model))
    stats = _chunked_head_stats(head_fn, h, targets, temperature, return_entropy, size, max(chunks, 1))
    out = _scatter_back(stats[0], select)
    if not return_entropy:
        return out
    return out, _scatter_back(stats[1], select)


def _gathers_per_call(head) -> bool:
    """Whether a call of ``head`` may be a collective, so every process must make as many (module docstring):

    - DeepSpeed ZeRO-3 partitions its weight: its module hook all-gathers it before every call and frees it
      after. ZeRO-3 marks its parameters with ``ds_id``; a ``ds_persist`` one (below
      ``stage3_param_persistence_threshold`` elements) stays whole and gathers nothing.
    - FSDP2 made it a unit of its own (`torch.distributed.fsdp.FSDPModule`; a wrap policy naming its class): it
      all-gathers its weight at every call and reduce-scatters after every call's backward. (Whether a unit
      reshards after forward lives in FSDP2's private state, so any head unit agrees.)
    """
    weight = getattr(head, "weight", None)
    if hasattr(weight, "ds_id"):
        return not getattr(weight, "ds_persist", False)
    try:
        from torch.distributed.fsdp import FSDPModule  # public since torch 2.6; FSDP2 needs it
    except ImportError:
        return False
    return isinstance(head, FSDPModule)


def _with_transform(head, transform):
    """``head``, or a function running ``head`` then ``transform`` (`logit_transform`)."""
    if transform is None:
        return head
    return lambda h: transform(head(h))


def _head_stats(
    head, h: torch.Tensor, targets: torch.Tensor, temperature: float, return_entropy: bool
) -> tuple[torch.Tensor, ...]:
    """``(token_logps,)`` or ``(token_logps, entropy)``, each ``(n,)`` float32, from hidden states ``h (n, H)``
    and their next tokens ``targets (n,)``; the ``(n, V)`` logits live only inside this call."""
    return token_stats(head(h), targets, temperature, return_entropy)  # the only place the LM head runs


def token_stats(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, return_entropy: bool = True
) -> tuple[torch.Tensor, ...]:
    """``(token_logps,)`` or ``(token_logps, entropy)``, each ``(n,)`` float32: ``log softmax(logits / T)`` at
    ``targets (n,)`` and the entropy of ``softmax(logits / T)``, from ``logits (n, V)`` (any float dtype; computed
    in float32). The one formula for the log-probs of the update, the rollout's forwards and the decode loop's
    recording (`prefalign.rollout.decode.LogprobRecorder`)."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)
    token_logps = logits.gather(-1, targets[:, None]).squeeze(-1) - lse  # (n,)
    if not return_entropy:
        return (token_logps,)
    # H = logsumexp(z) - sum p z; differentiable when grad is on (PPO's entropy bonus needs it).
    entropy = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return token_logps, entropy


def _chunked_head_stats(
    head,
    h: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    return_entropy: bool,
    chunk_size: int,
    n_chunks: int,
) -> tuple[torch.Tensor, ...]:
    """``_head_stats`` over ``h (N, H)`` in ``n_chunks`` chunks of ``chunk_size`` positions, concatenated: ``(N,)``
    each. ``n_chunks`` >= ceil(N / chunk_size); the chunks past N are empty (0 positions) but still call the head.

    With grad on, each chunk is checkpointed, so autograd saves its ``(chunk, H)`` input rather than its
    ``(chunk, V)`` logits and recomputes them in backward, one chunk at a time.
    """
    if n_chunks * chunk_size < h.shape[0]:
        raise ValueError(f"{n_chunks} chunks of {chunk_size} positions cannot hold {h.shape[0]} positions")
    if n_chunks == 1:
        return _head_stats(head, h, targets, temperature, return_entropy)
    grad = torch.is_grad_enabled()
    chunks = []
    for start in range(0, n_chunks * chunk_size, chunk_size):
        args = (head, h[start : start + chunk_size], targets[start : start + chunk_size], temperature, return_entropy)
        chunks.append(
            checkpoint(_head_stats, *args, use_reentrant=False, preserve_rng_state=False)
            if grad
            else _head_stats(*args)
        )
    return tuple(torch.cat(parts) for parts in zip(*chunks))


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
