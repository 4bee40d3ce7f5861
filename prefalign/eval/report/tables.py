"""The report's tables, from the summary's numbers: the PPO-RLHF vs DPO comparison, results per arm, costs,
the sweep, sample completions and the settings. Each is a `Table`, rendered by `markup`."""

from __future__ import annotations

from prefalign.compare.arms import ARMS, START
from prefalign.eval.report.markup import Bold, Code, Table
from prefalign.eval.report.values import fmt, fmt_interval, fmt_stat, is_number, start_gold, stat, trained, wall

EVAL_COLUMNS = [  # (key, header, format)
    ("gold_mean", "gold mean", "+.3f"),
    ("gold_std", "gold std", ".3f"),
    ("proxy_mean", "proxy mean", "+.3f"),
    ("kl_mean", "KL mean (nats)", ".3f"),
    ("kl_std", "KL std (nats)", ".3f"),
    ("win_rate", "win rate vs start", ".3f"),
    ("length_mean", "length (tokens)", ".1f"),
    ("eos_rate", "EOS rate", ".2f"),
    ("n", "n", ".0f"),
]

COMPARISON_ROWS = ("Reward model", "Policy update", "Loss", "Compute cost", "Sample efficiency", "Result")


def method_cells(name: str) -> dict[str, list]:
    """What an arm is, from the arm table: its "Reward model", "Policy update" and "Loss" cells (an arm the
    table does not know: "—")."""
    if name == START:
        return {
            "Reward model": ["—"],
            "Policy update": ["none: the starting policy (also the KL reference)"],
            "Loss": ["—"],
        }
    arm = ARMS.get(name)
    if arm is None:
        return {"Reward model": ["—"], "Policy update": ["—"], "Loss": ["—"]}
    loss = ([Code(arm.loss)] + ([arm.loss_note] if arm.loss_note else [])) if arm.loss else ["—"]
    return {"Reward model": [arm.reward_model or "—"], "Policy update": [arm.family.update], "Loss": loss}


def comparison_table(arms: list[dict]) -> Table:
    """The classic "PPO-RLHF vs DPO" table, one column per arm, filled with the measured numbers."""
    gold_of_start = start_gold(arms)
    columns = [_comparison_column(arm, gold_of_start) for arm in arms]
    return Table(
        [""] + [arm["label"] for arm in arms],
        [[Bold(row)] + [column[row] for column in columns] for row in COMPARISON_ROWS],
        "compare",
    )


def _tokens_note(name: str, pairs_used) -> str:
    """Where an arm's sampled tokens went, by its family: pairs made before training, or rollouts."""
    arm = ARMS.get(name)
    if arm is None:
        return ""
    if not arm.family.online:
        return "; all before training, for the pairs"
    return "; pairs + rollouts" if pairs_used else "; rollouts"


def _comparison_column(arm: dict, gold_of_start: float | None) -> dict[str, list]:
    """One arm's cells of the comparison table, by row label."""
    cost = arm.get("cost") or {}
    column = {**method_cells(arm["name"]), "Compute cost": ["—"], "Sample efficiency": ["—"]}
    column["Result"] = [
        f"gold {fmt_stat(arm, 'gold_mean', '+.3f')}\nKL {fmt_stat(arm, 'kl_mean', '.3f')} nats\n"
        f"win rate {fmt_stat(arm, 'win_rate', '.3f')}"
    ]
    if arm["name"] == START or not cost:
        return column
    if is_number(cost.get("rm_heldout_accuracy")):
        column["Reward model"].append(f"\nheld-out pair accuracy {cost['rm_heldout_accuracy']:.3f}")
    tokens, pairs = cost.get("tokens_generated"), cost.get("pairs_used")
    if is_number(tokens):
        column["Policy update"].append(f"\n{tokens:,.0f} tokens sampled{_tokens_note(arm['name'], pairs)}")
    seconds = {part: fmt(wall(arm, part), ".0f") for part in ("total", "pairs", "reward_model", "policy")}
    evaluation = wall(arm, "evaluation")  # absent from summaries written before it was taken out
    column["Compute cost"] = [
        f"{seconds['total']} s wall (pairs {seconds['pairs']} s, reward model "
        f"{seconds['reward_model']} s, policy {seconds['policy']} s)\n"
        + (f"+ {evaluation:.0f} s of evaluation while training, not charged\n" if is_number(evaluation) else "")
        + f"peak RSS {fmt(cost.get('peak_rss_mb'), ',.0f')} MiB\n"
        f"{fmt(cost.get('gradient_steps'), ',.0f')} gradient steps\n"
        f"{fmt(tokens, ',.0f')} tokens generated"
    ]
    gold = stat(arm, "gold_mean")[0]
    if is_number(pairs) and pairs > 0:
        gain = fmt(None if gold is None or gold_of_start is None else 100 * (gold - gold_of_start) / pairs, "+.4f")
        used = f"{pairs:,.0f} preference pairs used"
        column["Sample efficiency"] = [f"{used}\ngold gain over start per 100 pairs: {gain}"]
    elif pairs == 0:
        column["Sample efficiency"] = ["no preference pairs used"]
    return column


def results_table(arms: list[dict]) -> Table:
    has_proxy = any(is_number(arm["eval"].get("proxy_mean")) for arm in arms)
    columns = [column for column in EVAL_COLUMNS if column[0] != "proxy_mean" or has_proxy]
    return Table(
        ["arm"] + [header for _, header, _ in columns],
        [[arm["label"]] + [fmt_stat(arm, key, spec) for key, _, spec in columns] for arm in arms],
    )


