"""prefalign's decode loop (prefalign/rollout/decode.py): model.generate's tokens, faster linears, early exit."""

import pytest
import torch
from torch import nn

from prefalign.data import PromptCollator
from prefalign.models import tiny_causal_lm
from prefalign.rollout import SamplingConfig, generate
from prefalign.rollout.decode import PackedLinears, decode, loop_fallback, packing_available
from prefalign.rollout.generate import key_seed

PROMPTS = [[5, 17, 230, 9], [41], [7, 8, 9, 10, 11, 12, 13], [300, 301]]  # left-padded to 7 by the collator


@pytest.fixture(scope="module")
def peaked(tokenizer):
    """A tiny Llama with a peaked next-token distribution (init 0.5), like a trained LM: greedy paths vary."""
    model, _ = tiny_causal_lm(tokenizer, hidden=32, layers=2, init_std=0.5, seed=1)
    return model.eval()


def _batch(rows, pad_id):
    batch = PromptCollator(pad_id)(rows)
    return batch["input_ids"], batch["attention_mask"]


def _hf_greedy(model, ids, mask, new, eos, pad):
    out = model.generate(
        input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new, eos_token_id=eos, pad_token_id=pad
    )
    return out[:, ids.shape[1] :]


def _loop_greedy(model, ids, mask, new, eos, pad, pack=True):
    with PackedLinears(model) if pack else torch.no_grad():
        return decode(model, ids, mask, new, lambda logits, t: logits.argmax(-1), eos_ids=eos, pad_id=pad)


@pytest.mark.parametrize("new_tokens", [1, 5, 17])
@pytest.mark.parametrize("pack", [True, False], ids=["packed", "plain"])
def test_greedy_loop_is_generates_greedy_decode(peaked, tokenizer, new_tokens, pack):
    ids, mask = _batch(PROMPTS, tokenizer.pad_token_id)
    assert (mask[:, 0] == 0).any()  # left padding is exercised
    want = _hf_greedy(peaked, ids, mask, new_tokens, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    got = _loop_greedy(peaked, ids, mask, new_tokens, [tokenizer.eos_token_id], tokenizer.pad_token_id, pack)
    assert got.shape == (4, new_tokens) and torch.equal(got, want)


def test_rows_that_end_are_padded_and_the_loop_stops_when_all_have(peaked, tokenizer):
    ids, mask = _batch(PROMPTS, tokenizer.pad_token_id)
    free = _loop_greedy(peaked, ids, mask, 12, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    # make row 0's third greedy token an EOS: that row ends mid-batch, the others run on
    eos = [int(free[0, 2])]
    assert not (free[1:, :3] == eos[0]).any(), "pick a token only row 0 emits by step 3"
    pad = 0
    want = _hf_greedy(peaked, ids, mask, 12, eos, pad)
    got = _loop_greedy(peaked, ids, mask, 12, eos, pad)
    assert torch.equal(got, want)
    assert (got[0, 3:] == pad).all() and got[0, 2] == eos[0]
    # when every row's next token is an EOS the loop stops at once: one column
    every = sorted({int(t) for t in free[:, 0]})
    assert _loop_greedy(peaked, ids, mask, 12, every, pad).shape == (4, 1)


def test_keyed_sampling_draws_generates_tokens_whatever_the_batch(peaked, tokenizer):
    s_loop = SamplingConfig(max_new_tokens=9, temperature=1.0, top_k=40, decoder="loop")
    s_hf = SamplingConfig(max_new_tokens=9, temperature=1.0, top_k=40, decoder="generate")
    pad, eos = tokenizer.pad_token_id, [tokenizer.eos_token_id]
    keys = [key_seed(i, 0) for i in range(4)]
    ids, mask = _batch(PROMPTS, pad)
    loop = generate(peaked, ids, mask, s_loop, eos_ids=eos, pad_id=pad, row_keys=keys, seed=3)
    hf = generate(peaked, ids, mask, s_hf, eos_ids=eos, pad_id=pad, row_keys=keys, seed=3)
    assert torch.equal(loop.response_ids, hf.response_ids) and torch.equal(loop.response_mask, hf.response_mask)
    # the same key gives the same completion alone, in another order and beside other rows
    for rows in ([2], [3, 0], [1, 2, 3, 0]):
        sub_ids, sub_mask = _batch([PROMPTS[r] for r in rows], pad)
        sub = generate(
            peaked, sub_ids, sub_mask, s_loop, eos_ids=eos, pad_id=pad, row_keys=[keys[r] for r in rows], seed=3
        )
        for j, r in enumerate(rows):
            n = int(loop.response_mask[r].sum())
            assert int(sub.response_mask[j].sum()) == n
            assert torch.equal(sub.response_ids[j, :n], loop.response_ids[r, :n])


@pytest.mark.skipif(not packing_available(torch.float32), reason="this torch build has no oneDNN packed linear")
def test_packed_linears_compute_the_linear_and_come_off_after():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8, bias=False))
    x = torch.randn(5, 16)
    want = model(x)
    packed = PackedLinears(model)
    with torch.no_grad(), packed:
        assert all("forward" in m.__dict__ for m in (model[0], model[2]))
        got = model(x)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert not any("forward" in m.__dict__ for m in model)  # the class's forward again
    assert model(x).requires_grad  # autograd works again outside


