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


def _loop_greedy(model, ids, mask, new, eos, pad, pack="fused"):
    """The loop's greedy tokens: on the fused Llama step ("fused"), on one pack per linear ("packed") or on the
    model's own linears ("plain")."""
    argmax = lambda logits, t: logits.argmax(-1)  # noqa: E731
    if pack == "plain":
        return decode(model, ids, mask, new, argmax, eos_ids=eos, pad_id=pad)
    with PackedLinears(model, fuse=pack == "fused") as packed:
        fused = packed.fused
        out = decode(model, ids, mask, new, argmax, eos_ids=eos, pad_id=pad, fused=fused)
    if pack == "fused":
        assert fused is not None and packed.packs == {}  # the fused step ran, no linear was packed alone
    else:
        assert len(packed.packs) == sum(isinstance(m, nn.Linear) for m in model.modules())  # every linear ran packed
    return out


PACKS = torch.backends.mkldnn.is_available() and packing_available(torch.float32)
needs_packing = pytest.mark.skipif(not PACKS, reason="this torch build has no oneDNN packed linear")
LOOP = "fused" if PACKS else "plain"  # what generate's loop runs for a Llama on this machine
PACK_MODES = [pytest.param(m, marks=needs_packing) for m in ("fused", "packed")] + ["plain"]


class _Unpacked:
    """A stand-in for PackedLinears in generate: the loop runs the model's own linears."""

    fused = None

    def __init__(self, model, batch_hint):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


