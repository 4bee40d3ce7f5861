"""What-if for the rollout target (BENCHMARKS.md, "The decode path"): how fast can sampling from the default model
(or ``--model DIR``) get on this CPU or a GPU (``--device cuda``), and with which lever? Not part of ``make bench``;
run with the project venv (on a GPU machine, with its python: `bench/gpu.sh` runs it after each shape's stages):

    .venv/bin/python -m bench.rollout_levers --batch 8 --calls 4
    .venv/bin/python -m bench.rollout_levers --variants prefalign-generate-fp32,prefalign-loop-fp32 --rounds 3
    .venv/bin/python -m bench.rollout_levers --gemms        # 8-row GEMMs: F.linear against oneDNN-packed weights
    .venv/bin/python -m bench.rollout_levers --profile prefalign-loop-bf16   # torch.profiler over one call
    .venv/bin/python -m bench.rollout_levers --variants prefalign-loopnopack-fp32,prefalign-loopunkeyed-fp32 --rounds 3
    python3 -m bench.rollout_levers --device cuda --model .bench/data-random-1b/model --batch 16 \
        --variants hf-bf16-weights,prefalign-loop-bf16,prefalign-loopunkeyed-bf16 --rounds 3   # on a GPU machine

Every variant samples the same prompt batches (movie-review train prefixes, 40 new tokens, temperature 0.7, top-k
off, stop at EOS) and reports real response tokens per second over the calls after the first (warm-up: the first
call of a compiled variant compiles; its seconds are reported apart). With ``--rounds N`` the variants run in
turn N times (A B C, A B C, ...) and each reports its best round, so drift of the shared machine lands on all.
Variants:

- ``hf-fp32``: plain ``model.generate``, fp32 weights (the baseline of the rollout rows of ``make bench``);
- ``hf-bf16-autocast``: the same under ``torch.autocast(bfloat16)``: every weight re-cast at every decode step;
- ``hf-bf16-weights``: ``generate`` on a bf16 *copy* of the model (cast once);
- ``prefalign-generate-{fp32,bf16}``: ``prefalign.rollout.generate`` with ``--decoder generate`` (keyed sampling
  over ``model.generate``), on the fp32 model / its bf16 sampling copy;
- ``prefalign-loop-{fp32,bf16}``: the same with ``--decoder loop`` (prefalign's decode loop; for a Llama the fused
  step of `prefalign.rollout.fused_llama`, q/k/v and gate/up each one oneDNN-prepacked GEMM; packed per call as a
  trainer does);
- ``prefalign-loopunfused-{fp32,bf16}``: the loop through the model's own forward, each linear on its own oneDNN
  pack (the loop before the fused step);
- ``prefalign-loopnopack-{fp32,bf16}``: the loop on the model's own (unpacked) linears;
- ``prefalign-loopunkeyed-{fp32,bf16}``: that loop drawing the batch's tokens with one ``torch.multinomial`` (what
  ``model.generate`` does) instead of keyed sampling's one generator and one ``(V,)`` noise row per row per token:
  against ``loopnopack``, the cost of keyed sampling (not a variant prefalign offers: its completions would depend
  on the batch);
- ``compiled-static-bf16``: a one-token step over a pre-allocated ``StaticCache`` (128 positions) compiled with
  ``torch.compile(fullgraph=True)``, greedy, on the bf16 copy (the path issue 13 proposed; measured slower here).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import time

import torch

VARIANTS = (
    "hf-fp32,hf-bf16-autocast,hf-bf16-weights,prefalign-generate-fp32,prefalign-loop-fp32,"
    "prefalign-generate-bf16,prefalign-loop-bf16,compiled-static-bf16"
)
NEW_TOKENS = 40
DEVICE = "cpu"
STATIC_LEN = 128  # prompt (<= 60 tokens here) + 40 new tokens fit; one length, so one compilation


def hf_generate(model, enc, eos: list[int], pad: int):
    return model.generate(
        **enc,
        do_sample=True,
        temperature=0.7,
        top_k=0,
        top_p=1.0,
        max_new_tokens=NEW_TOKENS,
        eos_token_id=eos,
        pad_token_id=pad,
    )[:, enc["input_ids"].shape[1] :]


def prefalign_generate(model, enc, eos: list[int], pad: int, decoder: str, call: int):
    from prefalign.rollout import SamplingConfig, generate
    from prefalign.rollout.generate import KeyedSampler, key_seed

    keys = [key_seed(call, r) for r in range(enc["input_ids"].shape[0])]
    if decoder in ("loopnopack", "loopunkeyed"):  # the loop on the model's own linears (as generate's runs)
        from prefalign.rollout.decode import decode

        sampler = KeyedSampler(0, keys, enc["input_ids"].shape[1], temperature=0.7)
        choose = sampler.choose if decoder == "loopnopack" else unkeyed
        return decode(model, enc["input_ids"], enc["attention_mask"], NEW_TOKENS, choose, eos_ids=eos, pad_id=pad)
    packed = None
    if decoder == "loopunfused":  # one oneDNN pack per linear, the model's own forward (before the fused step)
        from prefalign.rollout.decode import PackedLinears

        decoder, packed = "loop", PackedLinears(model, batch_hint=enc["input_ids"].shape[0], fuse=False)
    sampling = SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=0.7, decoder=decoder)
    gen = generate(
        model, enc["input_ids"], enc["attention_mask"], sampling, eos_ids=eos, pad_id=pad, row_keys=keys, packed=packed
    )
    return gen.response_ids


def unkeyed(scores: torch.Tensor, position: int) -> torch.Tensor:
    """``(B,)`` tokens drawn for the whole batch by one ``torch.multinomial`` at temperature 0.7."""
    return torch.multinomial((scores.float() / 0.7).softmax(dim=-1), 1)[:, 0]


def synced_clock() -> float:
    """``time.perf_counter()`` after the GPU's queued work (a CUDA call returns before its kernels end)."""
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


