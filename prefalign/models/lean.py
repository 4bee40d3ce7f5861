"""Training forwards of Llama-family RMSNorm, SwiGLU and attention layers that keep fewer tensors for the backward pass.

Autograd keeps what each op's backward needs, op by op. Per token and decoder layer, transformers' Llama forwards
keep (d = hidden size, f = MLP width; SmolLM2-135M: d = 576, f = 1536):

- ``LlamaRMSNorm`` (twice a layer): its float32 input (for ``pow`` and the multiply) and the normalised float32
  ``x * rsqrt(mean(x^2) + eps)`` (for the weight multiply), d floats each; and its output, ``weight * normalised``,
  which the GEMMs after it (q/k/v_proj, gate/up_proj) keep as their input for their weight gradients: d more;
- ``LlamaMLP``, ``down(silu(gate(x)) * up(x))``: ``gate(x)`` (silu's input), ``silu(gate(x))`` and ``up(x)`` (the
  product's inputs) and the product (``down``'s input): four of f.

Here the norm keeps its input and the per-row ``rsqrt`` only, and rebuilds the normalised row in its backward; the
GEMMs after a norm keep their input as the norm's input and ``rsqrt`` too (saved-tensor hooks around the attention
and the MLP's first GEMMs), rebuilt once per backward by the norm's last two ops; the MLP keeps ``gate(x)`` and
``up(x)`` only, and rebuilds ``silu(gate(x))`` and the product from them when the backward needs them (elementwise
work, against the layer's seven GEMMs). That is 4d + 2f floats fewer per token and layer: for SmolLM2-135M in
float32, 5,812 floats held for the backward instead of 11,207 (-48%; `python -m bench.levers held-activations`;
`tests/test_lean.py` checks the count on a tiny Llama). Under bf16 autocast the GEMMs keep bf16 copies of their
input instead of the norm's output, so that part saves nothing there. The forward runs the same ops in the same
order, so outputs are bitwise transformers'; so are each layer's gradients (its backward is autograd's chain for
the same ops on the same bits). A whole model's gradients agree to float32 rounding: the residual stream adds the
norm's and the skip path's gradients in another order.

Applied per module, and only where it is exact: a module whose class's ``forward`` has the same source text as
transformers' ``LlamaRMSNorm.forward`` / ``LlamaMLP.forward`` / ``LlamaAttention.forward`` (about 130 model
families copy those; anything else, including a model whose code changes in a later transformers, keeps its own
forward), and for the MLP, a SiLU activation. Without gradients (sampling, frozen models, evaluation) the original
forward runs. Not combined with gradient checkpointing, which already recomputes every activation, nor under
another saved-tensor hook (CPU offload), which sees what it would have seen.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _normalise(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """``LlamaRMSNorm``'s output from its input and the per-row ``rsqrt``: the forward's last ops, in its order."""
    return weight * (x.to(torch.float32) * rstd).to(x.dtype)


class _RMSNorm(torch.autograd.Function):
    """``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)`` in float32, as ``LlamaRMSNorm``; keeps x and rsqrt."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.to(torch.float32)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        out = _normalise(x, weight, rstd)
        # what rebuilds ``out`` (`_rebuilt_from_norm_inputs`): x and rstd, which this backward keeps anyway, and a
        # copy of the weight's d values as this forward saw them: the rebuild runs in the backward of the GEMMs
        # after the norm, before the norm's own, when FSDP or ZeRO-3 may not have gathered the norm's weight yet
        out._lean_norm_inputs = (x, weight.detach().clone(), rstd)  # type: ignore[attr-defined]
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # autograd's own chain for transformers' ops (derivatives.yaml), op for op: the same bits
        x, weight, rstd = ctx.saved_tensors
        xf = x.to(torch.float32)
        normed = (xf * rstd).to(x.dtype)
        grad_weight = (grad * normed).sum_to_size(weight.shape) if ctx.needs_input_grad[1] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            g = (grad * weight).to(x.dtype).to(torch.float32)  # through weight * normed, then normed's cast
            grad_r = (g * xf).sum_to_size(rstd.shape)  # xf * rstd
            grad_var = -0.5 * grad_r * rstd.pow(3)  # rsqrt
            grad_sq = grad_var.expand(xf.shape) / xf.shape[-1]  # mean over the last dimension
            grad_x = (g * rstd + grad_sq * (2 * xf.pow(1))).to(x.dtype)  # both uses of xf: the product, pow(2)
        return grad_x, grad_weight, None


