"""``prefalign eval``: gold (and proxy) score, KL to the reference and win rate of each policy.

Examples::

    prefalign eval --policies ppo=runs/ppo/final dpo=runs/dpo/final --reference smollm2-135m \\
        --prompts ../shared/data/rt-polarity/rt-polarity.neg --no-chat --judge vader --max-new-tokens 24 \\
        --num-samples 2 --output runs/eval
    prefalign eval --policies ppo=runs/ppo/final --prompts prompts.txt --judge vader --proxy runs/rm/final
"""

from __future__ import annotations

from pathlib import Path

from prefalign.eval.evaluate import EvalConfig


def main(argv: list[str] | None = None) -> int:
    from prefalign.cli._args import parse
    from prefalign.eval.evaluate import evaluate, markdown_table
    from prefalign.runio import claimed_output_dir

    cfg = parse(EvalConfig, argv, prog="prefalign eval", description=__doc__)
    with claimed_output_dir(cfg.output, overwrite=cfg.overwrite):  # one writer, from before the models load
        result = evaluate(cfg)
    print(markdown_table(result["policies"]), end="")
    print(f"wrote {Path(cfg.output) / 'eval.json'}, eval.md, completions.jsonl")
    return 0
