"""A Llama decode step on fused, oneDNN-prepacked weights: what `prefalign.rollout.decode.decode` runs, prefill
included, for a model whose every layer computes exactly transformers' Llama forwards.

Why: on a CPU a batch-8 decode step of the 135M default is ~210 small-M GEMMs plus transformers' per-step work
(mask building, cache bookkeeping, one module call per projection). Here q/k/v are one GEMM and gate/up another (121
GEMMs a step instead of 211: the same bytes read, in wider products), the keys and values go into buffers allocated
once per call, and nothing but the arithmetic runs per layer. Measured 1.12-1.18x the per-projection packed loop
in float32 and bfloat16 on the default model at batch 8-16 (BENCHMARKS.md, "The fused Llama step");
``torch.compile`` of this very step measured no faster, so it stays eager.

Exactness: the same operations as transformers' `LlamaRMSNorm`, `LlamaAttention` (RoPE, grouped-query SDPA),
`LlamaMLP` and `LlamaDecoderLayer`, in the same order and dtypes; only the fused GEMMs round differently (float32
logits within 1e-5 of the model's own forward, greedy tokens equal to ``model.generate``'s: tests/test_fused_llama.py).
A model that differs anywhere (another architecture, a LoRA or hooked layer, a sharded weight, an overridden
forward) is decoded through its own forward instead; `fused_unsupported` says why.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prefalign.models.lean import forward_source, silu_class
from prefalign.rollout.decode import linear_key, pack_weight, packable, packed_linear, packing_available

# transformers' classes whose forward the step reimplements; a module is accepted when its class defines a forward
# with the same source text (a copy under another name, e.g. a fine-tune's custom code, passes; any change, or a
# subclass that only inherits it, does not)
_CLASSES = ("LlamaForCausalLM", "LlamaModel", "LlamaDecoderLayer", "LlamaAttention", "LlamaMLP", "LlamaRMSNorm")
_MLP = ("gate_proj", "up_proj", "down_proj")


# sha256 of those forwards' sources and RoPE's two helpers, in transformers releases whose Llama the step was checked
# against (tests/test_fused_llama.py): another release's Llama may compute something else (a cast, a norm, a
# soft-cap) while still matching itself, so it decodes through its own forward until checked and added here
_VERIFIED = {"4e5a79e50150bf6ab2224a601dbdbc155ae8411fdd22e5581d84eea686edecd1": "5.24.0"}


@functools.cache
def _reference() -> dict[str, str] | str:
    """The installed transformers' Llama forward sources by class name, or why they cannot be used."""
    try:
        import transformers
        from transformers.models.llama import modeling_llama as llama

        ref = {name: inspect.getsource(getattr(llama, name).forward) for name in _CLASSES}
        helpers = [inspect.getsource(llama.apply_rotary_pos_emb), inspect.getsource(llama.rotate_half)]
    except (ImportError, OSError, TypeError, AttributeError):
        return "this transformers has no Llama forwards to match"
    digest = hashlib.sha256("\n".join([*ref.values(), *helpers]).encode()).hexdigest()
    if digest not in _VERIFIED:
        return f"transformers {transformers.__version__}'s Llama forwards are not those the fused step was checked on"
    return ref


def _own_forward(module: Any, ref: str) -> bool:
    """``module`` runs ``ref``: its class's forward has that source and no instance forward replaces it (the lean
    training forwards of `prefalign.models.lean` compute the same and are accepted)."""
    if forward_source(type(module)) != ref:
        return False
    forward = module.__dict__.get("forward")
    return forward is None or getattr(getattr(forward, "func", None), "__module__", "") == "prefalign.models.lean"