class _SiLUGate(torch.autograd.Function):
    """``silu(gate) * up``; keeps gate and up (silu's output is rebuilt in the backward)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        # the kernels autograd runs for silu and the product, on the same operands: the same bits
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


def _norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled():
        return type(self).forward(self, hidden_states)
    return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def _outer_saved_tensor_hooks() -> bool:
    """Whether saved-tensor hooks are already active (activation checkpointing, CPU offload): only the innermost
    pair applies, so `_kept_as`'s own pair would hide what the GEMMs save from them."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None  # unknown in another torch: assume there may be some


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled():
        return type(self).forward(self, x)
    with _rebuilt_from_norm_inputs(x):
        gate, up = self.gate_proj(x), self.up_proj(x)
    h = _SiLUGate.apply(gate, up)
    # whatever down_proj (or a LoRA adapter on it) keeps of h is kept as (gate, up), which _SiLUGate holds anyway
    with _kept_as(h, lambda: F.silu(gate) * up, (gate, up)):
        return self.down_proj(h)


def _attention_forward(self, *args, **kwargs):
    """``LlamaAttention.forward``, where what q/k/v_proj (and LoRA adapters on them) keep of a lean norm's output,
    their input, is kept as the norm's own saved tensors."""
    hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    with _rebuilt_from_norm_inputs(hidden_states):
        return type(self).forward(self, *args, **kwargs)


def _rebuilt_from_norm_inputs(y: torch.Tensor):
    """A context in which whatever a forward keeps of ``y``, when ``y`` is a lean RMSNorm's output, is kept as the
    norm's input and ``rsqrt`` (held for the norm's own backward anyway) and weight, and rebuilt by the norm's last
    ops (`_normalise`, the same bits) when the backward asks for it: d floats fewer per token for each norm output
    a GEMM keeps. Does nothing for another tensor (and what `_kept_as` leaves alone)."""
    inputs = getattr(y, "_lean_norm_inputs", None)
    if inputs is None:
        return contextlib.nullcontext()
    x, weight, rstd = inputs
    return _kept_as(y, lambda: _normalise(x, weight, rstd), (x,))


def _kept_as(t: torch.Tensor, rebuild, sources: tuple[torch.Tensor, ...]):
    """Saved-tensor hooks under which whatever autograd keeps of ``t``, ``t`` itself or a view of it (a 3-D input
    reaches a GEMM as a (B*T, n) view), is kept as ``rebuild``, a function of ``sources`` (tensors kept anyway),
    and rebuilt with the same kernels when the backward asks for it: once for all the views kept under these hooks
    (q, k and v_proj each keep one), held until the last of them is unpacked. The hooks hold t's address, never t:
    t is freed when its forward returns. A source changed in place before the backward fails it, as autograd's own
    version check would. No hooks (nothing changes) without gradients, under an outer saved-tensor hook, or when t
    is not its storage's whole (what shares the storage is not t's to rebuild)."""
    if not torch.is_grad_enabled() or _outer_saved_tensor_hooks():
        return contextlib.nullcontext()
    address, nbytes = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
    if not t.is_contiguous() or t.storage_offset() != 0 or t.numel() * t.element_size() != nbytes:
        return contextlib.nullcontext()
    versions = [s._version for s in sources]
    state: dict[str, Any] = {"pending": 0, "rebuilt": None}

    def pack(saved: torch.Tensor):
        storage = saved.untyped_storage()
        if storage.data_ptr() == address and storage.nbytes() == nbytes:
            state["pending"] += 1
            return (saved.size(), saved.stride(), saved.storage_offset())
        return saved

    def unpack(saved):
        if not isinstance(saved, tuple):
            return saved
        if [s._version for s in sources] != versions:
            raise RuntimeError(
                "a tensor the lean activations rebuild from was modified in place between the forward and the "
                "backward; train with --no-lean-activations"
            )
        if state["rebuilt"] is None:
            with torch.no_grad():
                state["rebuilt"] = rebuild()
        full = state["rebuilt"]
        state["pending"] -= 1
        if state["pending"] <= 0:  # the last view (or a retained graph's second backward: rebuilt each time)
            state["rebuilt"] = None
        return full.as_strided(*saved)

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