@pytest.mark.parametrize("new_tokens", [1, 5, 17])
@pytest.mark.parametrize("pack", PACK_MODES)
def test_greedy_loop_is_generates_greedy_decode(peaked, tokenizer, new_tokens, pack):
    ids, mask = _batch(PROMPTS, tokenizer.pad_token_id)
    assert (mask[:, 0] == 0).any()  # left padding is exercised
    want = _hf_greedy(peaked, ids, mask, new_tokens, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    got = _loop_greedy(peaked, ids, mask, new_tokens, [tokenizer.eos_token_id], tokenizer.pad_token_id, pack)
    assert got.shape == (4, new_tokens) and torch.equal(got, want)


def test_rows_that_end_are_padded_and_the_loop_stops_when_all_have(peaked, tokenizer):
    ids, mask = _batch(PROMPTS, tokenizer.pad_token_id)
    free = _loop_greedy(peaked, ids, mask, 12, [tokenizer.eos_token_id], tokenizer.pad_token_id, pack=LOOP)
    # make row 0's third greedy token an EOS: that row ends mid-batch, the others run on
    eos = [int(free[0, 2])]
    assert not (free[1:, :3] == eos[0]).any(), "pick a token only row 0 emits by step 3"
    pad = 0
    want = _hf_greedy(peaked, ids, mask, 12, eos, pad)
    got = _loop_greedy(peaked, ids, mask, 12, eos, pad, pack=LOOP)
    assert torch.equal(got, want)
    assert (got[0, 3:] == pad).all() and got[0, 2] == eos[0]
    # when every row's next token is an EOS the loop stops at once: one column
    every = sorted({int(t) for t in free[:, 0]})
    assert _loop_greedy(peaked, ids, mask, 12, every, pad, pack=LOOP).shape == (4, 1)


def test_a_row_that_ends_at_its_first_token_while_the_others_run_on(peaked, tokenizer):
    ids, mask = _batch(PROMPTS, tokenizer.pad_token_id)
    free = _loop_greedy(peaked, ids, mask, 8, [tokenizer.eos_token_id], tokenizer.pad_token_id, pack=LOOP)
    eos = [int(free[0, 0])]
    assert not (free[1:, :1] == eos[0]).any(), "pick a first token only row 0 emits"
    pad = 0
    got = _loop_greedy(peaked, ids, mask, 8, eos, pad, pack=LOOP)
    assert torch.equal(got, _hf_greedy(peaked, ids, mask, 8, eos, pad))
    assert got[0, 0] == eos[0] and (got[0, 1:] == pad).all() and got.shape[1] > 1


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


def _keyed(model, tokenizer, decoder, rows=PROMPTS):
    pad = tokenizer.pad_token_id
    ids, mask = _batch(rows, pad)
    sampling = SamplingConfig(max_new_tokens=9, temperature=1.0, decoder=decoder)
    keys = [key_seed(i, 1) for i in range(len(rows))]
    return generate(model, ids, mask, sampling, eos_ids=[tokenizer.eos_token_id], pad_id=pad, row_keys=keys, seed=5)


def test_a_lora_policy_decodes_as_with_generate(tokenizer):
    """PPO --lora-r samples from a peft model: its LoRA layers run (packed or not) exactly as under generate."""
    from peft import LoraConfig, get_peft_model

    model, _ = tiny_causal_lm(tokenizer, hidden=32, layers=2, init_std=0.5, seed=2)
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    with torch.no_grad():  # a trained adapter: B is zero at init, which would hide a LoRA path the loop skipped
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    loop, hf = _keyed(lora, tokenizer, "loop"), _keyed(lora, tokenizer, "generate")
    assert torch.equal(loop.response_ids, hf.response_ids)
    with lora.disable_adapter():
        off = _keyed(lora, tokenizer, "loop")
    assert not torch.equal(loop.response_ids, off.response_ids)  # the adapter changed what was sampled


def test_a_bf16_sampling_copy_under_autocast_decodes_as_with_generate(peaked, tokenizer):
    """PPO's bf16 path: a bf16 copy of the policy sampled under the run's bf16 autocast."""
    from prefalign.rollout import sampling_copy

    copy = sampling_copy(peaked, torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loop, hf = _keyed(copy, tokenizer, "loop"), _keyed(copy, tokenizer, "generate")
    assert torch.equal(loop.response_ids, hf.response_ids)


@needs_packing
def test_forwards_are_restored_when_decoding_fails(peaked):
    ids = torch.tensor([[5, 6, 7]])

    def boom(logits, t):
        raise RuntimeError("sampler failed")

    with pytest.raises(RuntimeError, match="sampler failed"), PackedLinears(peaked):
        decode(peaked, ids, torch.ones_like(ids), 4, boom, eos_ids=[2], pad_id=0)
    assert not any("forward" in m.__dict__ for m in peaked.modules())


@needs_packing
def test_a_bias_changed_in_place_is_repacked():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    x = torch.randn(3, 16)
    packed = PackedLinears(layer)
    with torch.no_grad():
        with packed:
            layer(x)
        layer.bias.add_(1.0)  # the weight untouched
        with packed:
            got = layer(x)
    assert torch.allclose(got, layer(x), atol=1e-5)


class Scaled(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


@needs_packing
def test_linears_with_a_forward_of_their_own_are_left_alone():
    torch.manual_seed(0)
    model = nn.Sequential(Scaled(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))

    def hooked(x):  # what a hook library (accelerate's device_map hooks) puts on an instance
        return torch.zeros(1)

    model[2].forward = hooked
    x = torch.randn(2, 4)
    with torch.no_grad():
        want = model[0](x)
        with PackedLinears(model) as packed:
            assert torch.allclose(model[0](x), want)  # the subclass still doubles
            assert model[2].forward is hooked
        assert list(packed.packs) == [model[1]]
    assert model[2].forward is hooked and "forward" not in model[1].__dict__


def test_ppo_and_rl_pass_their_decoder_to_the_sampler():
    from prefalign.trainers.ppo_config import PPOConfig

    cfg = PPOConfig(prompts="p.txt", reward="vader", decoder="generate")
    assert cfg.sampling().decoder == "generate"
    with pytest.raises(ValueError, match="--decoder must be loop or generate, got 'fast'"):
        PPOConfig(prompts="p.txt", reward="vader", decoder="fast")


@pytest.mark.parametrize("filters", [dict(top_k=40), dict(top_p=0.8)], ids=["top-k", "top-p"])
@pytest.mark.parametrize("pack", PACK_MODES)
def test_recorded_logprobs_are_a_fresh_forwards(peaked, tokenizer, pack, filters):
    """The log-probs and entropies recorded while decoding (keyed sampling at temperature 0.7 with top-k or top-p:
    scored under the tempered distribution before the filter, as the update's forward scores them) equal
    `completion_logprobs` over the finished sequences, left padding and a row that ends mid-batch included, to
    float32 rounding (measured: at most 1.6e-5 absolute, 4.4e-6 relative, on this peaked model's log-probs of a few
    nats; a cached decode against a full forward); 0 past every response; and nothing is recorded unless asked, or
    when model.generate samples."""
    from prefalign.models.logprobs import completion_logprobs

    pad = tokenizer.pad_token_id
    ids, mask = _batch(PROMPTS, pad)
    keys = [key_seed(i, 0) for i in range(4)]
    sampling = SamplingConfig(max_new_tokens=10, temperature=0.7, decoder="loop", **filters)
    free = generate(peaked, ids, mask, sampling, eos_ids=[tokenizer.eos_token_id], pad_id=pad, row_keys=keys, seed=3)
    eos = [int(free.response_ids[0, 2])]  # row 0 ends at its third token, the others run on
    assert not (free.response_ids[1:, :3] == eos[0]).any()
    run = dict(eos_ids=eos, pad_id=pad, row_keys=keys, seed=3)
    with pytest.MonkeyPatch.context() as mp:
        import sys

        if pack == "plain":  # the recorder reads the plain linears' logits (no oneDNN packs)
            mp.setattr(sys.modules["prefalign.rollout.generate"], "PackedLinears", _Unpacked)
        elif pack == "packed":  # one pack per linear, the model's own forward
            mp.setattr(
                sys.modules["prefalign.rollout.generate"],
                "PackedLinears",
                lambda m, batch_hint: PackedLinears(m, batch_hint, fuse=False),
            )
        from prefalign.rollout.fused_llama import FusedLlama

        fused_calls = []
        step = FusedLlama.__call__
        mp.setattr(FusedLlama, "__call__", lambda *a, **k: fused_calls.append(1) or step(*a, **k))
        gen = generate(peaked, ids, mask, sampling, **run, record_logprobs=True)
        unrecorded = generate(peaked, ids, mask, sampling, **run)
        no_entropy = generate(peaked, ids, mask, sampling, **run, record_logprobs=True, record_entropy=False)
    assert bool(fused_calls) == (pack == "fused")  # generate ran the fused Llama step, and only where it should
    assert torch.equal(gen.response_ids, unrecorded.response_ids) and unrecorded.logps is None
    assert unrecorded.recorded is None
    assert gen.recorded is not None and gen.recorded[0] is gen.logps and gen.recorded[1] is gen.entropy
    # log-probs only: the same tokens and log-probs, no entropy
    assert torch.equal(no_entropy.response_ids, gen.response_ids) and torch.equal(no_entropy.logps, gen.logps)
    assert no_entropy.entropy is None
    assert int(gen.response_mask[0].sum()) == 3 and gen.response_mask[1:].sum() > 3 * 3
    qr, am, cm = gen.sequences()
    with torch.no_grad():
        want_logps, want_entropy = completion_logprobs(peaked, qr, am, cm, temperature=0.7, return_entropy=True)
    width = gen.prompt_ids.shape[1]
    for got, want in ((gen.logps, want_logps), (gen.entropy, want_entropy)):
        assert got.dtype == torch.float32 and got.shape == gen.response_ids.shape
        torch.testing.assert_close(got, want[:, width:], rtol=1e-5, atol=1e-5)
        assert (got[gen.response_mask == 0] == 0).all()
    assert (gen.logps[gen.response_mask == 1] < 0).all()
    hf = SamplingConfig(max_new_tokens=10, temperature=0.7, top_k=40, decoder="generate")
    fallback = generate(peaked, ids, mask, hf, **run, record_logprobs=True)
    assert fallback.logps is None and fallback.entropy is None


def test_a_stop_string_begun_in_the_prompt_ends_the_row_whatever_the_batch(peaked, tokenizer):
    """Hugging Face stops on the token sequence, prompt included: greedy, this model continues "The cat sat on the"
    with "eks", completing the stop string "theeks". The row ends there, alone or beside a row that runs on (with
    pad == EOS the padding after the stop was once taken for the row's EOS)."""
    pad = tokenizer.pad_token_id
    prompts = [tokenizer("The cat sat on the")["input_ids"], tokenizer("Hello there, how")["input_ids"]]
    s = SamplingConfig(max_new_tokens=6, greedy=True, stop=["theeks"])
    both = generate(peaked, *_batch(prompts, pad), s, eos_ids=[pad], pad_id=pad, tokenizer=tokenizer)
    alone = generate(peaked, *_batch(prompts[:1], pad), s, eos_ids=[pad], pad_id=pad, tokenizer=tokenizer)
    assert tokenizer.decode(alone.response_ids[0, :1]) == "eks"
    for gen in (both, alone):
        assert int(gen.response_mask[0].sum()) == 1 and bool(gen.ended[0]) and gen.response_ids[0, 0] == 3504
    assert int(both.response_mask[1].sum()) == 6 and not bool(both.ended[1])  # the other row ran on


def test_a_special_token_stop_string_ends_the_row_whatever_the_batch(tokenizer):
    """``<|im_start|>`` (id 1) as a stop string: its text is not in the decoded response (special tokens are
    skipped), yet Hugging Face stops on it; the row is cut after it and ended, at batch size 1 and 2."""
    from prefalign.eval.sampling import sample_completions

    model, _ = tiny_causal_lm(tokenizer, hidden=32, layers=2, init_std=0.5, seed=1)
    prompts = [tokenizer("The cat sat on the")["input_ids"], tokenizer("Hello there, how")["input_ids"]]
    model.generation_config.sequence_bias = {(prompts[0][-1], 1): 100.0}  # prompt 0 continues with <|im_start|>
    s = SamplingConfig(max_new_tokens=6, greedy=True, stop=["<|im_start|>"])
    for batch_size in (2, 1):
        first = sample_completions(model, tokenizer, prompts, s, 1, batch_size, 0)[0]
        assert (first.response_ids, first.ended, first.text) == ([1], True, ""), batch_size


def _state_space_models():
    """A tiny random Mamba (its class prepares its own generation inputs) and RWKV (its forward keeps a ``state``,
    no key/value cache), with peaked weights."""
    from transformers import MambaConfig, MambaForCausalLM, RwkvConfig, RwkvForCausalLM

    ids = dict(vocab_size=300, pad_token_id=0, eos_token_id=2, bos_token_id=1)
    torch.manual_seed(0)
    mamba = MambaForCausalLM(MambaConfig(hidden_size=32, num_hidden_layers=2, state_size=4, expand=2, **ids))
    rwkv = RwkvForCausalLM(
        RwkvConfig(hidden_size=32, num_hidden_layers=2, attention_hidden_size=32, intermediate_size=64, **ids)
    )
    for model in (mamba, rwkv):
        for p in model.parameters():
            p.data.normal_(0, 0.5)
    return {"mamba": mamba.eval(), "rwkv": rwkv.eval()}


@pytest.mark.filterwarnings("ignore")
def test_models_that_decode_their_own_way_go_to_generate():
    """The loop passes a DynamicCache, the whole mask and positions, as GenerationMixin's inputs are: Mamba (its own
    prepare_inputs_for_generation drops the mask after the prefill) and RWKV (a ``state``, no cache) decoded other
    greedy tokens through it, silently (parting from model.generate's at the second); generate() now gives them to
    model.generate (its tokens, pinned)."""
    models = _state_space_models()
    assert loop_fallback(models["mamba"], stop=[], sampled_by_hf=False, synced=False) == (
        "MambaForCausalLM prepares its own generation inputs"
    )
    assert loop_fallback(models["rwkv"], stop=[], sampled_by_hf=False, synced=False) == (
        "RwkvForCausalLM's forward takes no key/value cache"
    )
    ids, mask = _batch([[5, 17, 230, 9], [41], [200, 201]], 0)
    want = {
        "mamba": [[133, 150, 89, 238, 220, 279], [12, 209, 209, 12, 256, 4], [291, 16, 250, 76, 76, 248]],
        "rwkv": [[190, 211, 88, 211, 211, 68], [211, 211, 68, 211, 211, 68], [211, 211, 68, 211, 211, 68]],
    }
    for name, model in models.items():
        for decoder in ("loop", "generate"):
            s = SamplingConfig(max_new_tokens=6, greedy=True, decoder=decoder)
            got = generate(model, ids, mask, s, eos_ids=[2], pad_id=0)
            assert got.response_ids.tolist() == want[name], (name, decoder)


@pytest.mark.parametrize("decoder", ["loop", "generate"])
def test_a_completion_past_a_learned_position_table_is_refused_before_decoding(decoder):
    """GPT-2's positions are a learned table of config.n_positions rows: a 4-token prompt and 14 new tokens feed
    positions 0..16 (the last token drawn is never fed), one past the 16, which both paths met as torch's
    "IndexError: index out of range in self" deep in the forward, after decoding up to there. generate() refuses
    it first; 13 new tokens still run (model.generate's greedy tokens). A RoPE model (Llama) has no table: it runs
    past its max_position_embeddings, as model.generate lets it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from prefalign.errors import UserError

    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=16, vocab_size=300, pad_token_id=0, eos_token_id=2)
    model = GPT2LMHeadModel(config).eval()
    ids = torch.tensor([[0, 5, 6, 7], [8, 9, 10, 11]])
    run = dict(eos_ids=[2], pad_id=0)
    with pytest.raises(
        UserError,
        match=r"a prompt of 4 tokens and --max-new-tokens 14 feed 17 positions; the model has 16 \(a learned position",
    ):
        generate(model, ids, (ids != 0).long(), SamplingConfig(max_new_tokens=14, greedy=True, decoder=decoder), **run)
    fits = generate(
        model, ids, (ids != 0).long(), SamplingConfig(max_new_tokens=13, greedy=True, decoder=decoder), **run
    )
    assert fits.response_ids.tolist() == _hf_greedy(model, ids, (ids != 0).long(), 13, [2], 0).tolist()
    from prefalign.rollout.decode import learned_position_limit

    assert learned_position_limit(model) == 16
    assert learned_position_limit(tiny_causal_lm(None)[0]) is None
