"""``prefalign compare``: race PPO-RLHF against DPO on the same preference pairs and measure everything.

The default task is controlled sentiment generation (offline): the policy continues movie-review prefixes; the gold
judge is VADER's sentiment of the continuation; --task arithmetic is addition of two integers from 1 to 25 with an
exact-match judge. Pairs come from the starting policy (pairs of K samples scored apart by the judge); every arm
trains on the same pairs, with 3 seeds by default; every policy is evaluated on held-out prompts with the same
random numbers, so differences are paired, with 95% intervals over prompts and seeds. The classic PPO-RLHF vs DPO
table is decided claim by claim (holds / does not hold / inconclusive at this budget) and printed at the end.
Output: report.md, report.html, summary.json and plots in --output.

Examples::

    prefalign compare --preset quick --output runs/compare-quick          # a smoke run of every stage
    prefalign compare --output runs/compare                               # the default race (3 seeds)
    prefalign compare --task arithmetic --output runs/compare-arith       # exact answers: 1 or 0
    prefalign compare --arms ppo dpo ppo_gt --seeds 3 --sweep --output runs/compare-full
    prefalign compare --arms dpo simpo orpo --output runs/compare-offline # DPO and two relatives, same pairs
    prefalign compare --model my/model --judge mymod:score --train-prompts p.txt --heldout-prompts h.txt
    prefalign compare --output runs/compare --resume                      # finished stages are not redone
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from prefalign.cli._args import parse
    from prefalign.compare import CompareConfig, Comparison

    cfg = parse(CompareConfig, argv, prog="prefalign compare", description=__doc__)
    summary = Comparison(cfg).run()
    print("\n" + results_text(summary))
    if summary.get("verdict"):
        print("\n" + verdict_text(summary["verdict"]))
    print(f"\nreport: {cfg.output}/report.md (and report.html, summary.json, plots)")
    return 0


def results_text(summary: dict) -> str:
    """The arms on a terminal: gold, KL and win rate against the start with their 95% intervals, wall time."""
    from prefalign.eval.report.values import fmt_stat, wall

    width = max(len(arm["label"]) for arm in summary["arms"])
    lines = [f"{'arm':<{width}}  {'gold [95% interval]':<26}{'KL, nats':<23}{'win rate vs start':<24}wall"]
    for arm in summary["arms"]:
        seconds = wall(arm, "total") or 0.0
        lines.append(
            f"{arm['label']:<{width}}  {fmt_stat(arm, 'gold_mean', '+.3f'):<26}{fmt_stat(arm, 'kl_mean', '.2f'):<23}"
            f"{fmt_stat(arm, 'win_rate', '.3f'):<24}{seconds / 60:.1f} min"
        )
    return "\n".join(lines)


def verdict_text(rows: list[dict]) -> str:
    """summary.json's verdict rows as `prefalign.compare.verdict_render.verdict_text` prints them."""
    from prefalign.compare.verdict import VerdictRow
    from prefalign.compare.verdict_render import verdict_text as render

    return "Verdict, claim by claim (PPO-RLHF vs DPO):\n\n" + render([VerdictRow(**row) for row in rows])
