"""Frozen models (the reference of PPO, the critic-free family and DPO) held in less memory at no numeric cost.

Under bf16 autocast every ``nn.Linear`` casts its float32 weight to bfloat16 on each call (round to nearest even,
the same rounding as ``weight.to(torch.bfloat16)``), computes in bfloat16 and returns bfloat16. A frozen model's
linear weights can therefore be stored in bfloat16 once: each call skips the cast and gets the same bits.
Embeddings and norms are *not* autocast ops; they stay float32, so the residual stream and the normalisations are
computed exactly as before. An LM head tied to the input embedding is that embedding and stays float32 too (autocast
casts it per call, as before). For SmolLM2-135M this holds 106M of the 135M parameters in half the bytes: ~212 MB
less per frozen copy. A frozen model held so in a run without autocast (`prefalign ppo --frozen-dtype bfloat16` at
fp32 precision) runs its forwards under an autocast of its own (`frozen_autocast`).
"""

from __future__ import annotations

import contextlib
from typing import TypeGuard

import torch
from torch import nn

FROZEN_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
"""What a frozen model's linear weights can be held in, by the name --frozen-dtype takes (besides auto)."""


def resolve_frozen_dtype(frozen_dtype: str, precision: str) -> torch.dtype:
    """What --frozen-dtype holds the frozen models' linear weights in at the run's resolved ``precision`` (fp32 or
    bf16): auto follows the precision (bf16 autocast casts a float32 weight to the same bf16 bits on every call)."""
    if frozen_dtype == "auto":
        return torch.bfloat16 if precision == "bf16" else torch.float32
    return FROZEN_DTYPES[frozen_dtype]


def is_reduced(dtype: torch.dtype | None) -> TypeGuard[torch.dtype]:
    """A frozen model is held in ``dtype`` (bf16) and runs under autocast to it; None or float32: kept as loaded."""
    return dtype is not None and dtype != torch.float32


def hold_linear_weights_in(model: nn.Module, dtype: torch.dtype) -> int:
    """Store the weights (and biases) of ``model``'s ``nn.Linear`` layers in ``dtype``, except a layer whose weight
    is the input embedding (a tied LM head). Only for a frozen model run under autocast to ``dtype``: outside
    autocast a float32 input would meet a ``dtype`` weight. Returns the bytes saved."""
    input_embeddings = getattr(model, "get_input_embeddings", None)  # a transformers model's
    embedding = input_embeddings().weight if input_embeddings is not None else None
    saved = 0
    for module in model.modules():
        if not isinstance(module, nn.Linear) or module.weight is embedding:
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            if param.dtype == dtype:
                continue
            saved += param.numel() * (param.element_size() - torch.empty((), dtype=dtype).element_size())
            setattr(module, name, nn.Parameter(param.detach().to(dtype), requires_grad=False))
    # the checkpoint's tensors can be views of one storage (a memory-mapped file): while any float32 weight still
    # views it, the whole of it stays resident beside the new bf16 copies; owning copies of the rest release it
    for param in model.parameters():
        if param.dtype != dtype:
            param.data = param.data.clone()
    return saved


def frozen_autocast(device, dtype: torch.dtype | None):
    """The context a frozen model whose linear weights `hold_linear_weights_in` holds in ``dtype`` runs its forward
    in: autocast to ``dtype`` on ``device``'s type (inside the run's own autocast to the same dtype it changes no
    bit); None or float32: nothing of its own, since float32 weights meet any input."""
    if not is_reduced(dtype):
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def load_reference(name_or_path: str, device, autocast_dtype: torch.dtype | None):
    """A frozen reference model on ``device`` (eval mode, no gradients); with ``autocast_dtype`` bf16 (the run's
    autocast, or --frozen-dtype) its linear weights held in that dtype (`hold_linear_weights_in`: the same log-probs
    under autocast to it); None or float32: as loaded."""
    from prefalign.models.loading import load_causal_lm

    model = load_causal_lm(name_or_path).requires_grad_(False).eval()
    if is_reduced(autocast_dtype):
        hold_linear_weights_in(model, autocast_dtype)
    # accelerate places only what it prepares: the frozen reference goes to the device by hand
    return model.to(device)
