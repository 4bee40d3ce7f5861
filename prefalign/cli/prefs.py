"""``prefalign prefs``: sample K completions per prompt, score them with a judge, write preference pairs.

Examples::

    prefalign prefs --prompts ../shared/data/rt-polarity/rt-polarity.neg --no-chat --judge vader \\
        --num-samples 4 --max-new-tokens 24 --output runs/prefs-vader
    prefalign prefs --model runs/sft/final --prompts prompts.jsonl --judge runs/rm/final --pair-rule all \\
        --min-gap 0.5 --output runs/prefs-rm
    prefalign dpo --data runs/prefs-vader/pairs.jsonl --output runs/dpo-vader   # train on them
"""

from __future__ import annotations

from pathlib import Path

from prefalign.eval.prefs import PrefsConfig


def main(argv: list[str] | None = None) -> int:
    from prefalign.cli._args import parse
    from prefalign.eval.prefs import make_preferences
    from prefalign.runio import claimed_output_dir

    cfg = parse(PrefsConfig, argv, prog="prefalign prefs", description=__doc__)
    with claimed_output_dir(cfg.output, overwrite=cfg.overwrite):  # one writer, from before the models load
        m = make_preferences(cfg)
    skipped = m["prompts_skipped_tied"] + m["prompts_skipped_small_gap"] + m["prompts_skipped_no_distinct_text"]
    print(
        f"{m['prompts']} prompts, {m['completions']} completions -> {m['pairs']} pairs; {skipped} prompts "
        f"skipped (tied {m['prompts_skipped_tied']}, gap <= {cfg.min_gap} {m['prompts_skipped_small_gap']}, "
        f"no distinct text {m['prompts_skipped_no_distinct_text']})"
    )
    print(f"wrote {Path(cfg.output) / 'pairs.jsonl'}")
    return 0
