"""``prefalign compare``: race PPO-RLHF against DPO on the same preference pairs and measure everything.

The default task is controlled sentiment generation (offline): the policy continues movie-review
prefixes; the gold judge is VADER's sentiment of the continuation. Pairs come from the starting policy
(best vs worst of K samples by the judge); every arm trains on the same pairs; every policy is
evaluated on held-out prefixes. Output: report.md, report.html, summary.json and plots in --output.

Examples::

    prefalign compare --preset quick --output runs/compare-quick          # a smoke run of every stage
    prefalign compare --output runs/compare                               # the default race
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
    width = max(len(arm["label"]) for arm in summary["arms"])
    print(f"\n{'arm':<{width}}  gold    KL     win    wall s")
    for arm in summary["arms"]:
        scores, cost = arm["eval"], arm["cost"]
        print(
            f"{arm['label']:<{width}}  {scores['gold_mean']:+.3f}  {scores['kl_mean']:5.2f}  "
            f"{scores['win_rate']:.2f}  {cost['wall_seconds']['total']:7.1f}"
        )
    print(f"\nreport: {cfg.output}/report.md (and report.html, summary.json, plots)")
    return 0
