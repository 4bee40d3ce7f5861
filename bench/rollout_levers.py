"""What-if for the rollout target (BENCHMARKS.md): how fast can sampling from the default model get on this
CPU, and with which lever? Not part of ``make bench``; run with the project venv:

    .venv/bin/python -m bench.rollout_levers --batch 8 --calls 3

Every variant samples the same prompt batches (movie-review prefixes, 40 new tokens, temperature 0.7,
top-k off, stop at EOS) and reports real response tokens per second over the calls after the first
(warm-up). Variants:

- ``hf fp32``: plain ``model.generate``, fp32 weights, dynamic KV cache (what prefalign does now);
- ``hf bf16-autocast``: the same under ``torch.autocast(bfloat16)`` (prefalign's bf16 PPO rollouts):
  every weight is cast fp32 -> bf16 again at every decode step;
- ``hf bf16-weights``: ``generate`` on a bf16 *copy* of the model (cast once; a PPO trainer would refresh
  the copy after each update, ~0.1 s for 135M parameters);
- ``loop bf16-weights``: a minimal decode loop (one prefill, then one-token steps on the KV cache, sampling
  with ``torch.multinomial``), no ``generate`` machinery: the per-step Python overhead of ``generate``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.common import load_prefixes, model_path, real_response_tokens

DATA = Path(__file__).resolve().parent.parent / ".bench" / "data"


def batches(tok, prompts: list[str], batch: int, calls: int):
    for b in range(calls):
        yield tok(prompts[b * batch : (b + 1) * batch], add_special_tokens=False, padding=True, return_tensors="pt")


def hf_generate(model, enc, new_tokens: int, eos: list[int], pad: int):
    return model.generate(
        **enc,
        do_sample=True,
        temperature=0.7,
        top_k=0,
        top_p=1.0,
        max_new_tokens=new_tokens,
        eos_token_id=eos,
        pad_token_id=pad,
    )[:, enc["input_ids"].shape[1] :]


@torch.no_grad()
def loop_generate(model, enc, new_tokens: int, eos: list[int], pad: int):
    """Prefill, then one token per step on the KV cache; stops early when every row has ended."""
    from transformers import DynamicCache

    ids, mask = enc["input_ids"], enc["attention_mask"]
    b, p = ids.shape
    cache = DynamicCache()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    full_mask = torch.cat([mask, torch.ones(b, new_tokens, dtype=mask.dtype)], dim=1)
    out = model(
        input_ids=ids,
        attention_mask=full_mask[:, :p],
        position_ids=pos,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
        cache_position=torch.arange(p),
    )
    logits = out.logits[:, -1].float()
    done = torch.zeros(b, dtype=torch.bool)
    eos_t = torch.tensor(eos)
    tokens = []
    next_pos = pos[:, -1:] + 1
    for t in range(new_tokens):
        nxt = torch.multinomial(torch.softmax(logits / 0.7, -1), 1)  # (b, 1)
        nxt = torch.where(done[:, None], torch.full_like(nxt, pad), nxt)
        tokens.append(nxt)
        done |= torch.isin(nxt[:, 0], eos_t)
        if bool(done.all()) or t == new_tokens - 1:
            break
        out = model(
            input_ids=nxt,
            attention_mask=full_mask[:, : p + t + 1],
            position_ids=next_pos,
            past_key_values=cache,
            use_cache=True,
            cache_position=torch.tensor([p + t]),
        )
        logits = out.logits[:, -1].float()
        next_pos = next_pos + 1
    return torch.cat(tokens, dim=1)


def main(argv=None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default="hf-fp32,hf-bf16-autocast,hf-bf16-weights,loop-bf16")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = model_path(str(DATA))
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    fp32 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    bf16 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    prompts, eos, pad = load_prefixes(str(DATA)), [tok.eos_token_id], tok.pad_token_id
    results = {}
    for name in args.variants.split(","):
        secs, toks = [], []
        for i, enc in enumerate(batches(tok, prompts, args.batch, args.calls)):
            torch.manual_seed(i)
            t = time.perf_counter()
            with torch.no_grad():
                if name == "hf-fp32":
                    resp = hf_generate(fp32, enc, 40, eos, pad)
                elif name == "hf-bf16-autocast":
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        resp = hf_generate(fp32, enc, 40, eos, pad)
                elif name == "hf-bf16-weights":
                    resp = hf_generate(bf16, enc, 40, eos, pad)
                elif name == "loop-bf16":
                    resp = loop_generate(bf16, enc, 40, eos, pad)
                else:
                    raise SystemExit(f"unknown variant {name}")
            secs.append(time.perf_counter() - t)
            toks.append(real_response_tokens(resp, eos))
        rate = sum(toks[1:]) / sum(secs[1:])
        results[name] = {"tokens_per_s": round(rate, 1), "seconds": [round(s, 2) for s in secs], "tokens": toks}
        print(json.dumps({name: results[name]}), flush=True)
    base = results.get("hf-fp32", {}).get("tokens_per_s")
    if base:
        for name, r in results.items():
            print(f"{name:22s} {r['tokens_per_s']:8.1f} tokens/s  x{r['tokens_per_s'] / base:.2f}")


if __name__ == "__main__":
    main()
