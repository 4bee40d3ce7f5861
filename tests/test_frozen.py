"""A frozen reference with its linear weights held in bf16 gives the same bits under bf16 autocast
(`prefalign.models.frozen`), and the trainers use it only where they autocast."""

import copy

import pytest
import torch

from prefalign.models import tiny_causal_lm
from prefalign.models.frozen import hold_linear_weights_in, load_reference
from prefalign.models.logprobs import completion_logprobs
from prefalign.trainers.backend import autocast_dtype, make_accelerator


def _batch(tok, n=3, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, len(tok), (n, length), generator=g)
    attention = torch.ones(n, length, dtype=torch.long)
    attention[1, :4] = 0  # a left-padded row
    completion = torch.zeros(n, length, dtype=torch.long)
    completion[:, 6:] = 1
    return ids, attention, completion


@pytest.mark.parametrize("tied", [True, False])
def test_bf16_linear_weights_give_the_same_log_probs_under_autocast(tokenizer, tied):
    # an untied head is an ordinary linear layer: held in bf16 too
    model, tok = tiny_causal_lm(tokenizer, layers=2, hidden=32, seed=3, init_std=0.5, tied=tied)
    model.eval()
    held = copy.deepcopy(model)
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    heads = 0 if tied else model.lm_head.weight.numel()
    body = sum(m.weight.numel() for m in linear if m is not model.lm_head)
    assert hold_linear_weights_in(held, torch.bfloat16) == 2 * (body + heads)  # 4 -> 2 bytes each
    assert held.model.embed_tokens.weight.dtype == torch.float32
    assert held.model.norm.weight.dtype == torch.float32
    assert held.lm_head.weight.dtype == (torch.float32 if tied else torch.bfloat16)
    assert (held.lm_head.weight is held.model.embed_tokens.weight) == tied
    args = _batch(tok)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want, want_h = completion_logprobs(model, *args, temperature=0.7, return_entropy=True)
        got, got_h = completion_logprobs(held, *args, temperature=0.7, return_entropy=True)
    assert torch.equal(got, want) and torch.equal(got_h, want_h)


def test_autocast_dtype_follows_the_accelerator():
    assert autocast_dtype(make_accelerator("fp32")) is None
    assert autocast_dtype(make_accelerator("bf16")) == torch.bfloat16


def test_load_reference_holds_linears_in_bf16_only_under_autocast(tiny_model_dir):
    fp32 = load_reference(str(tiny_model_dir), "cpu", None)
    bf16 = load_reference(str(tiny_model_dir), "cpu", torch.bfloat16)
    for m in (fp32, bf16):
        assert not m.training and not any(p.requires_grad for p in m.parameters())
    assert {p.dtype for p in fp32.parameters()} == {torch.float32}
    assert bf16.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert bf16.model.embed_tokens.weight.dtype == torch.float32


def test_no_float32_weight_keeps_a_shared_checkpoint_buffer_alive(tokenizer):
    """A checkpoint loaded from one memory-mapped file gives views of one storage: if the float32 weights left
    after the conversion still viewed it, the old linear weights would stay resident beside their bf16 copies."""
    model, _ = tiny_causal_lm(tokenizer, layers=2, hidden=32, seed=1)
    params = list(model.parameters())
    buffer = torch.cat([p.detach().flatten() for p in params])  # one storage, as a mapped safetensors file
    offset = 0
    for p in params:
        p.data = buffer[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    assert all(p.untyped_storage().nbytes() == buffer.nbytes for p in params)
    hold_linear_weights_in(model, torch.bfloat16)
    assert all(p.untyped_storage().nbytes() == p.numel() * p.element_size() for p in model.parameters())
