"""--lean-activations: Llama-family RMSNorm and SwiGLU MLP layers keep fewer tensors for the backward pass; the forward
is bitwise transformers', each layer's gradients too, and a whole model's to float32 rounding."""

import copy
import json

import pytest
import torch
from conftest import trainer_kwargs
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from prefalign.models.lean import lean_activations, save_activation_memory
from prefalign.models.tiny import tiny_causal_lm
from prefalign.trainers.reward import RewardConfig, RewardTrainer


def _grads(module, *inputs, precision="fp32", seed=2):
    module.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = module(*inputs)
    out = out.logits if hasattr(out, "logits") else out
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    out.float().backward(g)
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return out.detach(), grads


def _input(shape, dtype=torch.float32):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    return x.requires_grad_()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_output_and_gradients_are_transformers_bit_for_bit(dtype):
    norm = LlamaRMSNorm(48, eps=1e-5)
    norm.weight.data = torch.randn(48, generator=torch.Generator().manual_seed(0))
    lean = copy.deepcopy(norm)
    assert lean_activations(lean) == {"rms_norm": 1, "mlp": 0}
    x1, x2 = _input((3, 7, 48), dtype), _input((3, 7, 48), dtype)
    out1, g1 = _grads(norm, x1)
    out2, g2 = _grads(lean, x2)
    assert torch.equal(out1, out2)
    assert torch.equal(x1.grad, x2.grad)
    assert torch.equal(g1["weight"], g2["weight"])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_mlp_output_and_gradients_are_transformers_bit_for_bit(precision):
    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=48, intermediate_size=96, num_attention_heads=4))
    lean = copy.deepcopy(mlp)
    assert lean_activations(lean) == {"rms_norm": 0, "mlp": 1}
    x1, x2 = _input((3, 7, 48)), _input((3, 7, 48))
    out1, g1 = _grads(mlp, x1, precision=precision)
    out2, g2 = _grads(lean, x2, precision=precision)
    assert torch.equal(out1, out2)
    assert torch.equal(x1.grad, x2.grad)
    assert g1.keys() == g2.keys() == {"gate_proj.weight", "up_proj.weight", "down_proj.weight"}
    assert all(torch.equal(g1[k], g2[k]) for k in g1)


