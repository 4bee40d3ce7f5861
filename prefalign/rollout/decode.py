"""prefalign's decode loop: one prefill, then one token per step on the KV cache, with the linear layers' weights
prepacked for oneDNN on CPU.

Why not only ``model.generate``: on a CPU a batch-8 decode step of the 135M default is a few dozen small-M GEMMs
(8 rows against each weight matrix). ``F.linear`` reads the weights at 8-14 GB/s in float32 (12-18 in bfloat16),
far below what the machine streams (BENCHMARKS.md); the same products against weights reordered once into oneDNN's
blocked layout (``torch.ops.mkldnn._reorder_linear_weight``, what inductor's CPU freezing pass uses) run 2-4x faster
in float32 and 1.5-2x in bfloat16. The gain is the packing (the loop on unpacked weights measured no faster than
``generate``); the loop is our own so that packing, keyed sampling and early exit sit in one short function we test
token for token against ``generate``. For a Llama (`prefalign.rollout.fused_llama`) the loop runs its own fused
step instead of the model's forward: q/k/v one packed GEMM, gate/up another, keys and values in buffers allocated
once per call (another 1.14x in float32, 1.18x in bfloat16; BENCHMARKS.md, "The fused Llama step").
``torch.compile`` of the one-token step over a static cache was measured too and was *slower* on this CPU
(BENCHMARKS.md, "The decode path"); compiling the fused step measured no faster than running it eagerly.

The contract is `generate`'s: left-padded prompts in, raw response tokens out (rows that ended are padded with
``pad_id``, as ``generate`` pads them), the loop stops when every row has ended, positions skip padding. Greedy
tokens equal ``model.generate``'s and keyed sampling draws the same tokens as ``generate`` with `KeyedSampler`,
up to the float rounding of the packed GEMMs (tested token for token on tiny models).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from prefalign.models.logprobs import token_stats

if TYPE_CHECKING:  # fused_llama imports this module
    from prefalign.rollout.fused_llama import FusedLlama

# generation-config fields whose non-neutral values make ``model.generate`` add a logits processor or a stopping
# rule, or pick a search (beams, contrastive, DoLa), the loop does not implement: ``model.generate`` fills every field
# we leave unset from the model's own generation config, so a model that sets one is sampled by ``model.generate``
# (see `loop_fallback`)
_NEUTRAL = {
    "num_beams": 1,
    "num_beam_groups": 1,
    "diversity_penalty": 0.0,
    "penalty_alpha": None,
    "dola_layers": None,
    "watermarking_config": None,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "min_length": 0,
    "min_new_tokens": 0,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "sequence_bias": None,
    "exponential_decay_length_penalty": None,
    "guidance_scale": 1.0,
    "renormalize_logits": False,
    "max_time": None,
    "stop_strings": None,
}


def loop_fallback(model, *, stop: list[str], sampled_by_hf: bool, synced: bool) -> str | None:
    """Why the decode loop cannot sample this call (``model.generate`` does it instead), or None when it can.

    The loop implements greedy and keyed sampling (`KeyedSampler`), EOS and early exit; stop strings, Hugging
    Face's own (unkeyed) sampling, synced decoding for a sharded model (every process in every forward) and the
    processors a model's generation config may switch on stay with ``model.generate``.
    """
    if stop:
        return "stop strings"
    if sampled_by_hf:
        return "unkeyed sampling"
    if synced:
        return "synced decoding (sharded model)"
    own_inputs = _own_generation_inputs(model)
    if own_inputs is not None:
        return own_inputs
    config = getattr(model, "generation_config", None)
    for name, neutral in _NEUTRAL.items():
        value = getattr(config, name, None)
        if value is not None and value != neutral:
            return f"generation_config.{name}={value!r}"
    return None


def _cache_arg(model) -> str | None:
    """The forward's key/value cache argument: ``cache`` (transformers 5.2x renamed ``past_key_values``, whose old
    name warns), ``past_key_values`` (4.x), or None where the forward takes neither."""
    from prefalign.models.loading import base_model

    params = inspect.signature(base_model(model).forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def _own_generation_inputs(model) -> str | None:
    """Why ``model``'s cached decoding is not the loop's (None: it is). The loop feeds each step a ``DynamicCache``,
    the whole attention mask and positions, as ``GenerationMixin.prepare_inputs_for_generation`` does; a model
    whose class prepares its own inputs (Mamba drops the mask after the first step; the loop passed it whole) or
    whose forward takes no cache (RWKV's ``state``: ``**kwargs`` swallowed the loop's cache, every step saw one
    token alone) decoded other tokens than ``model.generate`` from the second on, silently."""
    from transformers import GenerationMixin

    from prefalign.models.loading import base_model

    cls = type(base_model(model))
    if _cache_arg(model) is None:
        return f"{cls.__name__}'s forward takes no key/value cache"
    if getattr(cls, "prepare_inputs_for_generation", None) is not GenerationMixin.prepare_inputs_for_generation:
        return f"{cls.__name__} prepares its own generation inputs"
    return None


def learned_position_limit(model) -> int | None:
    """The positions a model with a learned absolute position table takes (GPT-2's ``n_positions``, OPT's
    ``max_position_embeddings``; a table may hold a few offset rows more), None for one without: RoPE or ALiBi run
    past the config's number, as ``model.generate`` lets them (warning only), while a table lookup past its end
    fails as torch's bare "index out of range in self"."""
    config = getattr(model, "config", None)
    inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for name in ("n_positions", "max_position_embeddings"):
        limit = getattr(config, name, None)
        if isinstance(limit, int) and any(
            isinstance(m, nn.Embedding) and m is not inputs and limit <= m.num_embeddings <= limit + 2
            for m in model.modules()
        ):
            return limit
    return None