class CompiledStatic:
    """Greedy decoding with a compiled one-token step over a static cache (compiled on the first call)."""

    def __init__(self, model):
        self.model = model
        self.step = torch.compile(self._step, dynamic=False, fullgraph=True)

    def _step(self, token, cache, position, cache_position):
        return self.model(
            input_ids=token, position_ids=position, cache=cache, cache_position=cache_position, use_cache=True
        ).logits[:, -1]

    @torch.no_grad()
    def __call__(self, enc, eos: list[int], pad: int):
        from transformers import StaticCache

        ids, mask = enc["input_ids"], enc["attention_mask"]
        b, p = ids.shape
        cache = StaticCache(config=self.model.config, max_cache_len=STATIC_LEN)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            cache=cache,
            cache_position=torch.arange(p, device=ids.device),
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        dev = ids.device
        done, tokens, eos_t = torch.zeros(b, dtype=torch.bool, device=dev), [], torch.tensor(eos, device=dev)
        for t in range(NEW_TOKENS):
            token = torch.where(done, pad, logits.argmax(-1))
            tokens.append(token)
            done |= torch.isin(token, eos_t)
            if bool(done.all()) or t == NEW_TOKENS - 1:
                break
            # the pads of a left-padded prompt are attended here (no mask: one graph); greedy speed only
            logits = self.step(token[:, None], cache, pos[:, -1:] + 1 + t, torch.tensor([p + t], device=dev))
        return torch.stack(tokens, 1)


def _products(kind: str, x: torch.Tensor, weights: list[torch.Tensor]) -> list[torch.Tensor]:
    if kind == "linear":
        return [torch.nn.functional.linear(x, w) for w in weights]
    return [torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "") for w in weights]


def gemms(batch: int) -> None:
    """GB/s of weight read by ``batch``-row products against the default model's linear shapes: ``F.linear`` and
    oneDNN-prepacked weights (30 distinct weights per shape, as the 30 layers are, so none stays in cache)."""
    for dtype in (torch.float32, torch.bfloat16):
        for out_f, in_f in ((1536, 576), (576, 1536), (576, 576), (49152, 576)):
            n = 30 if out_f < 10000 else 1
            weights = [torch.randn(out_f, in_f, dtype=dtype) for _ in range(n)]
            packed = [torch.ops.mkldnn._reorder_linear_weight(w, batch) for w in weights]
            x = torch.randn(batch, in_f, dtype=dtype)
            row = {}
            for name in ("linear", "packed"):
                fn = functools.partial(_products, name, x, weights if name == "linear" else packed)
                fn()
                t = time.perf_counter()
                for _ in range(20):
                    fn()
                us = (time.perf_counter() - t) / 20 / n * 1e6
                row[name] = f"{us:.0f} us, {out_f * in_f * x.element_size() / us / 1e3:.1f} GB/s"
            print(f"{dtype!s:15s} {out_f}x{in_f}: " + "; ".join(f"{k} {v}" for k, v in row.items()), flush=True)


