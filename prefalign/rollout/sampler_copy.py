"""The model a sampler reads: a copy of the policy in another dtype (bf16), kept in step with it."""

from __future__ import annotations

import copy
from typing import Any

import torch


def sampling_copy(model, dtype: torch.dtype):
    """The model to sample from: ``model`` itself when it already holds ``dtype`` weights, else a copy cast to
    ``dtype`` (eval mode; call it under no_grad). Decoding is bound by reading the weights every token: a bf16
    copy reads half the bytes and skips autocast's per-step re-cast (the speed-ups measured against fp32 and
    autocast are in BENCHMARKS.md, "Measured design notes"). Keep training and log-probs on the original;
    `refresh_sampling_copy` after updates."""
    if next(model.parameters()).dtype == dtype:
        return model
    # parameters only: buffers keep their dtype, as in a model loaded in bf16. `.to(dtype)` would also round RoPE's
    # float32 inv_freq to bf16, whose relative error (up to 0.4%) turns the rotary angle by ~0.2 rad at position
    # 1000: the copy's log-probs drifted from the float32 model's with position (tests/test_eval.py).
    # requires_grad stays as it was although sampling runs under no_grad: bf16 weights with requires_grad=False
    # decoded slower on a CPU (apparently another kernel path; measured in BENCHMARKS.md, "Measured design notes")
    # Each parameter goes into deepcopy's memo already cast, so the float32 weights are never duplicated: a plain
    # deepcopy-then-cast held a second float32 copy at its peak (the bf16 rollout's peak GPU memory on an H200:
    # 8.2 GiB against model.generate's 6.1 for a 1B model; BENCHMARKS.md, "The GPU path"). Tied weights are one
    # Parameter, so one memo entry: still tied. copy=True: a parameter already in ``dtype`` gets its own storage
    # too, which `refresh_sampling_copy` writes into.
    memo: dict[int, Any] = {
        id(p): torch.nn.Parameter(p.detach().to(dtype, copy=True), requires_grad=p.requires_grad)
        for p in model.parameters()
    }
    out = copy.deepcopy(model, memo).eval()
    for p in out.parameters():  # a module whose own __deepcopy__ bypassed the memo: cast what it copied
        if p.dtype != dtype:
            p.data = p.data.to(dtype)
    out.config.dtype = dtype
    return out


@torch.no_grad()
def release_sampling_copy(copy_model, model) -> None:
    """Free the weights of ``model``'s sampling copy until `refresh_sampling_copy` writes them again; a no-op when
    they are one. A trainer's copy goes stale at its optimizer step and nothing samples before the refresh after
    it, so its storage (half the policy's in bf16) is better spent on the update, whose peak sets the run's."""
    if copy_model is model:
        return
    for p in copy_model.parameters():
        p.data = p.data.new_empty(0)


@torch.no_grad()
def refresh_sampling_copy(copy_model, model) -> None:
    """Copy ``model``'s current weights into its sampling copy (cast on the way), allocating those
    `release_sampling_copy` freed; a no-op when they are one."""
    if copy_model is model:
        return
    dst = dict(copy_model.named_parameters())
    for name, p in model.named_parameters():
        if dst[name].shape != p.shape:  # released
            dst[name].data = torch.empty(p.shape, dtype=dst[name].dtype, device=p.device)
        dst[name].copy_(p)