@torch.no_grad()
def decode(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    max_new_tokens: int,
    choose: Callable[[torch.Tensor, int], torch.Tensor],
    *,
    eos_ids: list[int],
    pad_id: int,
    fused: FusedLlama | None = None,
) -> torch.Tensor:
    """Raw response tokens ``(B, R)``, ``R <= max_new_tokens``: row ``b``'s tokens up to its first EOS, then
    ``pad_id``; ``R`` is the step at which every row had ended (or ``max_new_tokens``).

    Args:
        prompt_ids: ``(B, P)`` left-padded prompts; prompt_mask: ``(B, P)`` 1 on real tokens.
        choose: ``(logits (B, V) float32, position t) -> (B,)`` the next token of every row (greedy: argmax;
            keyed: `KeyedSampler.choose`). Called at t = 0 .. R-1.
        fused: the model's `FusedLlama` (`PackedLinears.fused`): prefill and steps run on it instead of the
            model's forward.
    """
    from transformers import DynamicCache

    from prefalign.models.logprobs import position_ids_from_mask

    b = prompt_ids.shape[0]
    dev = prompt_ids.device
    cache_arg = _cache_arg(model) or "past_key_values"  # a forward without either is `loop_fallback`'s
    eos = torch.tensor(eos_ids, device=dev)
    cache = DynamicCache(config=getattr(model, "config", None))
    # positions skip the left padding, as generate's do; a pad's own position does not matter (it is masked)
    positions = position_ids_from_mask(prompt_mask)  # (B, P)
    # the attention mask grows by one column of ones per step (ended rows keep attending, as in generate)
    mask = torch.cat([prompt_mask, prompt_mask.new_ones(b, max_new_tokens)], dim=1)
    p, slots = prompt_ids.shape[1], mask.bool()
    if fused is not None:
        fused_cache = fused.new_cache()
        logits = fused(prompt_ids, positions, fused_cache, 0, mask.shape[1], slots)
    else:
        logits = model(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{cache_arg: cache},
        ).logits[:, -1]
    next_position = positions[:, -1:] + 1  # (B, 1)
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    tokens = []
    for t in range(max_new_tokens):
        token = choose(logits.float(), t)  # (B,)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        tokens.append(token)
        done = done | torch.isin(token, eos)
        if t == max_new_tokens - 1 or bool(done.all()):
            break
        if fused is not None:
            logits = fused(token[:, None], next_position + t, fused_cache, p + t, mask.shape[1], slots)
            continue
        logits = model(
            input_ids=token[:, None],
            attention_mask=mask[:, : p + t + 1],
            position_ids=next_position + t,
            use_cache=True,
            **{cache_arg: cache},
        ).logits[:, -1]
    return torch.stack(tokens, dim=1)


