"""On-policy preference pairs: sample K completions per prompt, score them with a judge, pair them.

The output ``pairs.jsonl`` is explicit-format preference data (``prompt``, ``chosen``, ``rejected``, plus
``score_chosen`` / ``score_rejected``), ready for ``prefalign dpo --data`` or ``prefalign reward --data``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from prefalign.rollout.generate import SamplingRunConfig

if TYPE_CHECKING:  # for the annotation only: make_preferences imports what it runs when it runs
    from prefalign.eval.sampling import Sample

PAIR_RULES = ("best_worst", "all")


@dataclass
class PrefsConfig(SamplingRunConfig):
    """Sample completions from a policy, score them with a judge and write preference pairs."""

    model: str = "smollm2-135m"
    """Policy: hub id, local model directory, a LoRA run's final/ adapter directory, or an embedded name."""
    prompts: list[str] = field(default_factory=list)
    """Prompt files (.txt one per line, .jsonl/.json/.csv/.parquet with a `prompt` column) or literal prompt
    texts; a value that is not an existing path is a prompt, unless it is one word naming a missing file (a data
    suffix, or a path in an existing directory): that is an error."""
    judge: str = ""
    """What scores a completion: a built-in judge (vader, arithmetic), module:function / file.py:function, or a
    reward model directory / hub id; it gets the prompt files' other columns (arithmetic: their answer column)."""
    num_samples: int = 4
    """Completions per prompt (K >= 2: a pair needs two)."""
    pair_rule: Literal["best_worst", "all"] = "best_worst"
    """best_worst: one pair per prompt, its highest- vs its lowest-scored completion; all: every pair of
    completions whose scores differ by more than --min-gap."""
    min_gap: float = 0.0
    """Pair two completions only if their scores differ by more than this."""
    output: str = "runs/prefs"
    """Output directory: pairs.jsonl, config.yaml, metrics.json."""

    def validate(self):
        super().validate()
        if self.num_samples < 2:
            raise ValueError(f"--num-samples must be >= 2 (a pair needs two completions), got {self.num_samples}")
        if self.pair_rule not in PAIR_RULES:
            raise ValueError(f"--pair-rule must be one of {', '.join(PAIR_RULES)}, got {self.pair_rule!r}")
        if not self.min_gap >= 0:  # also refuses NaN
            raise ValueError(f"--min-gap must be >= 0, got {self.min_gap}")
        if not self.judge:
            raise ValueError("--judge is required: vader, module:function, file.py:function or a reward model")
        if not self.prompts:
            raise ValueError("--prompts is required: prompt files or literal prompt texts")


def make_pairs(
    prompt: str, completions: list[str], scores: list[float], rule: str = "best_worst", min_gap: float = 0.0
) -> list[dict]:
    """Preference pairs from one prompt's scored completions.

    Only completions with visible text take part (a blank reply is dropped by `load_preferences`), and
    two identical texts are never paired. ``best_worst``: the first highest-scored completion against
    the first lowest-scored one, if their gap exceeds ``min_gap`` (at most one pair). ``all``: for every
    ``i < j`` with ``|s_i - s_j| > min_gap``, the higher-scored one is chosen (repeated completions give
    repeated pairs). Returns dicts with ``prompt``, ``chosen``, ``rejected``, ``score_chosen``,
    ``score_rejected``, in ``(i, j)`` order.
    """
    if len(completions) != len(scores):
        raise ValueError(f"{len(completions)} completions but {len(scores)} scores")
    if rule not in PAIR_RULES:
        raise ValueError(f"unknown pair rule {rule!r}; choose one of {', '.join(PAIR_RULES)}")
    usable = [i for i, c in enumerate(completions) if c.strip()]

    def pair(hi: int, lo: int) -> dict:
        return {
            "prompt": prompt,
            "chosen": completions[hi],
            "rejected": completions[lo],
            "score_chosen": float(scores[hi]),
            "score_rejected": float(scores[lo]),
        }

    if rule == "best_worst":
        if not usable:
            return []
        hi = max(usable, key=lambda i: scores[i])  # max/min return the first of equal keys
        lo = min(usable, key=lambda i: scores[i])
        if scores[hi] - scores[lo] <= min_gap or completions[hi] == completions[lo]:
            return []
        return [pair(hi, lo)]
    out = []
    for a, i in enumerate(usable):
        for j in usable[a + 1 :]:
            if abs(scores[i] - scores[j]) > min_gap and completions[i] != completions[j]:
                out.append(pair(i, j) if scores[i] > scores[j] else pair(j, i))
    return out


def skip_reason(completions: list[str], scores: list[float], min_gap: float) -> str:
    """Why a prompt gave no pair: ``tied`` (every usable completion scored the same), ``small_gap`` (no
    two scores differ by more than ``min_gap``) or ``no_distinct_text`` (fewer than two different
    non-blank completions, or only identical texts had a large enough gap)."""
    usable = [i for i, c in enumerate(completions) if c.strip()]
    if len({completions[i] for i in usable}) < 2:
        return "no_distinct_text"
    values = [scores[i] for i in usable]
    if max(values) == min(values):
        return "tied"
    if max(values) - min(values) <= min_gap:
        return "small_gap"
    return "no_distinct_text"


