"""Batched sampling with truncation at the first EOS / stop string.

This is the one place that calls the generation backend, so a faster decoder can replace it without
touching trainers. The response tensors follow one convention everywhere in prefalign: right-padded,
cut after the first EOS (the EOS itself is kept and is the last real token), ``response_mask`` 1 on
real tokens.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from prefalign.errors import UserError
from prefalign.rollout.decode import LogprobRecorder, PackedLinears, decode, learned_position_limit, loop_fallback
from prefalign.validation import Validated, check_sampling, require_at_least_one


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
    decoder: str = "loop"
    """loop: prefalign's decode loop (KV cache, early exit, linear weights prepacked for oneDNN on CPU: 2.0-2.1x
    model.generate's tokens/s in float32 and 1.5-1.6x in bfloat16 on an AMD Zen 5, 1.2-1.6x in float32 on an Intel
    Xeon without avx512_bf16; BENCHMARKS.md); generate: transformers'
    model.generate. Both draw the same tokens up to float rounding; stop strings, and generation configs that switch
    on other processors or searches, use generate."""

    def validate(self):
        check_sampling(self)


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
    """Weights dtype for sampling: float32 or bfloat16 (faster decoding on a CPU with avx512_bf16 or a GPU;
    BENCHMARKS.md has the measurement). eval still scores log-probs (KL) with float32 weights."""
    seed: int = 0
    """Random seed."""
    output: str = "runs/sample"
    """Output directory."""
    overwrite: bool = False
    """Replace the files of a previous run in --output."""

    def validate(self):
        super().validate()
        require_at_least_one(self, "batch_size", "max_prompt_length")
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
        logps, entropy: ``(B, R)`` float32, recorded while decoding (``generate(record_logprobs=True)`` on the
            decode loop; else None; the entropy also None under ``record_entropy=False``): the log-prob of each
            response token and the entropy at its position under ``softmax(logits / temperature)`` of the model
            that sampled it, 0 past the response.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    ended: torch.Tensor
    logps: torch.Tensor | None = None
    entropy: torch.Tensor | None = None

    @property
    def recorded(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """``(logps, entropy)`` the decode loop recorded, None where it recorded nothing."""
        return None if self.logps is None else (self.logps, self.entropy)

    def sequences(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(query_response, attention_mask, completion_mask)``, each ``(B, P+R)``: prompt and response side by
        side, every response starting at column P; the completion mask is the response mask there, 0 on prompts."""
        query_response = torch.cat([self.prompt_ids, self.response_ids], dim=1)
        attention_mask = torch.cat([self.prompt_mask, self.response_mask], dim=1)
        completion_mask = torch.cat([torch.zeros_like(self.prompt_mask), self.response_mask], dim=1)
        return query_response, attention_mask, completion_mask


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


def key_seed(*parts: int) -> int:
    """A 63-bit seed from integers: the same parts give the same seed on every machine, process and run
    (Python's ``hash`` is salted per process for strings, and ``seed + key`` collides)."""
    data = b"".join(int(p).to_bytes(16, "little", signed=True) for p in parts)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