def fused_unsupported(model: Any, dtype: torch.dtype) -> str | None:
    """Why `FusedLlama` cannot decode ``model`` with ``dtype`` GEMMs (None: it can)."""
    ref = _reference()
    if isinstance(ref, str):
        return ref
    if not packing_available(dtype):
        return f"no oneDNN packed {dtype} linear here"
    if getattr(model, "training", False):
        return "the model is in training mode (dropout)"
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 5):
        return f"torch {torch.__version__} has no grouped-query SDPA (enable_gqa: torch 2.5)"
    if not _own_forward(model, ref["LlamaForCausalLM"]):
        return f"{type(model).__name__} is not a Llama causal LM"
    base = model.model
    if not _own_forward(base, ref["LlamaModel"]) or type(base.embed_tokens) is not nn.Embedding:
        return f"{type(base).__name__} does not run Llama's model forward"
    if base.embed_tokens.max_norm is not None or base.embed_tokens.__dict__.get("forward") is not None:
        return "the token embedding is not a plain lookup"
    config = model.config
    if len(base.layers) < config.num_hidden_layers:
        return "fewer layers than config.num_hidden_layers"
    if not getattr(config, "is_causal", True):
        return "config.is_causal is False (bidirectional attention)"
    attention = getattr(config, "_attn_implementation", None)
    # SDPA is what the step runs; eager attention's float32 softmax differs from it by float32 rounding only
    if not (attention == "sdpa" or (attention == "eager" and dtype == torch.float32)):
        return f"attention implementation {attention!r} with {dtype} (the step runs SDPA)"
    for i, layer in enumerate(base.layers[: model.config.num_hidden_layers]):
        attn, mlp = layer.self_attn, layer.mlp
        parts = [(layer, "LlamaDecoderLayer"), (attn, "LlamaAttention"), (mlp, "LlamaMLP")]
        parts += [(n, "LlamaRMSNorm") for n in (layer.input_layernorm, layer.post_attention_layernorm)]
        if not all(_own_forward(m, ref[name]) for m, name in parts):
            return f"layer {i} differs from Llama's"
        if not isinstance(mlp.act_fn, nn.SiLU | silu_class()):
            return f"layer {i}'s MLP activation is not SiLU"
        if not getattr(attn, "is_causal", True):
            return f"layer {i}'s attention is not causal"
        if _shapes(layer) != _shapes(base.layers[0]) or _shapes(layer)[:3] != _config_shapes(config, attn):
            return f"layer {i}'s projection shapes differ from the config's heads"
    if not _own_forward(base.norm, ref["LlamaRMSNorm"]):
        return "the final norm differs from Llama's"
    # the projections the step packs, each a plain nn.Linear (a LoRA layer wrapping one is not: its delta would be
    # lost), all of one dtype
    linears = [model.lm_head] + [
        proj
        for layer in base.layers[: model.config.num_hidden_layers]
        for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")), (layer.mlp, _MLP))
        for proj in (getattr(parent, n, None) for n in names)
    ]
    if not all(isinstance(m, nn.Linear) and packable(m) for m in linears):
        return "a projection is not a plain CPU float nn.Linear"
    if any(m.weight.dtype != linears[0].weight.dtype for m in linears):
        return "the projections' weights differ in dtype"
    if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
        return "a module has forward hooks"
    if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
        return "global module forward hooks are registered"
    return None


def _shapes(layer: Any) -> tuple:
    """Output widths of q, k, v, o, gate, up (None where a projection is not a linear)."""
    attn, mlp = layer.self_attn, layer.mlp
    projections = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj)
    return tuple(getattr(p, "out_features", None) for p in projections)


def _config_shapes(config: Any, attn: Any) -> tuple:
    """The q, k, v widths the config's head counts and the attention's head_dim give."""
    q, kv = config.num_attention_heads * attn.head_dim, config.num_key_value_heads * attn.head_dim
    return (q, kv, kv)


def _rms_norm(norm: Any, h: torch.Tensor) -> torch.Tensor:
    """`LlamaRMSNorm`'s forward, op for op."""
    x = h.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * x.to(h.dtype)


def _pack(dtype: torch.dtype, batch_hint: int, *linears: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One prepacked weight for the linears' outputs side by side (and their biases, zeros for a bias-less one)."""
    weight = torch.cat([m.weight.detach() for m in linears])
    bias = None
    if any(m.bias is not None for m in linears):
        parts = [m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.out_features) for m in linears]
        bias = torch.cat(parts).to(dtype)
    return pack_weight(weight, dtype, batch_hint), bias


