"""The report as a document: its sections in order, as blocks both renderers read.

A block is ``("h1" | "h2" | "p" | "note", text)``, ``("table", Table)`` or ``("img", path, alt text)``.
"""

from __future__ import annotations

from pathlib import Path

from prefalign.eval.report.tables import (
    comparison_table,
    cost_table,
    results_table,
    samples_table,
    settings_table,
    sweep_table,
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
    document += [("h2", "How to read this report"), ("p", HOW_TO_READ)]
    document += [("h2", "PPO-RLHF vs DPO"), ("table", comparison_table(arms))]
    spread = (
        f"Numbers are means over {seed_count} seeds; ± is the standard deviation across seeds."
        if seed_count > 1
        else "One seed: no spread across seeds is shown."
    )
    document += [("note", spread + " Gold gain per 100 pairs = (arm gold − start gold) / pairs used × 100.")]
    document += [
        ("h2", "Results per arm (held-out prompts)"),
        ("table", results_table(arms)),
        ("note", spread + " Gold std and KL std are the spread over completions."),
    ]
    if any(arm.get("cost") for arm in trained(arms)):
        document += [("h2", "Costs"), ("table", cost_table(arms))]
    document += _frontier_section(summary, plots)
    document += _curves_section(arms, plots)
    if summary.get("samples"):
        document += [
            ("h2", "Sample completions (held-out prompts)"),
            ("table", samples_table(summary["samples"], arms)),
        ]
    if settings:
        document += [("h2", "Settings"), ("table", settings_table(settings))]
    return document


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


def _curves_section(arms: list[dict], plots: dict[str, Path]) -> list[tuple]:
    section: list[tuple] = [("h2", "Training curves")]
    if "training_curves" not in plots:
        return section + [("note", "No training curves in the summary.")]
    used = dict.fromkeys(arm.get("curve_metric", "metric") for arm in arms if arm.get("curve"))
    return section + [
        ("img", plots["training_curves"], "training curves per arm"),
        ("note", "; ".join(f"{metric}: {CURVE_METRICS.get(metric, 'as logged')}" for metric in used)),
    ]
