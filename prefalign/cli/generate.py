"""``prefalign generate``: sample completions from a model, batched, JSONL out.

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
    """Hugging Face hub id, local model directory, or an embedded name (smollm2-135m)."""
    prompts: list[str] = field(default_factory=list)
    """Prompt files (.txt one per line, .jsonl/.json/.csv/.parquet with a `prompt` column) or literal prompt
    texts; a value that is not an existing path is a prompt. Empty: a few built-in prompts."""
    num_samples: int = 1
    """Completions per prompt."""
    output: str = "runs/generate"
    """Output directory: generations.jsonl, config.yaml, metrics.json."""

    def validate(self):
        super().validate()
        if self.num_samples < 1:
            raise ValueError(f"--num-samples must be >= 1, got {self.num_samples}")


def read_prompts(sources: list[str], tokenizer, chat: bool) -> list[str]:
    """Prompt texts from files and literal strings; with ``chat``, plain strings become a user turn."""
    from prefalign.data import load_prompts

    texts: list[str] = []
    for src in sources or BUILTIN_PROMPTS:
        if Path(src).exists():
            texts += load_prompts(src, tokenizer, chat=chat)
        else:
            texts += load_prompts([src], tokenizer, chat=chat)
    return texts


def run(cfg: GenerateConfig) -> list[dict]:
    import torch
    from tqdm.auto import tqdm

    from prefalign.data import PromptCollator, tokenize_prompts
    from prefalign.models import load_causal_lm, load_tokenizer
    from prefalign.rollout import cut_at_stop, eos_token_ids, generate
    from prefalign.runio import prepare_output_dir, write_config, write_json, write_jsonl

    out_dir = prepare_output_dir(cfg.output, overwrite=cfg.overwrite)
    write_config(out_dir, cfg)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    model = load_causal_lm(cfg.model, dtype=getattr(torch, cfg.dtype))
    prompts = read_prompts(cfg.prompts, tokenizer, cfg.chat)
    prompt_ids = tokenize_prompts(prompts, tokenizer, cfg.max_prompt_length)
    collate = PromptCollator(tokenizer.pad_token_id)
    eos = eos_token_ids(model, tokenizer)

    jobs = [(i, k) for i in range(len(prompts)) for k in range(cfg.num_samples)]
    rows: list[dict] = []
    new_tokens = 0
    start = time.perf_counter()
    with tqdm(total=len(jobs), desc="generate", unit="completion") as bar:
        for lo in range(0, len(jobs), cfg.batch_size):
            chunk = jobs[lo : lo + cfg.batch_size]
            batch = collate([prompt_ids[i] for i, _ in chunk])
            gen = generate(model, batch["input_ids"], batch["attention_mask"], cfg, eos_ids=eos,
                           pad_id=tokenizer.pad_token_id, tokenizer=tokenizer)
            lengths = gen.response_mask.sum(1).tolist()
            texts = tokenizer.batch_decode(gen.response_ids, skip_special_tokens=True)
            for (i, k), text, n, ended in zip(chunk, texts, lengths, gen.ended.tolist()):
                rows.append({"prompt": prompts[i], "sample": k, "completion": cut_at_stop(text, cfg.stop),
                             "num_tokens": int(n), "ended": bool(ended)})
            new_tokens += sum(lengths)
            bar.update(len(chunk))
    seconds = time.perf_counter() - start
    write_jsonl(out_dir / "generations.jsonl", rows)
    write_json(out_dir / "metrics.json", {
        "completions": len(rows), "new_tokens": new_tokens, "seconds": round(seconds, 3),
        "tokens_per_second": round(new_tokens / max(seconds, 1e-9), 2),
        "eos_rate": sum(r["ended"] for r in rows) / max(len(rows), 1),
    })
    return rows


def main(argv: list[str] | None = None) -> int:
    from prefalign.cli._args import parse

    cfg = parse(GenerateConfig, argv, prog="prefalign generate", description=__doc__)
    rows = run(cfg)
    for r in rows:
        print(f"\n### {r['prompt'].strip()[-200:]}\n{r['completion'].strip()}")
    print(f"\nwrote {len(rows)} completions to {Path(cfg.output) / 'generations.jsonl'}")
    return 0
