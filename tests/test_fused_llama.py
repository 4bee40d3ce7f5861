"""The fused Llama decode step (prefalign/rollout/fused_llama.py): the model's own logits, step by step, and the
models it refuses."""

import pytest
import torch
from torch import nn

from prefalign.rollout.decode import PackedLinears, decode, packing_available
from prefalign.rollout.fused_llama import FusedLlama, fused_unsupported

pytestmark = pytest.mark.skipif(not packing_available(torch.float32), reason="no oneDNN packed linear here")

VOCAB = 97
# left-padded prompts: row 1 has two pads, row 2 five
IDS = torch.tensor([[5, 17, 23, 9, 40, 41, 7], [0, 0, 8, 3, 60, 61, 62], [0, 0, 0, 0, 0, 90, 4]])
MASK = (torch.arange(7) >= torch.tensor([[0], [2], [5]])).long()


def _llama(seed=0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,  # grouped-query attention, as the default model's 9 / 3
        max_position_embeddings=256,
        initializer_range=0.3,  # a peaked next-token distribution: logits of a few units
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**config, **overrides})).eval()
    with torch.no_grad():  # non-trivial norm weights and biases: a fused step that dropped one would show
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.normal_(1.0 if "norm" in name else 0.0, 0.3)
    return model


def _steps(model, fused, new):
    """Logits ``(B, 1 + new, V)``: the prefill's last, then one per fed token (the next token of ``IDS``' rows
    continued with fixed tokens, so both paths see the same inputs)."""
    from prefalign.models.logprobs import position_ids_from_mask

    feed = torch.tensor([[11, 12, 13, 14], [21, 22, 23, 24], [31, 32, 33, 34]])[:, :new]
    b, p = IDS.shape
    slots = torch.cat([MASK, torch.ones(b, new, dtype=torch.long)], 1).bool()
    positions = position_ids_from_mask(MASK)
    cache = fused.new_cache()
    out = [fused(IDS, positions, cache, 0, p + new, slots)]
    for t in range(new):
        out.append(fused(feed[:, t : t + 1], positions[:, -1:] + 1 + t, cache, p + t, p + new, slots))
    # the model's own decoding of the same tokens: its prefill, then one cached forward per token (a full forward
    # over the whole sequence gives the same logits, but for dynamic RoPE, whose frequencies follow the longest
    # position of each call)
    from transformers import DynamicCache

    cache, want = DynamicCache(config=model.config), []
    with torch.no_grad():
        for lo, hi in [(0, p)] + [(p + t, p + t + 1) for t in range(new)]:
            ids = torch.cat([IDS, feed], 1)[:, lo:hi]
            pos = position_ids_from_mask(slots.long())[:, lo:hi]
            out_ = model(input_ids=ids, attention_mask=slots[:, :hi].long(), position_ids=pos, cache=cache)
            want.append(out_.logits[:, -1])
    return torch.stack(out, 1), torch.stack(want, 1)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=False),
        dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}),
        dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 500.0}, max_position_embeddings=8),
        dict(
            rope_parameters={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
                "rope_theta": 500.0,
            }
        ),
        dict(num_key_value_heads=6, head_dim=16),
        dict(attn_implementation="eager"),
    ],
    ids=["gqa", "biases-untied", "linear-rope", "dynamic-rope-past-max", "llama3-rope", "mha-head-dim", "eager"],
)
def test_fused_logits_are_the_models_own_at_every_step(overrides):
    from prefalign.models.logprobs import position_ids_from_mask

    model = _llama(**overrides)
    assert fused_unsupported(model, torch.float32) is None
    got, want = _steps(model, FusedLlama(model, torch.float32), new=4)
    assert got.shape == want.shape == (3, 5, VOCAB)
    assert want.abs().max() > 2.0  # logits of a few units: the 1e-5 below is relative to real numbers
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if "dynamic" not in str(overrides):  # and one full forward gives them too
        feed = torch.tensor([[11, 12, 13, 14], [21, 22, 23, 24], [31, 32, 33, 34]])
        mask = torch.cat([MASK, torch.ones(3, 4, dtype=torch.long)], 1)
        with torch.no_grad():
            full = model(
                input_ids=torch.cat([IDS, feed], 1), attention_mask=mask, position_ids=position_ids_from_mask(mask)
            )
        torch.testing.assert_close(got, full.logits[:, IDS.shape[1] - 1 :], atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not packing_available(torch.bfloat16), reason="this CPU has no native bf16 oneDNN path")