def cost_table(arms: list[dict]) -> Table:
    rows = []
    for arm in trained(arms):
        cost = arm.get("cost") or {}
        seconds = (fmt(wall(arm, part), ".1f") for part in ("pairs", "reward_model", "policy", "total"))
        rows.append(
            [
                arm["label"],
                *seconds,
                fmt(cost.get("peak_rss_mb"), ",.0f"),
                fmt(cost.get("gradient_steps"), ",.0f"),
                fmt(cost.get("tokens_generated"), ",.0f"),
                fmt(cost.get("pairs_used"), ",.0f"),
                fmt(cost.get("rm_heldout_accuracy"), ".3f"),
            ]
        )
    return Table(
        [
            "arm",
            "pairs (s)",
            "reward model (s)",
            "policy (s)",
            "total (s)",
            "peak RSS (MiB)",
            "gradient steps",
            "tokens generated",
            "pairs used",
            "RM held-out accuracy",
        ],
        rows,
    )


def sweep_table(sweep: list[dict], labels: dict[str, str]) -> Table:
    points = sorted(sweep, key=lambda point: (point["arm"], point["param"], point["value"]))
    return Table(
        ["arm", "parameter", "value", "gold mean", "KL mean (nats)"],
        [
            [
                labels.get(point["arm"], point["arm"]),
                point["param"],
                f"{point['value']:g}",
                fmt_interval(point["gold"], "+.3f") if point.get("gold") else fmt(point.get("gold_mean"), "+.3f"),
                fmt_interval(point["kl"], ".3f") if point.get("kl") else fmt(point.get("kl_mean"), ".3f"),
            ]
            for point in points
        ],
    )


def _marked(found: dict | None, spec: str, null: float) -> str:
    """An interval, with ``*`` when it excludes ``null`` (a difference the data resolve)."""
    text = fmt_interval(found, spec)
    if text != "—" and found and (found["low"] > null or found["high"] < null):
        text += " *"
    return text


def differences_table(arms: list[dict], differences: list[dict]) -> Table:
    """Paired differences with their 95% intervals: every trained arm against the start, then every pair of arms
    (gold a - b, KL a - b, head-to-head win rate of a over b); ``*``: the interval excludes 0 (win rate: 1/2)."""
    labels = {arm["name"]: arm["label"] for arm in arms}
    start = next((arm["label"] for arm in arms if arm["name"] == START), "start")
    rows = [
        [
            f"{arm['label']} vs {start}",
            _marked(arm["vs_start"].get("gold"), "+.3f", 0.0),
            _marked(arm["vs_start"].get("kl"), "+.2f", 0.0),
            _marked(arm["vs_start"].get("win_rate"), ".3f", 0.5),
        ]
        for arm in trained(arms)
        if arm.get("vs_start")
    ]
    rows += [
        [
            f"{labels.get(d['a'], d['a'])} vs {labels.get(d['b'], d['b'])}",
            _marked(d.get("gold"), "+.3f", 0.0),
            _marked(d.get("kl"), "+.2f", 0.0),
            _marked(d.get("win_rate"), ".3f", 0.5),
        ]
        for d in differences
    ]
    return Table(["a vs b", "gold a − b", "KL a − b (nats)", "win rate of a over b"], rows)


def samples_table(samples: list[dict], arms: list[dict]) -> Table:
    """One row per prompt, one column per policy that has a completion (summary arms first, in their order)."""
    names = [arm["name"] for arm in arms]
    names += [name for sample in samples for name in sample.get("completions", {}) if name not in names]
    names = [name for name in dict.fromkeys(names) if any(name in sample.get("completions", {}) for sample in samples)]
    labels = {arm["name"]: arm["label"] for arm in arms}
    rows = []
    for sample in samples:
        row = [sample["prompt"]]
        for name in names:
            text = sample.get("completions", {}).get(name)
            gold = sample.get("gold", {}).get(name)
            row.append("—" if text is None else f"{text if text.strip() else '(empty)'}\n(gold {fmt(gold, '+.3f')})")
        rows.append(row)
    return Table(["prompt"] + [labels.get(name, name) for name in names], rows, "samples")


def settings_table(settings: dict) -> Table:
    def show(value):
        if isinstance(value, (list, tuple)):
            return ", ".join(map(str, value)) or "—"
        return "—" if value is None else str(value)

    return Table(["setting", "value"], [[key, show(value)] for key, value in settings.items()])


def verdict_table(rows: list[dict]) -> Table:
    """The verdict per claim (summary.json's ``verdict``, `prefalign.compare.verdict`): the claim for PPO-RLHF and
    for DPO, what was measured per arm, the verdict and the numbers that decide it."""
    labels = list(dict.fromkeys(label for row in rows for label in row["measured"]))
    return Table(
        ["", "PPO-RLHF claim", "DPO claim", *(f"{label}: measured" for label in labels), "verdict"],
        [
            [
                Bold(f"{number}. {row['topic']}"),
                row["claim_ppo"],
                row["claim_dpo"],
                *(row["measured"].get(label, "—") for label in labels),
                [Bold(row["verdict"]), f": {row['reason']}"],
            ]
            for number, row in enumerate(rows, 1)
        ],
        "verdict",
    )