class KeyedSampler:
    """A logits processor that samples each row from its own random stream, keyed by the row, not the batch.

    Hugging Face sampling draws the whole batch from one generator, so a row's completion depends on which rows
    share its batch, in what order, and on how many processes split the batch. Here the token at response
    position ``t`` of the row with key ``k`` uses Gumbel noise from a generator seeded by
    ``key_seed(seed, k, t)``, so a completion is a pure function of (seed, key, prompt, model).

    Per row: logits / temperature, then top-k, then top-p (HF's order and meaning; 0 and 1.0 are off), then the
    Gumbel-max trick: ``argmax(z + G)`` with ``G = -log(-log U)`` i.i.d. is a draw from ``softmax(z)``. The
    returned scores are 0 at the drawn token and -inf elsewhere: run generation greedy (``do_sample=False``) and
    it takes exactly that token. transformers (5.x) runs user processors after its own non-sampling ones
    (repetition penalty, min length, ...: part of the model's distribution, as with HF sampling) and adds its
    sampling warpers only when ``do_sample``; what it may still append after ours (watermarking, logit
    renormalisation) adds to or shifts the scores, which cannot move an argmax away from the only finite one.

    Naive loop: for each row ``b`` with key ``k``, ``g = torch.Generator().manual_seed(key_seed(seed, k, t))``,
    ``token[b] = argmax(filtered_logits(scores)[b] - log(-log(rand(V, generator=g))))``.
    """

    def __init__(
        self,
        seed: int,
        row_keys: list[int],
        prompt_width: int,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
    ):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.seed, self.row_keys, self.prompt_width = seed, [int(k) for k in row_keys], prompt_width
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    def filtered_logits(self, scores: torch.Tensor) -> torch.Tensor:
        """``(B, V)`` scores -> tempered logits with the tokens outside top-k / top-p at -inf, float32."""
        z = scores.float() / self.temperature
        if self.top_k and self.top_k < z.shape[-1]:
            kth = z.topk(self.top_k, dim=-1).values[:, -1:]  # ties with the k-th are kept, as in HF
            z = z.masked_fill(z < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_z, order = z.sort(dim=-1, descending=True)
            probs = sorted_z.softmax(dim=-1)
            above = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens; the top one always stays
            drop = torch.zeros_like(above, dtype=torch.bool).scatter(1, order, above >= self.top_p)
            z = z.masked_fill(drop, float("-inf"))
        return z

    def gumbel(self, position: int, vocab: int, device) -> torch.Tensor:
        """``(B, V)`` Gumbel(0, 1) noise of every row at one response position, row ``b`` from a generator seeded
        by ``key_seed(seed, row_keys[b], position)``. The same on every process and batch layout of one device
        type; a CPU (MT19937) and a CUDA generator (Philox) draw different noise from one key, so a run on a GPU
        does not repeat a CPU run's completions."""
        u = torch.empty(len(self.row_keys), vocab, device=device)
        g = torch.Generator(device=device)  # reseeded per row: the stream a fresh generator with that seed draws
        for row, key in zip(u, self.row_keys):
            torch.rand(vocab, generator=g.manual_seed(key_seed(self.seed, key, position)), device=device, out=row)
        # -log(-log U) on the whole batch at once: the values row-by-row ops give, in one pass per op
        return u.clamp_(min=torch.finfo(torch.float32).tiny).log_().neg_().log_().neg_()

    def choose(self, scores: torch.Tensor, position: int) -> torch.Tensor:
        """``(B,)`` the tokens drawn from ``scores (B, V)`` at response position ``position``."""
        b, v = scores.shape
        if b != len(self.row_keys):
            raise ValueError(f"KeyedSampler has {len(self.row_keys)} row keys for a batch of {b} rows")
        # max's indices: argmax's (the first maximum), ~3x faster on a CPU for a (B, V) float32 batch
        return (self.filtered_logits(scores) + self.gumbel(position, v, scores.device)).max(dim=-1).indices

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        choice = self.choose(scores, input_ids.shape[1] - self.prompt_width)  # the response position being drawn
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, choice[:, None], 0.0)


