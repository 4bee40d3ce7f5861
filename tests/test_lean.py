"""--lean-activations: Llama-family RMSNorm, SwiGLU MLP and attention layers keep fewer tensors for the backward pass;
the forward is bitwise transformers', each layer's gradients too, and a whole model's to float32 rounding."""

import copy
import json

import pytest
import torch
from conftest import trainer_kwargs
from torch.multiprocessing.reductions import StorageWeakRef
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from prefalign.models.lean import lean_activations, save_activation_memory
from prefalign.models.tiny import tiny_causal_lm
from prefalign.trainers.reward import RewardConfig, RewardTrainer


def _grads(module, *inputs, precision="fp32", seed=2, watch=()):
    module.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = module(*inputs)
    out = out.logits if hasattr(out, "logits") else out
    alive = [not ref.expired() for ref, _ in watch]  # between the forward and the backward
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    out.float().backward(g)
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return (out.detach(), grads, alive) if watch else (out.detach(), grads)


def _input(shape, dtype=torch.float32):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    return x.requires_grad_()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_output_and_gradients_are_transformers_bit_for_bit(dtype):
    norm = LlamaRMSNorm(48, eps=1e-5)
    norm.weight.data = torch.randn(48, generator=torch.Generator().manual_seed(0))
    lean = copy.deepcopy(norm)
    assert lean_activations(lean) == {"rms_norm": 1, "mlp": 0, "attention": 0}
    x1, x2 = _input((3, 7, 48), dtype), _input((3, 7, 48), dtype)
    out1, g1 = _grads(norm, x1)
    out2, g2 = _grads(lean, x2)
    assert torch.equal(out1, out2)
    assert torch.equal(x1.grad, x2.grad)
    assert torch.equal(g1["weight"], g2["weight"])


def _down_inputs(mlps) -> list[tuple[StorageWeakRef, int]]:
    """A weak reference to, and the address of, the storage of each down_proj input (the MLP product h) of the
    next forward of ``mlps``."""
    refs = []

    def record(module, inputs):
        storage = inputs[0].untyped_storage()
        refs.append((StorageWeakRef(storage), storage.data_ptr()))

    for mlp in mlps:
        mlp.down_proj.register_forward_pre_hook(record)
    return refs


@pytest.mark.parametrize("shape", [(3, 7, 48), (7, 48)])  # 3-D: down_proj's GEMM keeps a (B*T, f) view of h
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_mlp_output_and_gradients_are_transformers_bit_for_bit(precision, shape):
    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=48, intermediate_size=96, num_attention_heads=4))
    lean = copy.deepcopy(mlp)
    assert lean_activations(lean) == {"rms_norm": 0, "mlp": 1, "attention": 0}
    stock_h, lean_h = _down_inputs([mlp]), _down_inputs([lean])
    x1, x2 = _input(shape), _input(shape)
    out1, g1, stock_alive = _grads(mlp, x1, precision=precision, watch=stock_h)
    out2, g2, lean_alive = _grads(lean, x2, precision=precision, watch=lean_h)
    # between forward and backward: transformers' down_proj keeps h, the lean MLP rebuilds it from gate and up
    assert (stock_alive, lean_alive) == ([True], [False])
    assert torch.equal(out1, out2)
    assert torch.equal(x1.grad, x2.grad)
    assert g1.keys() == g2.keys() == {"gate_proj.weight", "up_proj.weight", "down_proj.weight"}
    assert all(torch.equal(g1[k], g2[k]) for k in g1)


