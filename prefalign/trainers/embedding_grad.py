"""The input embedding's gradient accumulated in place: a sparse backward adding into one dense gradient per step.

A dense embedding backward builds a zero-filled (vocab, hidden) gradient on every backward and adds it to
``.grad``: 113 MB for the default's 49,152 x 576 table, above glibc's mmap threshold so the kernel maps and
zero-fills it each time, and held twice at once from a step's second forward chunk on. A sparse backward yields
only the rows looked up. A hook after the weight's gradient is accumulated turns a step's first one, stored
sparse, dense, and the later ones add their rows into it in place (autograd's ``.grad += rows``); with an LM head
tied to the table the head's dense gradient already carries the rows, and nothing is converted. Nothing is
allocated ahead of the backward, so PPO's two models hold no gradient outside their own backward and step
(BENCHMARKS.md, reward model). One process only: a DDP reducer expects the gradient layout it saw when it wrapped
the model, and FSDP and DeepSpeed keep gradients themselves.
"""

from __future__ import annotations

import torch


def sparse_embedding_backward(model) -> list:
    """Give ``model``'s trainable input embedding a sparse backward whose gradient reaches ``.grad`` dense;
    returns what `dense_embedding_backward` undoes (nothing when the embedding is frozen, has a ``max_norm``, or
    is not a plain ``nn.Embedding``)."""
    emb = getattr(model, "get_input_embeddings", lambda: None)()
    if type(emb) is not torch.nn.Embedding or not emb.weight.requires_grad or emb.max_norm is not None:
        return []

    def first_dense(weight: torch.Tensor) -> None:
        # the optimizer and the norm clipping take dense gradients: the step's first, stored sparse, is made one;
        # later sparse rows add into it in place
        if weight.grad is not None and weight.grad.is_sparse:
            weight.grad = weight.grad.to_dense()

    emb.sparse = True
    return [(emb, emb.weight.register_post_accumulate_grad_hook(first_dense))]


def dense_embedding_backward(undo: list) -> None:
    """Undo `sparse_embedding_backward` when training ends: a model handed back trains like any other."""
    for emb, hook in undo:
        emb.sparse = False
        hook.remove()