@torch.no_grad()
def generate(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    sampling: SamplingConfig,
    *,
    eos_ids: list[int],
    pad_id: int,
    tokenizer=None,
    row_keys: list[int] | None = None,
    seed: int = 0,
    synced: bool = False,
    packed: PackedLinears | None = None,
    record_logprobs: bool = False,
    record_entropy: bool = True,
) -> Generation:
    """Sample one completion per (left-padded) prompt row; see `Generation` for the shapes.

    With ``row_keys`` (one int per row), sampling goes through `KeyedSampler`: row ``b``'s completion depends
    only on (``seed``, ``row_keys[b]``, its prompt, the model), not on the other rows, their order or the
    batch size. Without, Hugging Face samples from the global torch RNG. ``greedy`` ignores both. ``synced``
    (a collective: every process calls it): every process keeps decoding until all are done, as a sharded
    model (FSDP) needs every process in every forward.

    ``sampling.decoder`` "loop" decodes with `prefalign.rollout.decode.decode` (``model.generate`` where
    `loop_fallback` names a reason), on ``packed`` (a `PackedLinears` of ``model`` a caller keeps across calls
    while the weights do not change) or on packs made for this call and dropped after it. ``record_logprobs``:
    the decode loop also records each response token's log-prob and entropy at ``sampling.temperature``
    (`LogprobRecorder`; `Generation.logps` / ``entropy``), the entropy unless ``record_entropy`` is off (a softmax
    over the vocabulary per step saved where only the log-probs are read); ``model.generate`` records nothing (they
    stay None).
    """
    if row_keys is not None and len(row_keys) != prompt_ids.shape[0]:
        raise ValueError(f"{len(row_keys)} row keys for {prompt_ids.shape[0]} prompts")
    _check_positions(model, prompt_ids.shape[1], sampling.max_new_tokens)
    keyed = row_keys is not None and not sampling.greedy
    recorder: LogprobRecorder | None = None
    hf_samples = not (sampling.greedy or keyed)
    sampler = None
    if keyed and row_keys is not None:  # keyed implies row keys
        sampler = KeyedSampler(
            seed, row_keys, prompt_ids.shape[1], sampling.temperature, sampling.top_k, sampling.top_p
        )
    was_training = model.training
    stops: _StopSteps | None = None
    model.eval()
    try:
        if (
            sampling.decoder == "loop"
            and loop_fallback(model, stop=sampling.stop, sampled_by_hf=hf_samples, synced=synced) is None
        ):
            choose = sampler.choose if sampler is not None else _argmax
            if record_logprobs:
                choose = recorder = LogprobRecorder(choose, sampling.temperature, record_entropy)
            raw = _loop_decode(model, prompt_ids, prompt_mask, sampling, choose, eos_ids, pad_id, packed)
        else:
            if sampling.stop and tokenizer is None:
                raise ValueError("generate: stop strings need the tokenizer (pass tokenizer=)")
            stops = _StopSteps(tokenizer, sampling.stop, prompt_ids.shape) if sampling.stop else None
            raw = _hf_generate(
                model, prompt_ids, prompt_mask, sampling, sampler, hf_samples, eos_ids, pad_id, stops, synced
            )
    finally:
        model.train(was_training)
    ids, mask, ended = truncate_at_eos(raw, eos_ids, pad_id)
    if stops is not None:
        ids, mask, ended = stops.end_rows(raw, mask, ended, pad_id)
    width = max(int(mask.sum(1).max().item()) if mask.numel() else 0, 1)
    gen = Generation(prompt_ids, prompt_mask, ids[:, :width], mask[:, :width], ended)
    if recorder is not None:
        gen.logps, gen.entropy = recorder.stats(gen.response_mask)
    return gen


def _check_positions(model, width: int, max_new_tokens: int) -> None:
    """Refuse a batch whose longest prompt (``width`` tokens) and ``max_new_tokens`` run past the model's learned
    position table (`learned_position_limit`) before decoding up to the lookup that would fail there. The last token
    drawn is never fed: ``width + max_new_tokens - 1`` positions."""
    fed, limit = width + max_new_tokens - 1, learned_position_limit(model)
    if limit is not None and fed > limit:
        raise UserError(
            f"a prompt of {width} tokens and --max-new-tokens {max_new_tokens} feed {fed} positions; the model has "
            f"{limit} (a learned position table): lower --max-new-tokens or --max-prompt-length"
        )