def _linear(x: torch.Tensor, packed: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
    return packed_linear(*packed, x)


class FusedLlama:
    """Prefill and one-token steps of a Llama causal LM on packed weights: per layer q/k/v as one product and
    gate/up as another, keys and values written into ``(B, kv_heads, L, head_dim)`` buffers (one per layer and
    call, `cache`). Holds one packed copy of the linear weights (the bytes `PackedLinears` would hold); the norms,
    the embedding and RoPE are the model's own. ``dtype``: the GEMMs' (the model's, or CPU autocast's)."""

    def __init__(self, model: Any, dtype: torch.dtype, batch_hint: int = 8):
        self.model = model
        base = model.model
        self.layers = []
        for layer in base.layers[: model.config.num_hidden_layers]:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(
                (
                    _pack(dtype, batch_hint, attn.q_proj, attn.k_proj, attn.v_proj),
                    _pack(dtype, batch_hint, attn.o_proj),
                    _pack(dtype, batch_hint, mlp.gate_proj, mlp.up_proj),
                    _pack(dtype, batch_hint, mlp.down_proj),
                )
            )
        self.head = _pack(dtype, batch_hint, model.lm_head)
        attn = base.layers[0].self_attn
        self.heads, self.kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads
        self.head_dim = attn.head_dim
        self.intermediate = base.layers[0].mlp.gate_proj.out_features
        self.key = fused_key(model, dtype)

    def new_cache(self) -> list[list[torch.Tensor | None]]:
        """Per layer ``[keys, values]``, each allocated at its first write (in the dtype of what is written)."""
        return [[None, None] for _ in self.layers]

    @torch.no_grad()
    def __call__(
        self, ids: torch.Tensor, positions: torch.Tensor, cache: list, start: int, length: int, key_mask: torch.Tensor
    ) -> torch.Tensor:
        """Logits ``(B, V)`` at the last of ``ids`` ``(B, T)`` (positions ``(B, T)``), whose keys and values go to
        cache slots ``start .. start+T-1`` of buffers ``length`` long; ``key_mask`` ``(B, start+T)`` bool: the
        slots a query may attend (causal order inside ``ids`` added here)."""
        base = self.model.model
        b, t = ids.shape
        h, kv, width = base.embed_tokens(ids), self.kv_heads, start + t
        cos, sin = base.rotary_emb(h, position_ids=positions)  # (B, T, head_dim) each
        half = self.head_dim // 2
        c1, c2, s1, s2 = cos[..., None, :half], cos[..., None, half:], sin[..., None, :half], sin[..., None, half:]
        mask = key_mask[:, None, None, :width]  # (B, 1, 1, width)
        if t > 1:  # causal inside the new tokens; a query always sees itself, so a padding query has no empty row
            slot = torch.arange(width, device=ids.device)
            query = torch.arange(start, width, device=ids.device)[:, None]  # (T, 1)
            mask = (mask & (slot <= query)) | (slot == query)  # (B, 1, T, width)
        qk_heads = self.heads + kv
        for layer, (qkv_w, o_w, gate_up_w, down_w), kv_cache in zip(base.layers, self.layers, cache):
            attn = layer.self_attn
            qkv = _linear(_rms_norm(layer.input_layernorm, h), qkv_w).view(b, t, qk_heads + kv, self.head_dim)
            x1, x2 = qkv[..., :qk_heads, :half], qkv[..., :qk_heads, half:]
            # (q * cos) + (rotate_half(q) * sin), rotate_half(q) = cat(-x2, x1), as apply_rotary_pos_emb
            qk = torch.cat([(x1 * c1) + (-x2 * s1), (x2 * c2) + (x1 * s2)], dim=-1)  # (B, T, H + KV, head_dim)
            new_k, new_v = qk[:, :, self.heads :].transpose(1, 2), qkv[:, :, qk_heads:].transpose(1, 2)
            if kv_cache[0] is None:
                kv_cache[0] = new_k.new_empty(b, kv, length, self.head_dim)
                kv_cache[1] = new_v.new_empty(b, kv, length, self.head_dim)
            kv_cache[0][:, :, start:width] = new_k
            kv_cache[1][:, :, start:width] = new_v
            o = F.scaled_dot_product_attention(
                qk[:, :, : self.heads].transpose(1, 2),
                kv_cache[0][:, :, :width],
                kv_cache[1][:, :, :width],
                attn_mask=mask,
                scale=attn.scaling,
                enable_gqa=True,
            )  # (B, H, T, head_dim)
            h = h + _linear(o.transpose(1, 2).reshape(b, t, self.heads * self.head_dim), o_w)
            gate_up = _linear(_rms_norm(layer.post_attention_layernorm, h), gate_up_w)
            gate, up = gate_up[..., : self.intermediate], gate_up[..., self.intermediate :]
            h = h + _linear(layer.mlp.act_fn(gate) * up, down_w)
        return _linear(_rms_norm(base.norm, h[:, -1]), self.head)


def fused_key(model: Any, dtype: torch.dtype) -> tuple:
    """Changes when any linear's `linear_key` changes (a weight or bias written in place or replaced, another
    dtype), or the config's layer or head counts change."""
    config = model.config
    shape = (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads)
    return (shape, *(linear_key(m, dtype) for m in model.modules() if isinstance(m, nn.Linear)))