@functools.cache
def _reference_sources() -> tuple[str, ...] | None:
    try:
        from transformers.models.llama import modeling_llama as llama

        return tuple(inspect.getsource(c.forward) for c in (llama.LlamaRMSNorm, llama.LlamaMLP, llama.LlamaAttention))
    except (ImportError, OSError, TypeError):
        return None


_SOURCES: dict[type, str | None] = {}


def forward_source(cls: type) -> str | None:
    """The source text of the ``forward`` a class defines itself (None: inherited or unreadable); read once."""
    if cls not in _SOURCES:
        forward = cls.__dict__.get("forward")
        try:
            _SOURCES[cls] = None if forward is None else inspect.getsource(forward)
        except (OSError, TypeError):
            _SOURCES[cls] = None
    return _SOURCES[cls]


def _lean_forward(module: nn.Module):
    """The lean forward for ``module``, or None where it would not compute exactly what the module's own does."""
    ref = _reference_sources()
    src = forward_source(type(module))
    if ref is None or src is None:
        return None
    if src == ref[0]:
        return _norm_forward
    if src == ref[1] and isinstance(getattr(module, "act_fn", None), nn.SiLU | silu_class()):
        return _mlp_forward
    if src == ref[2]:
        return _attention_forward
    return None


@functools.cache
def silu_class() -> type:
    try:
        from transformers.activations import SiLUActivation

        return SiLUActivation
    except ImportError:  # an older transformers: ACT2FN["silu"] is nn.SiLU
        return nn.SiLU


def lean_activations(model: nn.Module) -> dict[str, int]:
    """Give every matching RMSNorm and MLP of ``model`` its lean training forward (an instance attribute; other
    models of the class are untouched), and every matching attention a forward that keeps its q/k/v projections'
    input as the norm's. Returns how many of each were changed: ``{"rms_norm": n, "mlp": m, "attention": a}``."""
    names = {_norm_forward: "rms_norm", _mlp_forward: "mlp", _attention_forward: "attention"}
    counts = dict.fromkeys(names.values(), 0)
    for module in model.modules():
        forward = _lean_forward(module)
        if forward is None:
            continue
        # a partial, not a bound method: it pickles (torch.save of the model) and deep-copies onto the copy
        module.forward = functools.partial(forward, module)
        counts[names[forward]] += 1
    return counts


def save_activation_memory(model: Any, *, gradient_checkpointing: bool, lean: bool) -> str:
    """What a trainable transformers ``model`` keeps for its backward: transformers' gradient checkpointing
    (non-reentrant: every decoder layer's activations recomputed), else the lean forwards (`lean_activations`), else
    transformers' own. Returns it in words, for ``run.json``."""
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return "gradient checkpointing"
    if lean:
        counts = lean_activations(model)
        layers = f"{counts['rms_norm']} RMSNorm, {counts['mlp']} SwiGLU MLP, {counts['attention']} attention layers"
        return f"lean ({layers})"
    return "transformers' forwards"
