import copy

import torch
from conftest import tiny_reward_model, trainer_kwargs
from torch.optim.optimizer import register_optimizer_step_pre_hook

from prefalign.trainers.embedding_grad import dense_embedding_backward, sparse_embedding_backward
from prefalign.trainers.reward import RewardConfig, RewardTrainer


def _chunks(vocab: int) -> list[torch.Tensor]:
    """Two forward chunks sharing some tokens (rows an embedding sums over), as a step's chunks do."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, vocab, (2, 7), generator=g)
    b = torch.cat([a[:, :3], torch.randint(0, vocab, (2, 4), generator=g)], dim=1)
    return [a, b]


def _backward(model, ids):
    out = model(input_ids=ids)
    (out.logits if hasattr(out, "logits") else out).float().pow(2).mean().backward()


def _same_gradients(got, want, table):
    """Every gradient of ``got`` equals ``want``'s; the table's rows are summed in another order (float32)."""
    for name, p in dict(want.named_parameters()).items():
        g = dict(got.named_parameters())[name].grad
        assert g.layout == torch.strided, name  # what the fused AdamW and the norm clipping take
        tol = {"rtol": 1e-6, "atol": 1e-9} if name == table else {"rtol": 0, "atol": 0}
        torch.testing.assert_close(g, p.grad, **tol, msg=name)


def test_a_tied_lm_heads_table_gets_the_dense_gradients_over_two_chunks(tiny_model):
    dense, sparse = tiny_model, copy.deepcopy(tiny_model)
    undo = sparse_embedding_backward(sparse)
    assert [emb for emb, _ in undo] == [sparse.get_input_embeddings()] and undo[0][0].sparse
    assert sparse.get_output_embeddings().weight is sparse.get_input_embeddings().weight  # tied: the head's pass
    for ids in _chunks(dense.config.vocab_size):
        _backward(dense, ids)
        _backward(sparse, ids)
    _same_gradients(sparse, dense, "model.embed_tokens.weight")


def test_an_untied_table_gets_a_dense_gradient_that_later_rows_add_into_in_place(tokenizer):
    dense = tiny_reward_model(tokenizer)  # a score head: only the lookup reaches the table
    sparse = copy.deepcopy(dense)
    assert [emb for emb, _ in sparse_embedding_backward(sparse)] == [sparse.model.embed_tokens]
    first, second = _chunks(dense.config.vocab_size)
    weight = sparse.model.embed_tokens.weight
    _backward(dense, first)
    _backward(sparse, first)
    storage = weight.grad.data_ptr()  # the step's first gradient, made dense
    _backward(dense, second)
    _backward(sparse, second)
    assert weight.grad.data_ptr() == storage  # the second chunk's rows added into it, no new table
    _same_gradients(sparse, dense, "model.embed_tokens.weight")
    assert (
        weight.grad[first[0, 0]].abs().sum() > 0
        and not weight.grad[~torch.isin(torch.arange(len(weight)), torch.cat([first, second]).flatten())].any()
    )


def test_a_frozen_or_max_norm_embedding_keeps_its_dense_backward(tiny_model):
    frozen = copy.deepcopy(tiny_model)
    frozen.get_input_embeddings().weight.requires_grad_(False)
    assert sparse_embedding_backward(frozen) == [] and not frozen.get_input_embeddings().sparse
    capped = copy.deepcopy(tiny_model)
    capped.get_input_embeddings().max_norm = 1.0  # renormalises rows in place on lookup: left as it is
    assert sparse_embedding_backward(capped) == [] and not capped.get_input_embeddings().sparse
    assert sparse_embedding_backward(torch.nn.Linear(2, 2)) == []  # no input embedding at all


def test_undo_hands_back_a_dense_backward(tokenizer):
    model = tiny_reward_model(tokenizer)
    dense_embedding_backward(sparse_embedding_backward(model))
    assert not model.model.embed_tokens.sparse
    _backward(model, _chunks(model.config.vocab_size)[0])
    assert model.model.embed_tokens.weight.grad.layout == torch.strided


def test_a_reward_run_steps_on_dense_gradients_and_hands_the_model_back_dense(tmp_path, tiny_model_dir, pairs):
    seen = []

    def at_step(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        seen.append((trainer.model.get_input_embeddings().sparse, {g.layout for g in grads}))

    trainer = RewardTrainer(RewardConfig(**trainer_kwargs(tmp_path, tiny_model_dir, pairs, max_steps=3)))
    handle = register_optimizer_step_pre_hook(at_step)
    try:
        trainer.train()
    finally:
        handle.remove()
    assert seen == [(True, {torch.strided})] * 3  # the sparse backward, and only dense gradients stepped
    assert not trainer.model.get_input_embeddings().sparse


def test_a_failed_run_also_hands_the_model_back_dense(tmp_path, tiny_model_dir, pairs):
    import pytest
    from conftest import nan_at_trainer

    from prefalign.errors import UserError
    from prefalign.trainers.dpo import DPOConfig

    cfg = DPOConfig(**trainer_kwargs(tmp_path, tiny_model_dir, pairs, max_steps=4, max_nonfinite_steps=2))
    trainer = nan_at_trainer()(cfg, bad_steps=range(1, 100))
    with pytest.raises(UserError, match="non-finite loss or gradients for 2 steps in a row"):
        trainer.train()
    emb = trainer.model.get_input_embeddings()
    assert not emb.sparse and not emb.weight._post_accumulate_grad_hooks  # flag and hook both undone
