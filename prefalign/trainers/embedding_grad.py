"""The input embedding's gradient accumulated in place: a sparse backward into a dense gradient kept between steps.

A dense embedding backward builds a zero-filled (vocab, hidden) gradient on every backward and adds it to
``.grad``: 113 MB for the default's 49,152 x 576 table, above glibc's mmap threshold so the kernel maps and
zero-fills it each time, and held twice at once from a step's second forward chunk on. A sparse backward yields
only the rows looked up, which ``.grad += rows`` adds in place into a dense gradient allocated before the first
backward and zeroed (not freed) after each step (BENCHMARKS.md, reward model). One process only: a DDP reducer
expects the gradient layout it saw when it wrapped the model, and FSDP and DeepSpeed keep gradients themselves.
"""

from __future__ import annotations

import torch


def sparse_embedding_backward(model) -> list[torch.nn.Embedding]:
    """Give ``model``'s trainable input embedding a sparse backward; returns the embeddings so set (none when
    it is frozen, has a ``max_norm``, or is not a plain ``nn.Embedding``)."""
    emb = getattr(model, "get_input_embeddings", lambda: None)()
    if type(emb) is not torch.nn.Embedding or not emb.weight.requires_grad or emb.max_norm is not None:
        return []
    emb.sparse = True
    return [emb]


def dense_grads_ready(kept: list[torch.nn.Embedding]) -> None:
    """Before a backward: the ``kept`` embeddings' dense gradients exist, so the sparse rows add into them (a
    sparse gradient left as ``.grad`` would reach the optimizer). Allocated here, not when the run is built: torch's
    optimizer-state loading on resume initialises the state only while no parameter has a gradient."""
    for e in kept:
        if e.weight.grad is None:
            e.weight.grad = torch.zeros_like(e.weight)


def zero_grads(optimizer, kept: list[torch.nn.Embedding]) -> None:
    """Free every gradient of ``optimizer`` except the ``kept`` embeddings', which are zeroed in place."""
    grads = [e.weight.grad for e in kept]
    optimizer.zero_grad(set_to_none=True)
    for e, g in zip(kept, grads):
        e.weight.grad = None if g is None else g.zero_()


def dense_embedding_backward(kept: list[torch.nn.Embedding]) -> None:
    """Undo `sparse_embedding_backward` when training ends: a model handed back trains like any other."""
    for e in kept:
        e.sparse = False
        e.weight.grad = None
