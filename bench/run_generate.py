"""The rollout baseline: plain ``model.generate`` from transformers (run with the project venv, so it is the
same transformers build prefalign calls).

Same model, same left-padded prompt batches (movie-review prefixes in file order), same sampling
(temperature 0.7, 40 new tokens, stop at EOS) and the same seed per batch as
``run_prefalign.py --workload rolloutN``. Tokens counted = real response tokens (up to and including
the first EOS), the same count prefalign's ``response_mask`` gives.
"""

from __future__ import annotations

import sys
from pathlib import Path

# the repo root replaces this script's own folder on the path: bench/*.py must not shadow stdlib modules
sys.path[0] = str(Path(__file__).resolve().parent.parent)
from bench.common import (  # noqa: E402
    HPARAMS,
    emit,
    load_prefixes,
    model_path,
    now,
    parse_args,
    quiet,
    real_response_tokens,
    setup_process,
)


def main(argv=None) -> None:
    quiet()
    args = parse_args(argv)
    setup_process(args.threads, args.device)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    batch = int(args.workload.removeprefix("rollout"))
    path = model_path(args.data)
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(args.device).eval()
    prefixes = load_prefixes(args.data)
    # the stop set prefalign uses (`eos_token_ids`): the tokenizer's EOS and the generation config's
    gen_eos = model.generation_config.eos_token_id
    eos = sorted({tok.eos_token_id, *([gen_eos] if isinstance(gen_eos, int) else gen_eos or [])})
    secs, toks = [], []
    for b in range(args.steps):
        enc = tok(prefixes[b * batch : (b + 1) * batch], add_special_tokens=False, padding=True, return_tensors="pt")
        enc = enc.to(args.device)
        torch.manual_seed(HPARAMS["seed"] + b)
        t = now(args.device)
        with torch.no_grad(), torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            out = model.generate(
                **enc,
                do_sample=True,
                temperature=HPARAMS["temperature"],
                top_p=None,
                top_k=None,
                max_new_tokens=HPARAMS["max_new_tokens"],
                eos_token_id=eos,
                pad_token_id=tok.pad_token_id,
            )
        secs.append(now(args.device) - t)
        toks.append(real_response_tokens(out[:, enc["input_ids"].shape[1] :], eos))
    emit(
        {
            "side": "hf-generate",
            "workload": args.workload,
            "precision": args.precision,
            "step_seconds": secs,
            "items_per_step": batch,
            "tokens": toks,
            "extra": {},
        },
        args.device,
    )


if __name__ == "__main__":
    main()