def _loop_decode(model, prompt_ids, prompt_mask, sampling, choose, eos_ids, pad_id, packed):
    """`decode` on ``packed`` (or on packs made for this call): the fused Llama step where it has one."""
    if packed is not None and packed.model is not model:
        raise ValueError("generate: packed holds the packs of another model than the one sampled")
    with packed if packed is not None else PackedLinears(model, batch_hint=prompt_ids.shape[0]) as packs:
        new = sampling.max_new_tokens
        return decode(model, prompt_ids, prompt_mask, new, choose, eos_ids=eos_ids, pad_id=pad_id, fused=packs.fused)


def _argmax(logits: torch.Tensor, position: int) -> torch.Tensor:
    return logits.argmax(dim=-1)


def _hf_generate(model, prompt_ids, prompt_mask, sampling, sampler, hf_samples, eos_ids, pad_id, stops, synced):
    """Raw response tokens ``(B, R)`` from ``model.generate`` (``sampler``: greedy over `KeyedSampler`'s one finite
    score per row; None: greedy, or Hugging Face's own sampling where ``hf_samples``; ``stops``: the stop strings'
    criterion, which records where each row stopped)."""
    from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

    gen_config = GenerationConfig(
        max_new_tokens=sampling.max_new_tokens,
        do_sample=hf_samples,
        temperature=sampling.temperature if hf_samples else None,
        top_p=sampling.top_p if hf_samples else None,  # 1.0 = off, explicitly
        top_k=sampling.top_k if hf_samples else None,  # 0 = off; None would mean transformers default 50
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        use_cache=True,
    )
    out = model.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        generation_config=gen_config,
        logits_processor=LogitsProcessorList([sampler]) if sampler is not None else None,
        stopping_criteria=StoppingCriteriaList([stops]) if stops is not None else None,
        synced_gpus=synced,
    )
    return out[:, prompt_ids.shape[1] :]


class _StopSteps:
    """Hugging Face's stop-string criterion (``StopStringCriteria``), recording the response step at which each row
    first matched: `end_rows` ends the rows there.

    HF decides a stop on the token sequence, the prompt's end and special tokens' text included, so whether a row
    stopped is read from what HF did, not from the decoded response (a stop string begun in the prompt, or a
    special token such as ``<|im_start|>``, is not in that text). From the next step on, HF pads a stopped row;
    with pad == EOS, `truncate_at_eos` took the first pad for the row's EOS when the batch ran on (a
    layout-dependent length and ``ended``)."""

    def __init__(self, tokenizer, stop: list[str], prompt_shape: torch.Size):
        from transformers import StopStringCriteria

        self.criterion = StopStringCriteria(tokenizer, stop)
        self.prompt_width = prompt_shape[1]
        self.step = torch.full((prompt_shape[0],), -1, dtype=torch.long)  # -1: never matched

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        done = self.criterion(input_ids, scores, **kwargs)
        first = done.cpu() & (self.step < 0)
        self.step[first] = input_ids.shape[1] - self.prompt_width - 1  # the token just appended
        return done

    def end_rows(
        self, raw: torch.Tensor, mask: torch.Tensor, ended: torch.Tensor, pad_id: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ids, mask, ended)`` of `truncate_at_eos` with every row that stopped cut after its stopping token and
        ended (a row that met EOS first keeps its EOS)."""
        step = self.step.to(raw.device)
        stopped = step >= 0
        upto = torch.where(stopped, step, raw.shape[1])[:, None]
        mask = mask * (torch.arange(raw.shape[1], device=raw.device)[None, :] <= upto).to(mask.dtype)
        ids = torch.where(mask.bool(), raw, torch.full_like(raw, pad_id))
        return ids, mask, ended | stopped.to(ended.device)


def cut_at_stop(text: str, stop: list[str]) -> str:
    """Text before the earliest occurrence of any stop string (the stop string itself is dropped); ``text``
    unchanged when none occurs. Decoding stops *after* the token that completes a stop string, so the
    decoded text still holds it."""
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]
