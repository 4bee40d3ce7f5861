import copy

import torch
from conftest import tiny_reward_model, trainer_kwargs
from torch.optim.optimizer import register_optimizer_step_pre_hook

from prefalign.trainers.embedding_grad import (
    dense_embedding_backward,
    dense_grads_ready,
    sparse_embedding_backward,
    zero_grads,
)
from prefalign.trainers.reward import RewardConfig, RewardTrainer


def _chunks(vocab: int) -> list[torch.Tensor]:
    """Two forward chunks sharing some tokens (rows an embedding sums over), as a step's chunks do."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, vocab, (2, 7), generator=g)
    b = torch.cat([a[:, :3], torch.randint(0, vocab, (2, 4), generator=g)], dim=1)
    return [a, b]


def _backward(model, chunks, kept=()):
    for ids in chunks:
        dense_grads_ready(list(kept))
        model(input_ids=ids).logits.float().pow(2).mean().backward()


def test_sparse_rows_into_a_kept_gradient_give_the_dense_gradients(tiny_model):
    dense = tiny_model
    sparse = copy.deepcopy(dense)
    kept = sparse_embedding_backward(sparse)
    assert kept == [sparse.get_input_embeddings()] and kept[0].sparse
    chunks = _chunks(dense.config.vocab_size)
    _backward(dense, chunks)
    _backward(sparse, chunks, kept)

    weight = sparse.get_input_embeddings().weight
    assert weight.grad.layout == torch.strided  # what the fused AdamW and the norm clipping take
    got, want = dict(sparse.named_parameters()), dict(dense.named_parameters())
    for name, p in want.items():
        # the tied table's rows are summed in another order; every other gradient is the same computation
        tol = {"rtol": 1e-6, "atol": 1e-9} if p is dense.get_input_embeddings().weight else {"rtol": 0, "atol": 0}
        torch.testing.assert_close(got[name].grad, p.grad, **tol, msg=name)
    assert weight.grad[chunks[0][0, 0]].abs().sum() > 0

    # zeroed in place, not freed: the next step's rows add into the same storage
    optimizer = torch.optim.AdamW(sparse.parameters(), fused=True)
    optimizer.step()
    storage = weight.grad.data_ptr()
    zero_grads(optimizer, kept)
    assert weight.grad.data_ptr() == storage and not weight.grad.any()
    assert all(p.grad is None for p in sparse.parameters() if p is not weight)
    _backward(sparse, chunks[:1], kept)
    assert weight.grad.data_ptr() == storage and weight.grad.any()


def test_a_frozen_or_max_norm_embedding_keeps_its_dense_backward(tiny_model, tokenizer):
    frozen = copy.deepcopy(tiny_model)
    frozen.get_input_embeddings().weight.requires_grad_(False)
    assert sparse_embedding_backward(frozen) == [] and not frozen.get_input_embeddings().sparse
    capped = copy.deepcopy(tiny_model)
    capped.get_input_embeddings().max_norm = 1.0  # renormalises rows in place on lookup: left as it is
    assert sparse_embedding_backward(capped) == [] and not capped.get_input_embeddings().sparse
    assert sparse_embedding_backward(torch.nn.Linear(2, 2)) == []  # no input embedding at all


def test_undo_hands_back_a_dense_backward_and_no_gradient(tiny_model):
    kept = sparse_embedding_backward(tiny_model)
    _backward(tiny_model, _chunks(tiny_model.config.vocab_size)[:1], kept)
    dense_embedding_backward(kept)
    emb = tiny_model.get_input_embeddings()
    assert not emb.sparse and emb.weight.grad is None


def test_a_reward_run_steps_on_a_dense_kept_embedding_gradient_and_hands_the_model_back_dense(
    tmp_path, tiny_model_dir, pairs
):
    seen = []

    def at_step(optimizer, args, kwargs):
        emb = trainer.model.get_input_embeddings()
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        seen.append((emb.sparse, emb.weight.grad.data_ptr(), {g.layout for g in grads}))

    trainer = RewardTrainer(RewardConfig(**trainer_kwargs(tmp_path, tiny_model_dir, pairs, max_steps=3)))
    handle = register_optimizer_step_pre_hook(at_step)
    try:
        trainer.train()
    finally:
        handle.remove()
    assert len(seen) == 3
    assert all(sparse and layouts == {torch.strided} for sparse, _, layouts in seen)
    assert len({storage for _, storage, _ in seen}) == 1  # one gradient for the whole run
    emb = trainer.model.get_input_embeddings()
    assert not emb.sparse and emb.weight.grad is None


def test_a_reward_models_table_gets_the_sparse_backward(tokenizer):
    model = tiny_reward_model(tokenizer)
    assert sparse_embedding_backward(model) == [model.model.embed_tokens]