def main(argv=None) -> None:
    global NEW_TOKENS, DEVICE
    from prefalign.models import load_causal_lm, load_tokenizer
    from prefalign.resources import movie_prefixes
    from prefalign.rollout import eos_token_ids, sampling_copy

    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--calls", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default=VARIANTS)
    ap.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    ap.add_argument("--gemms", action="store_true", help="only the GEMM table")
    ap.add_argument("--profile", default=None, help="one variant: torch.profiler's top ops over its second call")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the models and batches live")
    ap.add_argument("--model", default=None, help="a model directory (default: the embedded default)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.rollout_levers --device cuda: this torch sees no CUDA device")
    if args.device == "cuda" and args.gemms:
        raise SystemExit("bench.rollout_levers --gemms times oneDNN's packed CPU GEMMs: run it without --device cuda")
    torch.set_num_threads(args.threads)
    NEW_TOKENS, DEVICE = args.new_tokens, args.device
    if args.gemms:
        return gemms(args.batch)
    if args.profile:
        args.variants, args.calls, args.rounds = args.profile, 2, 1
    tok = load_tokenizer(args.model)
    tok.padding_side = "left"
    fp32 = load_causal_lm(args.model).eval().to(args.device)
    bf16 = sampling_copy(fp32, torch.bfloat16)
    eos, pad = eos_token_ids(fp32, tok), tok.pad_token_id
    prompts = movie_prefixes("train")
    encs = [
        tok(
            prompts[c * args.batch : (c + 1) * args.batch], add_special_tokens=False, padding=True, return_tensors="pt"
        ).to(args.device)
        for c in range(args.calls)
    ]
    compiled = CompiledStatic(bf16) if "compiled-static-bf16" in args.variants else None
    rates: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name in args.variants.split(","):
            secs, toks = [], []
            for call, enc in enumerate(encs):
                torch.manual_seed(call)
                prof = torch.profiler.profile() if args.profile and call == 1 else contextlib.nullcontext()
                t = synced_clock()
                with torch.no_grad(), prof:
                    if name == "hf-fp32":
                        resp = hf_generate(fp32, enc, eos, pad)
                    elif name == "hf-bf16-autocast":
                        with torch.autocast(args.device, dtype=torch.bfloat16):
                            resp = hf_generate(fp32, enc, eos, pad)
                    elif name == "hf-bf16-weights":
                        resp = hf_generate(bf16, enc, eos, pad)
                    elif name.startswith("prefalign-"):
                        _, decoder, dtype = name.split("-")
                        resp = prefalign_generate(fp32 if dtype == "fp32" else bf16, enc, eos, pad, decoder, call)
                    elif name == "compiled-static-bf16" and compiled is not None:
                        resp = compiled(enc, eos, pad)
                    else:
                        raise SystemExit(f"unknown variant {name}")
                secs.append(synced_clock() - t)
                if isinstance(prof, torch.profiler.profile):  # profile() records CUDA kernels too where there are
                    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
                resp = resp.cpu()
                is_eos = torch.isin(resp, torch.tensor(eos))
                toks.append(int(((torch.cumsum(is_eos.long(), 1) - is_eos.long()) == 0).sum()))
            rate = sum(toks[1:]) / sum(secs[1:])
            rates.setdefault(name, []).append(rate)
            row = {"tokens_per_s": round(rate, 1), "first_call_s": round(secs[0], 2), "tokens": toks}
            print(json.dumps({name: row}), flush=True)
    base = max(rates.get("hf-fp32", [0.0]))
    for name, rs in rates.items():
        ratio = f"x{max(rs) / base:.2f} hf-fp32" if base else ""
        print(f"{name:24s} {max(rs):8.1f} tokens/s (best of {len(rs)})  {ratio}")


if __name__ == "__main__":
    main()