def _held_bytes(model, ids) -> int:
    """Bytes a forward allocates and does not free (what its backward will read, and the output), as torch's
    profiler counts them; no saved-tensor hook involved, so nothing the lean MLP keeps is hidden from it."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        out = model(input_ids=ids)  # held (with its graph) until the profile ends
    del out
    return sum(e.self_cpu_memory_usage for e in prof.events())


def test_a_model_keeps_four_hidden_and_two_mlp_rows_fewer_per_token_and_layer(tokenizer):
    model, _ = tiny_causal_lm(tokenizer, layers=3, hidden=32)
    lean = copy.deepcopy(model)
    # 2 norms a layer and the final one
    assert lean_activations(lean) == {"rms_norm": 7, "mlp": 3, "attention": 3}
    ids = torch.randint(0, 1000, (2, 11), generator=torch.Generator().manual_seed(0))
    d, f, tokens, layers = 32, 64, 2 * 11, 3
    # each layer: the two norms' normalised rows and their outputs, the GEMMs' input (d each), the MLP's silu(gate)
    # and product (f each); the final norm's normalised row (the head keeps its output). Held instead: a copy of each
    # norm's weight (d floats a norm, not a token)
    per_token = layers * (4 * d + 2 * f) + d
    assert _held_bytes(model, ids) - _held_bytes(lean, ids) == (tokens * per_token - 7 * d) * 4


def test_under_another_saved_tensor_hook_down_proj_keeps_its_input_where_that_hook_sees_it(tokenizer):
    """Activation checkpointing and CPU offload work through saved-tensor hooks; only the innermost pair applies,
    so the lean MLP leaves down_proj's input to an outer pair instead of hiding it."""
    model, _ = tiny_causal_lm(tokenizer, layers=2, hidden=32)
    lean_activations(model)
    inputs = _down_inputs([layer.mlp for layer in model.model.layers])
    seen = set()

    def pack(t):
        seen.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=torch.randint(0, 1000, (1, 5), generator=torch.Generator().manual_seed(0))).logits
    assert len(inputs) == 2 and not any(ref.expired() for ref, _ in inputs)  # down_proj keeps h ...
    assert all(ptr in seen for _, ptr in inputs)  # ... where the outer hook saw it
    out.sum().backward()


def _norm_outputs(norms) -> list[tuple[StorageWeakRef, int]]:
    """Like `_down_inputs`, for the outputs of the next forward of ``norms``."""
    refs = []

    def record(module, inputs, output):
        storage = output.untyped_storage()
        refs.append((StorageWeakRef(storage), storage.data_ptr()))

    for norm in norms:
        norm.register_forward_hook(record)
    return refs


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_projections_keep_a_norm_output_as_the_norms_inputs_and_get_the_same_gradients(tokenizer, precision):
    """q/k/v_proj and gate/up_proj keep their input, a norm's output, for their weight gradient: the lean model
    keeps it as the norm's input and rsqrt (held anyway) and rebuilds it bit for bit; under bf16 autocast the
    GEMMs keep a bf16 copy instead, and the norm's output is freed on either side."""
    model, _ = tiny_causal_lm(tokenizer, layers=2, hidden=32, init_std=0.3)
    lean = copy.deepcopy(model)
    lean_activations(lean)
    watched = [
        _norm_outputs([n for layer in m.model.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)])
        for m in (model, lean)
    ]
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    out1, g1, stock_alive = _grads(model, ids, precision=precision, watch=watched[0])
    out2, g2, lean_alive = _grads(lean, ids, precision=precision, watch=watched[1])
    assert stock_alive == [precision == "fp32"] * 4 and lean_alive == [False] * 4
    assert torch.equal(out1, out2)
    for k in g1:  # the rebuilt rows are the same bits: only the residual stream's summation order differs
        tol = 1e-5 if precision == "fp32" else 2e-3
        assert torch.allclose(g1[k], g2[k], rtol=0, atol=tol * g1[k].abs().max().item()), k


def test_each_norm_output_is_rebuilt_once_per_backward_and_a_retained_graph_backs_up_twice(tokenizer, monkeypatch):
    from prefalign.models import lean as lean_module

    model, _ = tiny_causal_lm(tokenizer, layers=2, hidden=32, init_std=0.3)
    lean_activations(model)
    calls = []
    original = lean_module._normalise
    monkeypatch.setattr(lean_module, "_normalise", lambda *a: calls.append(1) or original(*a))
    out = model(input_ids=torch.randint(0, 1000, (2, 5), generator=torch.Generator().manual_seed(0))).logits
    forward_calls = len(calls)  # every norm's forward: 2 a layer and the final one
    out.sum().backward(retain_graph=True)
    first = {n: p.grad.clone() for n, p in model.named_parameters()}
    # q, k and v_proj keep the first norm's output, gate and up_proj the second's: one rebuild each, not five
    assert (forward_calls, len(calls) - forward_calls) == (5, 4)
    model.zero_grad()
    out.sum().backward()
    assert all(torch.equal(p.grad, first[n]) for n, p in model.named_parameters())