def test_fused_bf16_logits_are_the_models_own_to_bf16_rounding():
    model = _llama().to(torch.bfloat16)
    got, want = _steps(model, FusedLlama(model, torch.bfloat16), new=3)
    assert got.dtype == torch.bfloat16
    # measured equal to the bit; allowed: 2 bf16 steps at the logits' magnitude (4-8: steps of 1/32)
    torch.testing.assert_close(got.float(), want.float(), atol=1 / 16, rtol=0)
    assert (got.float().argmax(-1) == want.float().argmax(-1)).float().mean() > 0.9


@pytest.mark.skipif(not packing_available(torch.bfloat16), reason="this CPU has no native bf16 oneDNN path")
def test_a_float32_model_under_bf16_autocast_is_fused_in_bf16():
    """Autocast's dtypes: bf16 GEMMs, the residual stream, norms and RoPE in float32, as the model's own forward."""
    model = _llama()
    with torch.autocast("cpu", dtype=torch.bfloat16), PackedLinears(model) as packed:
        assert packed.fused is not None and packed.fused.head[0].dtype == torch.bfloat16
        got, want = _steps(model, packed.fused, new=3)
    # measured equal to the bit; allowed: 2 bf16 steps at the logits' magnitude (4-8: steps of 1/32)
    torch.testing.assert_close(got.float(), want.float(), atol=1 / 16, rtol=0)
    assert (got.float().argmax(-1) == want.float().argmax(-1)).float().mean() > 0.9


def test_greedy_fused_decode_is_generates():
    model = _llama(seed=3)
    eos = [int(IDS[0, 0])]
    with torch.no_grad():
        want = model.generate(
            input_ids=IDS, attention_mask=MASK, do_sample=False, max_new_tokens=9, eos_token_id=eos, pad_token_id=0
        )[:, IDS.shape[1] :]
    with PackedLinears(model) as packed:
        assert packed.fused is not None
        got = decode(model, IDS, MASK, 9, lambda x, t: x.argmax(-1), eos_ids=eos, pad_id=0, fused=packed.fused)
    assert torch.equal(got, want[:, : got.shape[1]]) and (want[:, got.shape[1] :] == 0).all()


