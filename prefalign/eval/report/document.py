"""The report as a document: its sections in order, as blocks both renderers read.

A block is ``("h1" | "h2" | "p" | "note", text)``, ``("table", Table)`` or ``("img", path, alt text)``.
"""

from __future__ import annotations

from pathlib import Path

from prefalign.eval.report.tables import (
    comparison_table,
    cost_table,
    differences_table,
    results_table,
    samples_table,
    settings_table,
    sweep_table,
    verdict_table,
)
from prefalign.eval.report.values import CURVE_METRICS, trained

HOW_TO_READ = (
    "Every policy completed the same held-out prompts. Gold is the gold judge's score of the completion "
    "alone: the quantity every arm tries to raise, though only the gold-judge PPO arm (if present) ever sees "
    "it while training; the others learn from preference pairs the judge labelled. KL is how far a policy has "
    "drifted from the starting policy, which is also the reference: the mean over completions of the summed "
    "log-probability ratio, in nats per completion (0 for the start). Win rate is the share of completions the "
    "gold judge scores above the starting policy's completion of the same prompt (ties count half; 0.5 = no "
    "better than the start). KL matters because reward can be bought with drift: a policy far from the "
    "reference can exploit a learned reward model's mistakes or collapse onto a few stock phrases, so a gold "
    "gain is only worth the KL it cost. Compare arms on the gold-vs-KL plot (up and to the left is better), "
    "not by gold alone. Proxy, where present, is the learned reward model's score: a proxy that rises while "
    "gold does not is reward hacking."
)

PAIRED_NOTE = (
    "Every policy drew the same random numbers for the same held-out prompt, so differences are taken prompt by "
    "prompt (paired), which removes most of the prompt-to-prompt noise. Each interval is a 95% Student-t interval "
    "whose variance adds the spread of the seed means and of the prompt means (crossed; Welch-Satterthwaite "
    "degrees of freedom). "
    "* marks a difference whose interval excludes 0 (a win rate: excludes 1/2)."
)

OVEROPTIMISATION_NOTE = (
    "Each online arm evaluated its current policy on held-out prompts before training and at evenly spaced "
    "iterations: the gold judge's score, the proxy (the reward the arm optimises: the reward model for PPO-RLHF, "
    "GRPO and RLOO) and KL to the start. Gao, Schulman and Hilton (2022) found the proxy keeps rising with KL "
    "while gold peaks and falls: a gold curve that bends down while the proxy still climbs is over-optimisation. "
    "Bars: 95% intervals across seeds."
)

VERDICT_NOTE = (
    "The classic comparison (PPO-RLHF: a separate reward model, an RL update, an advantage-weighted loss, "
    "relatively large compute cost and low sample efficiency; DPO: no reward model, a supervised update, a "
    "preference loss, relatively small cost and high sample efficiency), each claim checked against this run. "
    "holds / does not hold: the 95% intervals decide it; inconclusive at this budget: they do not."
)

DEFAULT_TITLE = "PPO-RLHF vs DPO"


def blocks(summary: dict, plots: dict[str, Path]) -> list[tuple]:
    """Every section of the report, in order; a section whose data is missing is left out or says so."""
    arms = summary["arms"]
    settings = summary.get("settings") or {}
    seed_count = max(len(arm.get("seeds") or []) for arm in arms)
    document: list[tuple] = [("h1", summary.get("title") or DEFAULT_TITLE)]
    meta = [
        f"created {summary['created']}" if summary.get("created") else "",
        *(f"{key} {settings[key]}" for key in ("model", "judge", "preset") if key in settings),
    ]
    document.append(("note", " · ".join(item for item in meta if item)))
    document += _verdict_section(summary)
    document += [("h2", "How to read this report"), ("p", HOW_TO_READ)]
    document += [("h2", "PPO-RLHF vs DPO"), ("table", comparison_table(arms))]
    spread = (
        f"Numbers are means over {seed_count} seeds; [low, high] is a 95% interval (crossed over held-out "
        "prompts and seeds); ± is the standard deviation across seeds."
        if seed_count > 1
        else "One seed: [low, high] is a 95% t-interval over held-out prompts; nothing measures how "
        "another training seed would move it."
    )
    document += [("note", spread + " Gold gain per 100 pairs = (arm gold − start gold) / pairs used × 100.")]
    document += [
        ("h2", "Results per arm (held-out prompts)"),
        ("table", results_table(arms)),
        ("note", spread + " Gold std and KL std are the spread over completions."),
    ]
    if any(arm.get("vs_start") for arm in arms):
        document += [
            ("h2", "Paired differences (held-out prompts)"),
            ("table", differences_table(arms, summary.get("differences") or [])),
            ("note", PAIRED_NOTE),
        ]
    if any(arm.get("cost") for arm in trained(arms)):
        document += [("h2", "Costs"), ("table", cost_table(arms))]
    document += _frontier_section(summary, plots)
    if "overoptimisation" in plots:
        document += [
            ("h2", "Over-optimisation: gold and proxy during training"),
            ("img", plots["overoptimisation"], "held-out gold and proxy against KL at points during training"),
            ("note", OVEROPTIMISATION_NOTE),
        ]
    document += _curves_section(arms, plots, seed_count)
    if summary.get("samples"):
        document += [
            ("h2", "Sample completions (held-out prompts)"),
            ("table", samples_table(summary["samples"], arms)),
        ]
    if settings:
        document += [("h2", "Settings"), ("table", settings_table(settings))]
    return document


def _verdict_section(summary: dict) -> list[tuple]:
    """The verdict per claim, first: what a reader came for (absent when the race had no PPO-RLHF or no DPO arm)."""
    rows = summary.get("verdict") or []
    if not rows:
        return []
    return [
        ("h2", "Verdict: the PPO-RLHF vs DPO table, claim by claim"),
        ("p", VERDICT_NOTE),
        ("table", verdict_table(rows)),
    ]


def _frontier_section(summary: dict, plots: dict[str, Path]) -> list[tuple]:
    """Gold vs KL (and the sweep's frontiers), then gold vs wall time."""
    section: list[tuple] = [("h2", "Gold reward vs KL")]
    if "gold_vs_kl" in plots:
        section.append(("img", plots["gold_vs_kl"], "gold score vs KL to the starting policy, one point per arm"))
    if summary.get("sweep"):
        labels = {arm["name"]: arm["label"] for arm in summary["arms"]}
        section += [
            (
                "note",
                "Sweep: arms retrained at other settings; the dashed line joins them into a frontier. "
                "A frontier above and left of another buys more gold for the same drift.",
            ),
            ("table", sweep_table(summary["sweep"], labels)),
        ]
    if "gold_vs_wall_time" in plots:
        section += [
            ("h2", "Gold reward vs wall time"),
            ("img", plots["gold_vs_wall_time"], "gold score vs total wall time per arm"),
        ]
    return section


def _curves_section(arms: list[dict], plots: dict[str, Path], seed_count: int) -> list[tuple]:
    section: list[tuple] = [("h2", "Training curves")]
    if "training_curves" not in plots:
        return section + [("note", "No training curves in the summary.")]
    used = dict.fromkeys(arm.get("curve_metric", "metric") for arm in arms if arm.get("curve"))
    # every number above is a mean over the seeds, but a curve is one run (compare draws its first seed's)
    runs = (
        f"Each line is one training run of its arm, not a mean over the {seed_count} seeds. " if seed_count > 1 else ""
    )
    return section + [
        ("img", plots["training_curves"], "training curves per arm"),
        ("note", runs + "; ".join(f"{metric}: {CURVE_METRICS.get(metric, 'as logged')}" for metric in used)),
    ]