@pytest.mark.skipif(not packing_available(torch.float32), reason="this torch build has no oneDNN packed linear")
def test_packs_follow_weights_changed_in_place_and_are_kept_otherwise():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    x = torch.randn(3, 16)
    packed = PackedLinears(layer)
    with torch.no_grad(), packed:
        layer(x)
    first = packed.packs[layer][1]
    with torch.no_grad(), packed:
        layer(x)
    assert packed.packs[layer][1] is first  # unchanged weights: not packed again
    with torch.no_grad():
        layer.weight.mul_(2.0)  # an optimizer step is an in-place update like this one
        with packed:
            got = layer(x)
    assert packed.packs[layer][1] is not first
    assert torch.allclose(got, layer(x), atol=1e-5)
    packed.release()
    assert packed.packs == {}


@pytest.mark.skipif(not packing_available(torch.bfloat16), reason="this CPU has no native bf16 oneDNN path")
def test_packs_take_the_autocast_dtype():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    x = torch.randn(3, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = layer(x)
        with PackedLinears(layer) as packed:
            got = layer(x)
    assert packed.packs[layer][1].dtype == torch.bfloat16
    assert got.dtype == want.dtype == torch.bfloat16 and torch.allclose(got.float(), want.float(), atol=2e-2)


def test_what_the_loop_leaves_to_generate(peaked):
    assert loop_fallback(peaked, stop=[], sampled_by_hf=False, synced=False) is None
    assert loop_fallback(peaked, stop=["\n"], sampled_by_hf=False, synced=False) == "stop strings"
    assert loop_fallback(peaked, stop=[], sampled_by_hf=True, synced=False) == "unkeyed sampling"
    assert loop_fallback(peaked, stop=[], sampled_by_hf=False, synced=True) == "synced decoding (sharded model)"
    peaked.generation_config.repetition_penalty = 1.3
    try:
        assert loop_fallback(peaked, stop=[], sampled_by_hf=False, synced=False) == (
            "generation_config.repetition_penalty=1.3"
        )
    finally:
        peaked.generation_config.repetition_penalty = 1.0


def test_a_processor_in_the_models_generation_config_is_still_applied(peaked, tokenizer):
    """The loop would ignore a repetition penalty; generate() hands such a model to model.generate."""
    ids, mask = _batch(PROMPTS, tokenizer.pad_token_id)
    pad, eos = tokenizer.pad_token_id, [tokenizer.eos_token_id]
    plain = generate(peaked, ids, mask, SamplingConfig(max_new_tokens=12, greedy=True), eos_ids=eos, pad_id=pad)
    peaked.generation_config.repetition_penalty = 50.0
    try:
        penal = generate(peaked, ids, mask, SamplingConfig(max_new_tokens=12, greedy=True), eos_ids=eos, pad_id=pad)
    finally:
        peaked.generation_config.repetition_penalty = 1.0
    for row in range(4):  # a penalty of 50 forbids repeating a token in practice: every row's tokens distinct
        tokens = penal.response_ids[row][penal.response_mask[row].bool()].tolist()
        assert len(set(tokens)) == len(tokens)
    assert not torch.equal(plain.response_ids, penal.response_ids)


def test_bad_decoder_is_refused():
    with pytest.raises(ValueError, match="--decoder must be loop or generate, got 'vllm'"):
        SamplingConfig(decoder="vllm")