def test_packs_follow_a_weight_changed_in_place_and_are_kept_otherwise():
    model = _llama()
    packed = PackedLinears(model)
    with packed:
        first = packed.fused
    with packed:
        assert packed.fused is first  # unchanged weights: not packed again
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.mul_(-1.0)  # an optimizer step, in place
    with packed:
        assert packed.fused is not first
        got, want = _steps(model, packed.fused, new=2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    packed.release()
    assert packed._fused_packs is None


def test_lean_training_forwards_are_still_fused():
    from prefalign.models.lean import lean_activations

    model = _llama()
    assert sum(lean_activations(model).values()) > 0
    assert fused_unsupported(model, torch.float32) is None


class _DoubledMLP(nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp
        self.act_fn = mlp.act_fn
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj

    def forward(self, x):
        return 2 * self.mlp(x)


def test_models_that_differ_from_llama_are_refused_with_the_reason():
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2)).eval()
    assert fused_unsupported(gpt2, torch.float32) == "GPT2LMHeadModel is not a Llama causal LM"
    odd = _llama()
    odd.model.layers[1].mlp = _DoubledMLP(odd.model.layers[1].mlp)
    assert fused_unsupported(odd, torch.float32) == "layer 1 differs from Llama's"
    hooked = _llama()
    hooked.model.layers[0].self_attn.register_forward_hook(lambda m, i, o: o)
    assert fused_unsupported(hooked, torch.float32) == "a module has forward hooks"
    lora = get_peft_model(_llama(), LoraConfig(r=2, target_modules=["q_proj"], lora_dropout=0.0)).eval()
    assert fused_unsupported(lora, torch.float32) == "PeftModel is not a Llama causal LM"
    # the Llama inside: its q_proj is a LoRA layer around an nn.Linear, whose delta a fused q/k/v GEMM would drop
    assert fused_unsupported(lora.base_model.model, torch.float32) == "a projection is not a plain CPU float nn.Linear"
    mixed = _llama()
    mixed.model.layers[0].mlp.down_proj.to(torch.bfloat16)
    assert fused_unsupported(mixed, torch.float32) == "the projections' weights differ in dtype"
    swapped = _llama()
    swapped.model.layers[0].post_attention_layernorm.forward = lambda h: h
    assert fused_unsupported(swapped, torch.float32) == "layer 0 differs from Llama's"
    # a refused model decodes through its own forward: PackedLinears packs its linears one by one
    with PackedLinears(odd) as packed:
        assert packed.fused is None and len(packed.packs) == sum(isinstance(m, nn.Linear) for m in odd.modules())


def test_configs_the_step_does_not_compute_are_refused():
    training = _llama(attention_dropout=0.1).train()
    assert fused_unsupported(training, torch.float32) == "the model is in training mode (dropout)"
    bidirectional = _llama()
    bidirectional.config.is_causal = False
    assert fused_unsupported(bidirectional, torch.float32) == "config.is_causal is False (bidirectional attention)"
    # eager attention's softmax is float32 either way: accepted for float32 GEMMs (the logits test above), not bf16
    eager = _llama(attn_implementation="eager").to(torch.bfloat16)
    assert fused_unsupported(eager, torch.bfloat16) == (
        "attention implementation 'eager' with torch.bfloat16 (the step runs SDPA)"
    )
    narrow = _llama()
    narrow.model.layers[1].mlp.gate_proj = nn.Linear(48, 40, bias=False)
    narrow.model.layers[1].mlp.up_proj = nn.Linear(48, 40, bias=False)
    narrow.model.layers[1].mlp.down_proj = nn.Linear(40, 48, bias=False)
    assert fused_unsupported(narrow, torch.float32) == "layer 1's projection shapes differ from the config's heads"


def test_another_transformers_llama_decodes_through_its_own_forward(monkeypatch):
    import transformers

    import prefalign.rollout.fused_llama as fused_llama

    monkeypatch.setattr(fused_llama, "_VERIFIED", {})
    fused_llama._reference.cache_clear()
    try:
        assert fused_unsupported(_llama(), torch.float32) == (
            f"transformers {transformers.__version__}'s Llama forwards are not those the fused step was checked on"
        )
    finally:
        monkeypatch.undo()
        fused_llama._reference.cache_clear()
    assert fused_unsupported(_llama(), torch.float32) is None


def test_fewer_layers_in_the_config_repack_and_run_fewer_layers():
    model = _llama(num_hidden_layers=3)
    packed = PackedLinears(model)
    with packed:
        first = packed.fused
        assert len(first.layers) == 3
    model.config.num_hidden_layers = 2  # the model's forward now runs two layers
    with packed:
        assert packed.fused is not first and len(packed.fused.layers) == 2
        got, want = _steps(model, packed.fused, new=2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_generate_refuses_the_packs_of_another_model():
    from prefalign.rollout import SamplingConfig, generate

    model, other = _llama(), _llama(seed=1)
    with pytest.raises(ValueError, match="packed holds the packs of another model than the one sampled"):
        generate(
            model,
            IDS,
            MASK,
            SamplingConfig(max_new_tokens=2, greedy=True),
            eos_ids=[1],
            pad_id=0,
            packed=PackedLinears(other),
        )