def make_preferences(cfg: PrefsConfig) -> dict:
    """Sample, score, pair; write ``pairs.jsonl``, ``config.yaml`` and ``metrics.json`` to ``cfg.output``.

    Returns the metrics (names in docs/metrics.md).
    """
    import logging
    import time

    import torch

    from prefalign.data import tokenize_prompts
    from prefalign.data.prompts import read_prompt_rows
    from prefalign.eval.sampling import device, sample_completions, score_samples
    from prefalign.models import load_policy, load_tokenizer, policy_base
    from prefalign.reward_mix import check_reward_columns
    from prefalign.rewards import load_reward_source
    from prefalign.runio import prepare_output_dir, write_config, write_json, write_jsonl

    log = logging.getLogger(__name__)
    torch_device = device()
    # Everything that can fail on bad input loads before the output directory is made and sampling starts.
    judge = load_reward_source(cfg.judge, batch_size=cfg.batch_size, device=torch_device)
    tokenizer = load_tokenizer(policy_base(cfg.model)[0])
    prompts, columns = read_prompt_rows(cfg.prompts, tokenizer, cfg.chat)
    check_reward_columns(judge, columns)
    prompt_ids = tokenize_prompts(prompts, tokenizer, cfg.max_prompt_length)
    out_dir = prepare_output_dir(cfg.output, overwrite=cfg.overwrite)
    model = load_policy(cfg.model, dtype=getattr(torch, cfg.dtype)).to(torch_device)

    start = time.perf_counter()
    samples = sample_completions(
        model, tokenizer, prompt_ids, cfg, cfg.num_samples, cfg.batch_size, cfg.seed, desc="prefs"
    )
    del model  # the judge may be a reward model: one model's weights at a time past this point
    scores = score_samples(judge, f"--judge {cfg.judge}", prompts, samples, columns).tolist()

    pairs, skipped = _pair_every_prompt(prompts, [sample.text for sample in samples], scores, cfg)
    seconds = time.perf_counter() - start

    metrics = _metrics(prompts, samples, scores, pairs, skipped, seconds)
    # the config with the outputs: a run stopped or refused before them leaves an --overwrite'd directory as it was
    write_config(out_dir, cfg)
    write_jsonl(out_dir / "pairs.jsonl", pairs)
    write_json(out_dir / "metrics.json", metrics)
    if not pairs:
        log.warning(
            "no pairs: every prompt's completions tied, or no two scores differ by more than --min-gap "
            "%s; raise --num-samples or --temperature, or lower --min-gap",
            cfg.min_gap,
        )
    return metrics


def _metrics(
    prompts: list[str],
    samples: list[Sample],
    scores: list[float],
    pairs: list[dict],
    skipped: dict[str, int],
    seconds: float,
) -> dict:
    """``metrics.json`` of one `make_preferences` run (names in docs/metrics.md)."""
    new_tokens = sum(len(sample.response_ids) for sample in samples)
    gaps = [pair["score_chosen"] - pair["score_rejected"] for pair in pairs]
    return {
        "prompts": len(prompts),
        "completions": len(samples),
        "pairs": len(pairs),
        "prompts_with_pairs": len(prompts) - sum(skipped.values()),
        **{f"prompts_skipped_{reason}": count for reason, count in skipped.items()},
        "blank_completions": sum(not sample.text.strip() for sample in samples),
        "score_mean": sum(scores) / max(len(scores), 1),
        "gap_mean": sum(gaps) / len(gaps) if gaps else None,
        "eos_rate": sum(sample.ended for sample in samples) / max(len(samples), 1),
        "new_tokens": new_tokens,
        "seconds": round(seconds, 3),
        "tokens_per_second": round(new_tokens / max(seconds, 1e-9), 2),
    }


def _pair_every_prompt(
    prompts: list[str], texts: list[str], scores: list[float], cfg: PrefsConfig
) -> tuple[list[dict], dict[str, int]]:
    """Pairs from every prompt's ``cfg.num_samples`` completions (``texts`` and ``scores`` in (prompt, sample)
    order), and how many prompts gave none, by `skip_reason`."""
    pairs: list[dict] = []
    skipped = {"tied": 0, "small_gap": 0, "no_distinct_text": 0}
    group = cfg.num_samples
    for index, prompt in enumerate(prompts):
        group_texts = texts[index * group : (index + 1) * group]
        group_scores = scores[index * group : (index + 1) * group]
        prompt_pairs = make_pairs(prompt, group_texts, group_scores, cfg.pair_rule, cfg.min_gap)
        if not prompt_pairs:
            skipped[skip_reason(group_texts, group_scores, cfg.min_gap)] += 1
        pairs += prompt_pairs
    return pairs, skipped