class LogprobRecorder:
    """A `decode` choose function that also records, at every step, the log-prob of the token it chose and the
    entropy of ``softmax(logits / temperature)`` (`prefalign.models.logprobs.token_stats`: the distribution before
    top-k / top-p, as `completion_logprobs` scores it); ``generate(record_logprobs=True)`` uses it. A fresh forward
    over the finished sequences gives the same numbers up to the rounding of a cached decode against a full forward
    (float32: at most 3e-5 measured on tiny models whose logits run to tens, tested); PPO's rollout takes its old
    log-probs from here instead of running that forward (as TRL's PPO takes them from its sampling logits).
    ``entropy=False`` records the log-probs only."""

    def __init__(self, choose: Callable[[torch.Tensor, int], torch.Tensor], temperature: float, entropy: bool = True):
        self.choose, self.temperature, self.with_entropy = choose, temperature, entropy
        self.logps: list[torch.Tensor] = []  # per step (B,)
        self.entropy: list[torch.Tensor] = []

    def __call__(self, logits: torch.Tensor, position: int) -> torch.Tensor:
        token = self.choose(logits, position)
        stats = token_stats(logits, token, self.temperature, self.with_entropy)
        self.logps.append(stats[0])
        if self.with_entropy:
            self.entropy.append(stats[1])
        return token

    def stats(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(logps, entropy)``, each ``(B, R)`` for the response mask ``mask (B, R)``, 0 where it is 0; the
        entropy None when not recorded."""
        width, keep = mask.shape[1], mask.bool()  # width <= the steps decoded: the responses were cut from them

        def response(steps: list[torch.Tensor]) -> torch.Tensor:
            return torch.stack(steps, dim=1)[:, :width].masked_fill(~keep, 0.0)

        return response(self.logps), response(self.entropy) if self.with_entropy else None


def packing_available(dtype: torch.dtype) -> bool:
    """oneDNN's prepacked linear exists in this torch build (and, for bfloat16, this CPU runs it natively)."""
    ops = getattr(torch.ops, "mkldnn", None)
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled and ops is not None):
        return False
    if not (hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")):
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and bool(ops._is_mkldnn_bf16_supported()))


def packable(module: nn.Module) -> bool:
    """A plain CPU float linear: ``nn.Linear``'s own forward (not a subclass that computes something else, not one
    whose forward a hook library already replaced on the instance), not a DTensor (FSDP) shard, not a meta,
    quantised or inference-mode weight (whose version counter cannot be read)."""
    if type(module).forward is not nn.Linear.forward or "forward" in module.__dict__:
        return False
    w = module.weight
    return (
        type(w) in (nn.Parameter, torch.Tensor)
        and w.device.type == "cpu"
        and w.dim() == 2
        and w.dtype in (torch.float32, torch.bfloat16)
        and not w.is_inference()
    )


def pack_weight(weight: torch.Tensor, dtype: torch.dtype, batch_hint: int) -> torch.Tensor:
    """A linear weight ``(out, in)`` reordered once into oneDNN's blocked layout for ``batch_hint``-row inputs."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype), batch_hint)


def linear_key(module: nn.Linear, dtype: torch.dtype) -> tuple:
    """What a pack of ``module`` for ``dtype`` GEMMs was made from: changes when its weight or bias changes in place
    (``_version``: an optimizer step, `refresh_sampling_copy`, ``load_state_dict``) or is replaced (``data_ptr``)."""
    w, b = module.weight, module.bias
    return (w._version, w.data_ptr(), dtype, None if b is None else (b._version, b.data_ptr()))


def packed_linear(packed: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` on `pack_weight`'s ``packed`` (``x`` cast to its dtype)."""
    return torch.ops.mkldnn._linear_pointwise(x.to(packed.dtype), packed, bias, "none", [], "")