def test_a_norm_input_changed_in_place_before_the_backward_fails_it():
    """What the GEMMs' input is rebuilt from is checked as autograd checks what it saves; the GEMMs' backward runs
    before the norm's, so it is the rebuild that finds the change."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=48, intermediate_size=96, num_attention_heads=4)
    norm, mlp = LlamaRMSNorm(48), LlamaMLP(config)
    lean_activations(norm)
    lean_activations(mlp)
    x = _input((2, 5, 48)) * 1.0  # not a leaf: an in-place change is allowed
    out = mlp(norm(x))
    with torch.no_grad():
        x.mul_(2)
    with pytest.raises(RuntimeError, match="lean activations rebuild from was modified in place"):
        out.sum().backward()


def test_the_rebuild_uses_the_norm_weight_the_forward_saw(tokenizer):
    """FSDP and ZeRO-3 gather a module's weights for its own backward; the GEMMs after a norm run theirs first, so
    the norm's weight is copied (d floats) at the forward, and a weight swapped out meanwhile changes nothing."""
    model, _ = tiny_causal_lm(tokenizer, layers=1, hidden=32, init_std=0.3)
    lean = copy.deepcopy(model)
    lean_activations(lean)
    ids = torch.randint(0, 1000, (1, 5), generator=torch.Generator().manual_seed(0))
    _, expected = _grads(lean, ids)
    lean.zero_grad()
    norm = lean.model.layers[0].input_layernorm
    kept = norm.weight.data
    calls = []

    def gather(grad):  # the norm output's gradient is complete: every GEMM after it has run its backward
        calls.append(1)
        norm.weight.data = kept

    def watch(module, inputs, output):
        output.register_hook(gather)

    norm.register_forward_hook(watch)
    out = lean(input_ids=ids).logits
    norm.weight.data = torch.empty(0)  # as a sharded weight outside its module's forward and backward
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(2)))
    assert calls == [1]  # the weight came back only for the norm's own backward
    assert all(torch.equal(p.grad, expected[n]) for n, p in lean.named_parameters())


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
    assert lean_activations(lean) == {"rms_norm": 5, "mlp": 2, "attention": 2}
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    out1, g1 = _grads(model, ids)
    out2, g2 = _grads(lean, ids)
    assert torch.equal(out1, out2)
    assert len(g1) == 12 and g1.keys() == g2.keys()  # A and B of 3 modules x 2 layers
    for k in g1:
        assert torch.allclose(g1[k], g2[k], rtol=0, atol=1e-5 * g1[k].abs().max().item()), k


def test_a_copy_runs_its_own_weights_and_a_saved_model_loads(tokenizer, tmp_path):
    """sampling_copy deep-copies the policy: the copy's lean forwards must run the copy's norms and MLPs."""
    model, _ = tiny_causal_lm(tokenizer, layers=2, hidden=32, init_std=0.3)
    lean_activations(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():  # only what the lean forwards compute with: bound to the original, they would ignore it
        for name, p in twin.named_parameters():
            if "norm" in name or "mlp" in name:
                p.mul_(1.5)
    ids = torch.randint(0, 1000, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        own = twin(input_ids=ids).logits  # no gradients: transformers' forwards, on the twin's own weights
        original = model(input_ids=ids).logits
    assert not torch.equal(own, original)
    assert torch.equal(twin(input_ids=ids).logits.detach(), own)  # with gradients: the lean forwards
    torch.save(model, tmp_path / "model.pt")  # the whole module pickled, lean forwards included
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert torch.equal(loaded(input_ids=ids).logits.detach(), original)


def test_other_forwards_and_activations_keep_their_own():
    class Scaled(LlamaMLP):
        def forward(self, x):
            return 2 * super().forward(x)

    gelu = LlamaMLP(
        LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=4, hidden_act="gelu_pytorch_tanh")
    )
    scaled = Scaled(LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=4))
    model = torch.nn.Sequential(gelu, scaled)
    assert lean_activations(model) == {"rms_norm": 0, "mlp": 0, "attention": 0}
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
        == "lean (5 RMSNorm, 2 SwiGLU MLP, 2 attention layers)"
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
    assert lean_info["activations"] == "lean (5 RMSNorm, 2 SwiGLU MLP, 2 attention layers)"
    assert stock_info["activations"] == "transformers' forwards"
    assert len(lean_losses) == 3 and lean_losses[0] == stock_losses[0]  # the first step's forward: the same bits
    assert lean_losses == pytest.approx(stock_losses, rel=1e-5)
