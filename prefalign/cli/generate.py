"""``prefalign generate``: sample completions from a model, batched, JSONL out.

Sampling goes through `prefalign.eval.sampling.sample_completions`, as in ``prefs`` and ``eval``: completion
``k`` of prompt ``i`` depends on (--seed, i, k), the prompt and the model, never on --batch-size.

Examples::

    prefalign generate                                   # embedded default, built-in prompts, chat mode
    prefalign generate --prompts "The movie was" --no-chat --num-samples 4
    prefalign generate --model path/to/model --prompts prompts.txt --output runs/gen --max-new-tokens 64
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from prefalign.rollout.generate import SamplingRunConfig
from prefalign.validation import require_at_least_one

BUILTIN_PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for staying focused while studying.",
    "Explain in one sentence what a reward model is.",
    "Write a haiku about the sea.",
]


@dataclass
class GenerateConfig(SamplingRunConfig):
    """Sample completions from a causal LM and write them as JSONL."""

    model: str = "smollm2-135m"
    """Hugging Face hub id, local model directory, a LoRA run's final/ adapter directory, or an embedded name
    (smollm2-135m)."""
    prompts: list[str] = field(default_factory=list)
    """Prompt files (.txt one per line, .jsonl/.json/.csv/.parquet with a `prompt` column) or literal prompt
    texts; a value that is not an existing path is a prompt, unless it is one word naming a missing file (a data
    suffix, or a path in an existing directory): that is an error. Empty: a few built-in prompts."""
    num_samples: int = 1
    """Completions per prompt."""
    output: str = "runs/generate"
    """Output directory: generations.jsonl, config.yaml, metrics.json."""

    def validate(self):
        super().validate()
        require_at_least_one(self, "num_samples")


def run(cfg: GenerateConfig) -> list[dict]:
    """Sample; write ``generations.jsonl`` (one row per completion, in (prompt, sample) order), ``config.yaml``
    and ``metrics.json``; return the rows."""
    import torch

    from prefalign.data import read_prompts, tokenize_prompts
    from prefalign.eval.sampling import device, sample_completions
    from prefalign.models import load_policy, load_tokenizer, policy_base
    from prefalign.runio import prepare_output_dir, write_config, write_json, write_jsonl

    # Everything that can fail on bad input loads before the output directory is made.
    tokenizer = load_tokenizer(policy_base(cfg.model)[0])
    prompts = read_prompts(cfg.prompts or BUILTIN_PROMPTS, tokenizer, cfg.chat)
    prompt_ids = tokenize_prompts(prompts, tokenizer, cfg.max_prompt_length)
    model = load_policy(cfg.model, dtype=getattr(torch, cfg.dtype)).to(device())
    out_dir = prepare_output_dir(cfg.output, overwrite=cfg.overwrite)

    start = time.perf_counter()
    samples = sample_completions(
        model, tokenizer, prompt_ids, cfg, cfg.num_samples, cfg.batch_size, cfg.seed, desc="generate"
    )
    seconds = time.perf_counter() - start
    rows = [
        {
            "prompt": prompts[s.prompt],
            "sample": s.sample,
            "completion": s.text,
            "num_tokens": len(s.response_ids),
            "ended": s.ended,
        }
        for s in samples
    ]
    new_tokens = sum(len(s.response_ids) for s in samples)
    # the config with the outputs: a run stopped or refused before them leaves an --overwrite'd directory as it was
    write_config(out_dir, cfg)
    write_jsonl(out_dir / "generations.jsonl", rows)
    write_json(
        out_dir / "metrics.json",
        {
            "completions": len(rows),
            "new_tokens": new_tokens,
            "seconds": round(seconds, 3),
            "tokens_per_second": round(new_tokens / max(seconds, 1e-9), 2),
            "eos_rate": sum(s.ended for s in samples) / max(len(rows), 1),
        },
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    from prefalign.cli._args import parse
    from prefalign.runio import claimed_output_dir

    cfg = parse(GenerateConfig, argv, prog="prefalign generate", description=__doc__)
    with claimed_output_dir(cfg.output, overwrite=cfg.overwrite):  # one writer, from before the model loads
        rows = run(cfg)
    for r in rows:
        print(f"\n### {r['prompt'].strip()[-200:]}\n{r['completion'].strip()}")
    print(f"\nwrote {len(rows)} completions to {Path(cfg.output) / 'generations.jsonl'}")
    return 0
