"""Batched sampling with truncation at the first EOS / stop string.

This is the one place that calls the generation backend, so a faster decoder can replace it without
touching trainers. The response tensors follow one convention everywhere in prefalign: right-padded,
cut after the first EOS (the EOS itself is kept and is the last real token), ``response_mask`` 1 on
real tokens.
"""

from __future__ import annotations

from prefalign.validation import Validated
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingConfig(Validated):
    """How to sample completions."""

    max_new_tokens: int = 64
    """Most tokens to generate per completion."""
    temperature: float = 0.7
    """Softmax temperature (ignored with --greedy)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens with this much probability (1.0 = off)."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = off)."""
    greedy: bool = False
    """Take the most likely token instead of sampling."""
    stop: list[str] = field(default_factory=list)
    """Extra stop strings; a completion is cut before the first one."""

    def validate(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.greedy and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (use --greedy for argmax), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


@dataclass
class SamplingRunConfig(SamplingConfig):
    """What every sampling command (generate, prefs, eval) shares besides the sampling itself."""

    chat: bool = True
    """Wrap plain-text prompts in the model's chat template as a user turn (off: plain continuation)."""
    batch_size: int = 8
    """Completions per generation batch (also the reward models' batch size)."""
    max_prompt_length: int = 512
    """Longer prompts keep their last tokens."""
    dtype: str = "float32"
    """Weights dtype for sampling: float32 or bfloat16."""
    seed: int = 0
    """Random seed."""
    output: str = "runs/sample"
    """Output directory."""
    overwrite: bool = False
    """Replace the files of a previous run in --output."""

    def validate(self):
        super().validate()
        for name in ("batch_size", "max_prompt_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"--dtype must be float32 or bfloat16, got {self.dtype!r}")


@dataclass
class Generation:
    """One batch of sampled completions.

    Fields (B = prompts, P = longest prompt, R = longest response in this batch):
        prompt_ids: ``(B, P)`` left-padded prompt tokens.
        prompt_mask: ``(B, P)`` 1 on real prompt tokens.
        response_ids: ``(B, R)`` right-padded response tokens, cut after the first EOS.
        response_mask: ``(B, R)`` 1 on real response tokens (the EOS included).
        ended: ``(B,)`` bool, the response ended with EOS (not by running out of tokens).
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    ended: torch.Tensor


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and the model's generation-config EOS."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(int(i) for i in gen_eos)
    return sorted(ids)


def truncate_at_eos(response_ids: torch.Tensor, eos_ids: list[int], pad_id: int):
    """Cut each row after its first EOS.

    Args:
        response_ids: ``(B, R)`` raw generated tokens (whatever follows an EOS is junk/padding).
    Returns:
        ``(ids, mask, ended)``: ``ids (B, R)`` with everything after the first EOS set to ``pad_id``,
        ``mask (B, R)`` long, 1 up to and including the first EOS, ``ended (B,)`` bool.

    Naive loop: for each row, ``k = first index with ids[k] in eos_ids``; mask[:k+1] = 1 (or all if none).
    """
    is_eos = torch.isin(response_ids, torch.tensor(eos_ids, device=response_ids.device))
    # number of EOS tokens strictly before each position: 0 means "still inside the response"
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    mask = (eos_before == 0).long()
    ids = torch.where(mask.bool(), response_ids, torch.full_like(response_ids, pad_id))
    return ids, mask, is_eos.any(dim=1)


@torch.no_grad()
def generate(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, sampling: SamplingConfig,
             *, eos_ids: list[int], pad_id: int, tokenizer=None) -> Generation:
    """Sample one completion per (left-padded) prompt row; see `Generation` for the shapes."""
    from transformers import GenerationConfig

    gen_config = GenerationConfig(
        max_new_tokens=sampling.max_new_tokens,
        do_sample=not sampling.greedy,
        temperature=None if sampling.greedy else sampling.temperature,
        top_p=None if sampling.greedy else sampling.top_p,  # 1.0 = off, explicitly
        top_k=None if sampling.greedy else sampling.top_k,  # 0 = off; None would mean transformers default 50
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        stop_strings=sampling.stop or None,
        use_cache=True,
    )
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            generation_config=gen_config,
            tokenizer=tokenizer if sampling.stop else None,
        )
    finally:
        model.train(was_training)
    raw = out[:, prompt_ids.shape[1]:]
    ids, mask, ended = truncate_at_eos(raw, eos_ids, pad_id)
    if sampling.stop and tokenizer is not None:
        # HF stops a row as soon as its text contains a stop string; that row is "ended" too.
        texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
        ended = ended | torch.tensor([any(s in t for s in sampling.stop) for t in texts])
    width = int(mask.sum(1).max().item()) if mask.numel() else 0
    return Generation(prompt_ids, prompt_mask, ids[:, :max(width, 1)], mask[:, :max(width, 1)], ended)


def cut_at_stop(text: str, stop: list[str]) -> str:
    """Text before the first stop string (the stop string itself is dropped)."""
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]