def _saved_bytes(model, ids) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of one forward, parameters not counted."""
    storages = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids)
    return sum(storages.values())


def test_a_model_keeps_two_hidden_and_two_mlp_rows_fewer_per_token_and_layer(tokenizer):
    model, _ = tiny_causal_lm(tokenizer, layers=3, hidden=32)
    lean = copy.deepcopy(model)
    assert lean_activations(lean) == {"rms_norm": 7, "mlp": 3}  # 2 norms a layer and the final one
    ids = torch.randint(0, 1000, (2, 11), generator=torch.Generator().manual_seed(0))
    d, f, tokens, layers = 32, 64, 2 * 11, 3
    # each layer: the two norms' normalised rows (d each), the MLP's silu(gate) and product (f each); the final norm
    per_token = layers * (2 * d + 2 * f) + d
    assert _saved_bytes(model, ids) - _saved_bytes(lean, ids) == tokens * per_token * 4


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_model_has_the_same_logits_and_gradients_to_rounding(tokenizer, precision):
    model, _ = tiny_causal_lm(tokenizer, layers=3, hidden=32, init_std=0.3)
    lean = copy.deepcopy(model)
    lean_activations(lean)
    ids = torch.randint(0, 1000, (2, 11), generator=torch.Generator().manual_seed(0))
    out1, g1 = _grads(model, ids, precision=precision)
    out2, g2 = _grads(lean, ids, precision=precision)
    assert torch.equal(out1, out2)
    assert g1.keys() == g2.keys() and len(g1) == len(list(model.parameters()))
    # the residual stream sums the norm's and the skip path's gradients in another order: float32 rounding (bf16
    # autocast then rounds some of the GEMM inputs to another bf16 value)
    tol = 1e-5 if precision == "fp32" else 2e-3
    for k in g1:
        assert torch.allclose(g1[k], g2[k], rtol=0, atol=tol * g1[k].abs().max().item()), k


def test_lora_adapters_get_the_same_gradients(tokenizer):
    from peft import LoraConfig, get_peft_model

    base, _ = tiny_causal_lm(tokenizer, layers=2, hidden=32, init_std=0.3)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["down_proj", "up_proj", "q_proj"], init_lora_weights=False)
    model = get_peft_model(copy.deepcopy(base), cfg)
    lean = copy.deepcopy(model)
    assert lean_activations(lean) == {"rms_norm": 5, "mlp": 2}
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    out1, g1 = _grads(model, ids)
    out2, g2 = _grads(lean, ids)
    assert torch.equal(out1, out2)
    assert len(g1) == 12 and g1.keys() == g2.keys()  # A and B of 3 modules x 2 layers
    for k in g1:
        assert torch.allclose(g1[k], g2[k], rtol=0, atol=1e-5 * g1[k].abs().max().item()), k


def test_a_copy_runs_its_own_weights(tokenizer):
    """sampling_copy deep-copies the policy: the copy's lean forwards must be bound to the copy, not the original."""
    model, _ = tiny_causal_lm(tokenizer, layers=2, hidden=32)
    lean_activations(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(1.5)
    assert twin.model.norm.forward.__self__ is twin.model.norm
    assert twin.model.layers[0].mlp.forward.__self__ is twin.model.layers[0].mlp
    ids = torch.randint(0, 1000, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    assert not torch.equal(twin(input_ids=ids).logits, before)  # with gradients: the lean path
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_other_forwards_and_activations_keep_their_own():
    class Scaled(LlamaMLP):
        def forward(self, x):
            return 2 * super().forward(x)

    gelu = LlamaMLP(
        LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=4, hidden_act="gelu_pytorch_tanh")
    )
    scaled = Scaled(LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=4))
    model = torch.nn.Sequential(gelu, scaled)
    assert lean_activations(model) == {"rms_norm": 0, "mlp": 0}
    assert "forward" not in vars(gelu) and "forward" not in vars(scaled)


def test_gradient_checkpointing_wins_and_off_leaves_the_model_alone(tokenizer):
    model, _ = tiny_causal_lm(tokenizer, layers=2, hidden=32)
    assert save_activation_memory(model, gradient_checkpointing=False, lean=False) == "transformers' forwards"
    assert not any("forward" in vars(m) for m in model.modules())
    assert save_activation_memory(model, gradient_checkpointing=True, lean=True) == "gradient checkpointing"
    assert model.is_gradient_checkpointing and not any("forward" in vars(m) for m in model.modules())
    other, _ = tiny_causal_lm(tokenizer, layers=2, hidden=32)
    assert (
        save_activation_memory(other, gradient_checkpointing=False, lean=True)
        == "lean (5 RMSNorm, 2 SwiGLU MLP layers)"
    )


def test_a_reward_run_is_the_same_run_and_says_which(tmp_path, tiny_model_dir, pairs):
    runs = {}
    for lean in (True, False):
        out = tmp_path / f"lean-{lean}"
        kw = trainer_kwargs(tmp_path, tiny_model_dir, pairs, max_steps=3, lean_activations=lean, output=str(out))
        trainer = RewardTrainer(RewardConfig(**kw))
        trainer.train()
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[lean] = ([r["loss"] for r in rows if "loss" in r], json.loads((out / "run.json").read_text()))
    (lean_losses, lean_info), (stock_losses, stock_info) = runs[True], runs[False]
    assert lean_info["activations"] == "lean (5 RMSNorm, 2 SwiGLU MLP layers)"
    assert stock_info["activations"] == "transformers' forwards"
    assert len(lean_losses) == 3 and lean_losses[0] == stock_losses[0]  # the first step's forward: the same bits
    assert lean_losses == pytest.approx(stock_losses, rel=1e-5)