class PackedLinears:
    """While entered, every plain CPU ``nn.Linear`` of ``model`` runs on a oneDNN-prepacked copy of its weight
    (inference only: the copy has no autograd). Packs are kept between entries and repacked only for weights or
    biases changed in place since (``Tensor._version``: an optimizer step, `refresh_sampling_copy`,
    ``load_state_dict``) or replaced. A write through ``.data`` (peft's ``merge_adapter``) bumps no version: call
    `release` after one. Under CPU autocast the packs take the autocast dtype, as autocast's per-call cast would.

    Memory: one packed copy of the linear weights (a tied LM head included) while packs are held; `release` drops
    them. A trainer, whose weights change every iteration, packs per call rather than holding a copy through its
    update (at fp32 precision the sampler is the policy itself: the copy exists during generation only).
    The forwards are patched on the module instances: another thread running the same model meanwhile would run
    on the packs, without autograd (nothing in prefalign does).

    A Llama model (`prefalign.rollout.fused_llama.fused_unsupported` is None) is packed as a `FusedLlama` instead
    (``fuse=False``: per linear, as above): nothing is patched, and `decode` runs ``self.fused`` while entered.
    """

    def __init__(self, model: nn.Module, batch_hint: int = 8, fuse: bool = True):
        self.model, self.fuse = model, fuse
        self.modules: list[nn.Linear] = [m for m in model.modules() if isinstance(m, nn.Linear)]
        self.batch_hint = batch_hint
        self.packs: dict[nn.Linear, tuple[tuple, torch.Tensor, torch.Tensor | None]] = {}
        self._patched: list[nn.Linear] = []
        self.fused: FusedLlama | None = None  # while entered: the fused step `decode` runs instead of the model
        self._fused_packs: FusedLlama | None = None

    def _dtype(self, module: nn.Linear) -> torch.dtype:
        if torch.is_autocast_enabled("cpu"):
            return torch.get_autocast_dtype("cpu")
        return module.weight.dtype

    def _pack(self) -> list[nn.Linear]:
        packed = []
        for m in self.modules:
            dtype = self._dtype(m)
            if not (packable(m) and packing_available(dtype)):  # checked per entry: the model may have moved
                continue
            key = linear_key(m, dtype)
            if m not in self.packs or self.packs[m][0] != key:
                weight = pack_weight(m.weight, dtype, self.batch_hint)
                bias = None if m.bias is None else m.bias.detach().to(dtype)
                self.packs[m] = (key, weight, bias)
            packed.append(m)
        return packed

    def _fused(self) -> FusedLlama | None:
        """The model's `FusedLlama`, packed again when a weight changed; None where `fused_unsupported` says."""
        from prefalign.rollout.fused_llama import FusedLlama, fused_key, fused_unsupported

        if not (self.fuse and self.modules):
            return None
        dtype = self._dtype(self.modules[0])
        if fused_unsupported(self.model, dtype) is not None:
            self._fused_packs = None
            return None
        if self._fused_packs is None or self._fused_packs.key != fused_key(self.model, dtype):
            self._fused_packs = None  # the stale packs go before the new ones are made
            self._fused_packs = FusedLlama(self.model, dtype, self.batch_hint)
        self.packs.clear()
        return self._fused_packs

    def __enter__(self) -> PackedLinears:
        self.fused = self._fused()
        if self.fused is not None:  # decode runs the fused step: no linear needs its own pack
            return self
        self._patched = self._pack()
        for m in self._patched:
            _, weight, bias = self.packs[m]
            # an instance attribute shadows the class's forward
            m.forward = functools.partial(packed_linear, weight, bias)  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc) -> None:
        for m in self._patched:
            m.__dict__.pop("forward", None)
        self._patched, self.fused = [], None

    def release(self) -> None:
        """Drop the packed copies (the next entry packs again)."""
        self.packs.clear()
        self._fused_packs = None
