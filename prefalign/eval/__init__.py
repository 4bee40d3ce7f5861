"""Evaluation: on-policy preference pairs (``prefs``) and policy comparison against a reference (``eval``).

Typical use::

    metrics = make_preferences(PrefsConfig(model="runs/sft/final", prompts=["prompts.txt"], judge="vader"))
    result = evaluate(EvalConfig(policies=["dpo=runs/dpo/final"], prompts=["prompts.txt"], judge="vader"))
"""

from prefalign.eval.evaluate import REFERENCE, EvalConfig, evaluate, markdown_table, win_rate
from prefalign.eval.prefs import PAIR_RULES, PrefsConfig, make_pairs, make_preferences, skip_reason
from prefalign.eval.sampling import Sample, sample_completions, sequence_logps

__all__ = [
    "PAIR_RULES",
    "REFERENCE",
    "EvalConfig",
    "PrefsConfig",
    "Sample",
    "evaluate",
    "make_pairs",
    "make_preferences",
    "markdown_table",
    "sample_completions",
    "sequence_logps",
    "skip_reason",
    "win_rate",
]
