"""Render a comparison summary: ``report.md``, a self-contained ``report.html``, PNG plots, ``summary.json``.

Pure rendering: `write_report` reads only the summary dict (no run directory, no model), so a report
can be rebuilt from any ``summary.json``. Every optional piece may be missing (no sweep, one seed, no
proxy, no curves, no samples, any subset of arms); what is missing is left out or shown as ``—``.

The summary schema (units in brackets)::

    summary = {
      "title":    str,               # report heading
      "created":  str,               # ISO 8601 time the summary was made
      "settings": {str: any},        # free-form, shown as a key/value table: model, judge, prompts,
                                     # preset, seeds, budgets ... ("judge" also names the gold axis)
      "arms":     [arm, ...],        # "start" (the starting policy, also the KL reference) first
      "sweep":    [point, ...],      # optional: extra settings of an arm, drawn as a frontier
      "samples":  [sample, ...],     # optional: completions side by side
    }
    arm = {
      "name":  str,                  # "start", "ppo", "dpo", "dpo_rf", "ppo_gt" (other names render
                                     # with no method description)
      "label": str,                  # display name, e.g. "PPO-RLHF" (default: the name)
      "eval":  eval,                 # held-out evaluation; with several seeds, the mean over seeds
      "seeds": [eval, ...],          # optional, one per seed; > 1 entries: tables show mean ± std
                                     # (sample std across seeds)
      "cost":  cost,                 # optional (the start arm has none, or zeros)
      "curve": [{"step": int,        # optional: training curve of one run
                 "wall_seconds": float,   # [s] since that training run started
                 "metric": float}],       # [unit of curve_metric]
      "curve_metric": str,           # what "metric" is: "objective/scores" (PPO: mean reward of a
                                     # rollout batch), "rewards/margins" (DPO: implicit reward margin)...
    }
    eval = {
      "gold_mean":   float,          # mean gold-judge score of the completions [judge unit; VADER: [-1, 1]]
      "gold_std":    float,          # std of that score over completions [judge unit]
      "proxy_mean":  float | None,   # mean learned-reward-model score [its own unit]; None: no proxy
      "kl_mean":     float,          # mean over completions of sum_t log p_policy - log p_start [nats]
      "kl_std":      float,          # std of that over completions [nats]
      "win_rate":    float,          # share of completions the gold judge scores above the start's
                                     # completion of the same prompt and sample, ties 1/2 [0..1]
      "length_mean": float,          # mean response length [tokens]
      "eos_rate":    float,          # share of responses that ended before the token limit [0..1]
      "n":           int,            # completions evaluated
    }
    cost = {
      "wall_seconds": {"pairs": s, "reward_model": s, "policy": s, "total": s},  # wall clock [s];
                                     # pairs: making the preference pairs; total: the sum
      "peak_rss_mb":         float,  # largest peak resident memory of the arm's stages [MiB]
      "tokens_generated":    int,    # tokens sampled to train the arm: pair making + PPO rollouts
      "gradient_steps":      int,    # optimizer steps of every model the arm trained (RM + policy)
      "pairs_used":          int,    # preference pairs the arm trained on (0: none)
      "rm_heldout_accuracy": float | None,  # reward model's accuracy on held-out pairs [0..1]
    }
    point  = {"arm": str, "param": str ("beta", "kl_coef"...), "value": float,
              "gold_mean": float [judge unit], "kl_mean": float [nats]}
    sample = {"prompt": str, "completions": {arm name: str}, "gold": {arm name: float}}

Files written into ``out_dir``: ``report.md``, ``report.html`` (plots embedded as base64 PNG),
``gold_vs_kl.png``, ``training_curves.png`` (only when some arm has a curve), ``gold_vs_wall_time.png``
(only when some trained arm has a cost), and ``summary.json`` (the summary plus ``"files"``).
"""

from __future__ import annotations

import base64
import html
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from prefalign.runio import atomic_write_text, write_json

EVAL_COLUMNS = [  # (key, header, format)
    ("gold_mean", "gold mean", "+.3f"), ("gold_std", "gold std", ".3f"), ("proxy_mean", "proxy mean", "+.3f"),
    ("kl_mean", "KL mean (nats)", ".3f"), ("kl_std", "KL std (nats)", ".3f"), ("win_rate", "win rate vs start", ".3f"),
    ("length_mean", "length (tokens)", ".1f"), ("eos_rate", "EOS rate", ".2f"), ("n", "n", ".0f"),
]

CURVE_METRICS = {
    "objective/scores": "PPO: mean reward of each rollout batch (the reward PPO optimises)",
    "rewards/margins": "DPO: mean implicit reward margin, chosen minus rejected",
    "loss": "training loss",
}


class Code(str):
    """A table-cell part rendered as inline code (a formula)."""


class Bold(str):
    """A table-cell part rendered bold (a row label)."""


@dataclass
class Table:
    """Rendered to both markdown and HTML. A cell is a str, a `Code`, a `Bold`, or a list of them
    concatenated; a "\n" inside a str part is a line break."""

    header: list[str]
    rows: list[list]
    cls: str = ""
    """HTML class of the table."""


# ---------------------------------------------------------------------------------------------- methods

_PPO_LOSS = [Code("E[min(r_t A_t, clip(r_t, 1-eps, 1+eps) A_t)]"), " with a per-token KL penalty to the reference"]
METHODS: dict[str, dict[str, list]] = {
    "start": {"reward_model": ["—"], "update": ["none: the starting policy (also the KL reference)"],
              "loss": ["—"]},
    "ppo": {"reward_model": ["trained explicitly (Bradley-Terry on the pairs)"],
            "update": ["on-policy RL: samples its own completions while training"], "loss": _PPO_LOSS},
    "ppo_gt": {"reward_model": ["none: optimises the gold judge directly (an upper bound, not a fair race)"],
               "update": ["on-policy RL: samples its own completions while training"], "loss": _PPO_LOSS},
    "dpo": {"reward_model": ["none: implicit in the policy"], "update": ["offline: supervised on fixed pairs"],
            "loss": [Code("-log sigmoid(beta((logp_c - ref_c) - (logp_r - ref_r)))")]},
    "dpo_rf": {"reward_model": ["none: implicit in the policy, no reference model"],
               "update": ["offline: supervised on fixed pairs"], "loss": [Code("-log sigmoid(logp(x+) - logp(x-))")]},
}


def _family(name: str) -> str | None:
    """The METHODS entry of an arm: its own name, else "ppo"/"dpo" by prefix (None: unknown)."""
    if name in METHODS:
        return name
    return next((f for f in ("ppo", "dpo") if name.startswith(f)), None)


# ---------------------------------------------------------------------------------------------- numbers


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(v, spec: str = ".3f") -> str:
    return format(v, spec) if _is_num(v) else "—"


def _stat(arm: dict, key: str) -> tuple[float | None, float | None]:
    """``(mean, std across seeds)`` of an eval key; std is None with fewer than two seeds."""
    seeds = arm.get("seeds") or []
    vals = [s.get(key) for s in seeds]
    if len(vals) > 1 and all(_is_num(v) for v in vals):
        return statistics.fmean(vals), statistics.stdev(vals)
    v = arm["eval"].get(key)
    return (v if _is_num(v) else None), None


def _fmt_stat(arm: dict, key: str, spec: str) -> str:
    mean, std = _stat(arm, key)
    if mean is None:
        return "—"
    return f"{mean:{spec}} ± {std:{spec.lstrip('+')}}" if std is not None else format(mean, spec)


def _wall(arm: dict, part: str):
    return ((arm.get("cost") or {}).get("wall_seconds") or {}).get(part)


def _trained(arms: list[dict]) -> list[dict]:
    return [a for a in arms if a["name"] != "start"]


# ---------------------------------------------------------------------------------------------- tables


COMPARISON_ROWS = ("Reward model", "Policy update", "Loss", "Compute cost", "Sample efficiency", "Result")


def comparison_table(arms: list[dict]) -> Table:
    """The seed's "PPO-RLHF vs DPO" table, one column per arm, filled with the measured numbers."""
    start = next((a for a in arms if a["name"] == "start"), None)
    start_gold = _stat(start, "gold_mean")[0] if start else None
    columns = [_comparison_column(a, start_gold) for a in arms]
    return Table([""] + [a["label"] for a in arms], [[Bold(r)] + [c[r] for c in columns] for r in COMPARISON_ROWS],
                 "compare")


def _comparison_column(arm: dict, start_gold: float | None) -> dict[str, list]:
    """One arm's cells of the comparison table, by row label."""
    family = _family(arm["name"]) or ""
    method = METHODS.get(family, {})
    cost = arm.get("cost") or {}
    col = {"Reward model": list(method.get("reward_model", ["—"])),
           "Policy update": list(method.get("update", ["—"])),
           "Loss": list(method.get("loss", ["—"])), "Compute cost": ["—"], "Sample efficiency": ["—"]}
    col["Result"] = [f"gold {_fmt_stat(arm, 'gold_mean', '+.3f')}\nKL {_fmt_stat(arm, 'kl_mean', '.3f')} nats\n"
                     f"win rate {_fmt_stat(arm, 'win_rate', '.3f')}"]
    if arm["name"] == "start" or not cost:
        return col
    if _is_num(cost.get("rm_heldout_accuracy")):
        col["Reward model"].append(f"\nheld-out pair accuracy {cost['rm_heldout_accuracy']:.3f}")
    tokens, pairs = cost.get("tokens_generated"), cost.get("pairs_used")
    if _is_num(tokens):
        where = ("; all before training, for the pairs" if family.startswith("dpo") else
                 "" if not family.startswith("ppo") else "; pairs + rollouts" if pairs else "; rollouts")
        col["Policy update"].append(f"\n{tokens:,} tokens sampled{where}")
    w = {k: _fmt(_wall(arm, k), ".0f") for k in ("total", "pairs", "reward_model", "policy")}
    col["Compute cost"] = [f"{w['total']} s wall (pairs {w['pairs']} s, reward model {w['reward_model']} s, "
                           f"policy {w['policy']} s)\npeak RSS {_fmt(cost.get('peak_rss_mb'), ',.0f')} MiB\n"
                           f"{_fmt(cost.get('gradient_steps'), ',.0f')} gradient steps\n"
                           f"{_fmt(tokens, ',.0f')} tokens generated"]
    gold = _stat(arm, "gold_mean")[0]
    if _is_num(pairs) and pairs > 0:
        gain = _fmt(None if gold is None or start_gold is None else 100 * (gold - start_gold) / pairs, "+.4f")
        col["Sample efficiency"] = [f"{pairs:,} preference pairs used\ngold gain over start per 100 pairs: {gain}"]
    elif pairs == 0:
        col["Sample efficiency"] = ["no preference pairs used"]
    return col


def results_table(arms: list[dict]) -> Table:
    cols = [c for c in EVAL_COLUMNS if c[0] != "proxy_mean" or any(_is_num(a["eval"].get("proxy_mean")) for a in arms)]
    return Table(["arm"] + [h for _, h, _ in cols],
                 [[a["label"]] + [_fmt_stat(a, k, spec) for k, _, spec in cols] for a in arms])


def cost_table(arms: list[dict]) -> Table:
    rows = []
    for a in _trained(arms):
        c = a.get("cost") or {}
        rows.append([a["label"], *(_fmt(_wall(a, k), ".1f") for k in ("pairs", "reward_model", "policy", "total")),
                     _fmt(c.get("peak_rss_mb"), ",.0f"), _fmt(c.get("gradient_steps"), ",.0f"),
                     _fmt(c.get("tokens_generated"), ",.0f"), _fmt(c.get("pairs_used"), ",.0f"),
                     _fmt(c.get("rm_heldout_accuracy"), ".3f")])
    return Table(["arm", "pairs (s)", "reward model (s)", "policy (s)", "total (s)", "peak RSS (MiB)",
                  "gradient steps", "tokens generated", "pairs used", "RM held-out accuracy"], rows)


def sweep_table(sweep: list[dict], labels: dict[str, str]) -> Table:
    pts = sorted(sweep, key=lambda p: (p["arm"], p["param"], p["value"]))
    return Table(["arm", "parameter", "value", "gold mean", "KL mean (nats)"],
                 [[labels.get(p["arm"], p["arm"]), p["param"], f"{p['value']:g}", _fmt(p.get("gold_mean"), "+.3f"),
                   _fmt(p.get("kl_mean"), ".3f")] for p in pts])


def samples_table(samples: list[dict], arms: list[dict]) -> Table:
    names = [a["name"] for a in arms]
    names += [n for s in samples for n in s.get("completions", {}) if n not in names]
    names = [n for n in dict.fromkeys(names) if any(n in s.get("completions", {}) for s in samples)]
    labels = {a["name"]: a["label"] for a in arms}
    rows = []
    for s in samples:
        row = [s["prompt"]]
        for n in names:
            text = s.get("completions", {}).get(n)
            gold = s.get("gold", {}).get(n)
            row.append("—" if text is None else f"{text if text.strip() else '(empty)'}\n(gold {_fmt(gold, '+.3f')})")
        rows.append(row)
    return Table(["prompt"] + [labels.get(n, n) for n in names], rows, "samples")


def settings_table(settings: dict) -> Table:
    def show(v):
        if isinstance(v, (list, tuple)):
            return ", ".join(map(str, v)) or "—"
        return "—" if v is None else str(v)

    return Table(["setting", "value"], [[k, show(v)] for k, v in settings.items()])


# ---------------------------------------------------------------------------------------------- markup

_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|])")


def _md_text(s: str) -> str:
    """Literal text in a markdown table cell: specials backslash-escaped, line breaks as <br>."""
    s = _MD_SPECIAL.sub(r"\\\1", s.replace("\r\n", "\n").replace("\r", "\n"))
    return s.replace("\n", "<br>")


def _parts(cell) -> list:
    return cell if isinstance(cell, list) else [cell]


def _md_cell(cell) -> str:
    out = []
    for p in _parts(cell):
        if isinstance(p, Code):
            out.append("`" + p.replace("|", "\\|") + "`")  # GFM splits cells on a pipe even inside code
        elif isinstance(p, Bold):
            out.append(f"**{_md_text(p)}**")
        else:
            out.append(_md_text(p))
    return "".join(out) or " "


def _html_cell(cell) -> str:
    out = []
    for p in _parts(cell):
        text = html.escape(p, quote=True).replace("\r\n", "\n").replace("\n", "<br>")
        out.append(f"<code>{text}</code>" if isinstance(p, Code) else f"<b>{text}</b>" if isinstance(p, Bold)
                   else text)
    return "".join(out)


def md_table(t: Table) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in t.header) + " |", "|" + "---|" * len(t.header)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows]
    return "\n".join(lines)


def html_table(t: Table) -> str:
    head = "".join(f"<th>{_html_cell(h)}</th>" for h in t.header)
    body = "".join("<tr>" + "".join(f"<td>{_html_cell(c)}</td>" for c in row) + "</tr>\n" for row in t.rows)
    cls = f' class="{t.cls}"' if t.cls else ""
    return f"<table{cls}>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>"


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1200px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .2em; }
h2 { margin-top: 2em; border-bottom: 1px solid #eee; }
table { border-collapse: collapse; margin: 1em 0; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: left; }
th { background: #f3f3f3; }
td { font-variant-numeric: tabular-nums; }
table.samples td { max-width: 28em; overflow-wrap: anywhere; }
code { background: #f5f5f5; padding: 0 3px; font-size: 13px; }
img { max-width: 100%; border: 1px solid #eee; margin: .5em 0; }
p.note { color: #555; font-size: 14px; }
"""


# ---------------------------------------------------------------------------------------------- document


def _blocks(summary: dict, plots: dict[str, Path]) -> list[tuple]:
    """The report as ``("h1"|"h2"|"p"|"note", text)``, ``("table", Table)``, ``("img", path, alt)`` blocks."""
    arms = summary["arms"]
    labels = {a["name"]: a["label"] for a in arms}
    settings = summary.get("settings") or {}
    nseeds = max(len(a.get("seeds") or []) for a in arms)
    b: list[tuple] = [("h1", summary.get("title") or "PPO-RLHF vs DPO")]
    meta = [f"created {summary['created']}" if summary.get("created") else "",
            *(f"{k} {settings[k]}" for k in ("model", "judge", "preset") if k in settings)]
    b.append(("note", " · ".join(m for m in meta if m)))
    b += [("h2", "How to read this report"), ("p", HOW_TO_READ)]
    b += [("h2", "PPO-RLHF vs DPO"), ("table", comparison_table(arms))]
    spread = (f"Numbers are means over {nseeds} seeds; ± is the standard deviation across seeds." if nseeds > 1
              else "One seed: no spread across seeds is shown.")
    b += [("note", spread + " Gold gain per 100 pairs = (arm gold − start gold) / pairs used × 100.")]
    b += [("h2", "Results per arm (held-out prompts)"), ("table", results_table(arms)),
          ("note", spread + " Gold std and KL std are the spread over completions.")]
    if any(a.get("cost") for a in _trained(arms)):
        b += [("h2", "Costs"), ("table", cost_table(arms))]
    b += [("h2", "Gold reward vs KL")]
    if "gold_vs_kl" in plots:
        b.append(("img", plots["gold_vs_kl"], "gold score vs KL to the starting policy, one point per arm"))
    if summary.get("sweep"):
        b += [("note", "Sweep: arms retrained at other settings; the dashed line joins them into a frontier. "
                       "A frontier above and left of another buys more gold for the same drift."),
              ("table", sweep_table(summary["sweep"], labels))]
    if "gold_vs_wall_time" in plots:
        b += [("h2", "Gold reward vs wall time"),
              ("img", plots["gold_vs_wall_time"], "gold score vs total wall time per arm")]
    b.append(("h2", "Training curves"))
    if "training_curves" in plots:
        used = dict.fromkeys(a.get("curve_metric", "metric") for a in arms if a.get("curve"))
        b += [("img", plots["training_curves"], "training curves per arm"),
              ("note", "; ".join(f"{m}: {CURVE_METRICS.get(m, 'as logged')}" for m in used))]
    else:
        b.append(("note", "No training curves in the summary."))
    if summary.get("samples"):
        b += [("h2", "Sample completions (held-out prompts)"), ("table", samples_table(summary["samples"], arms))]
    if settings:
        b += [("h2", "Settings"), ("table", settings_table(settings))]
    return b


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
    "gold does not is reward hacking.")


def render_markdown(blocks: list[tuple]) -> str:
    out = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2"):
            out.append("#" * int(kind[1]) + " " + _md_text(rest[0]))
        elif kind in ("p", "note"):
            out.append(_md_text(rest[0]) if kind == "p" else f"*{_md_text(rest[0])}*")
        elif kind == "table":
            out.append(md_table(rest[0]))
        elif kind == "img":
            out.append(f"![{rest[1]}]({rest[0].name})")
    return "\n\n".join(out) + "\n"


def render_html(blocks: list[tuple], title: str) -> str:
    out = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2"):
            out.append(f"<{kind}>{html.escape(rest[0])}</{kind}>")
        elif kind in ("p", "note"):
            out.append(f'<p class="{kind}">{html.escape(rest[0])}</p>')
        elif kind == "table":
            out.append(html_table(rest[0]))
        elif kind == "img":
            data = base64.b64encode(rest[0].read_bytes()).decode("ascii")
            out.append(f'<img src="data:image/png;base64,{data}" alt="{html.escape(rest[1], quote=True)}">')
    body = "\n".join(out)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            f"<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


# ---------------------------------------------------------------------------------------------- plots


def _figure(width: float, height: float):
    """A figure on the Agg canvas. No pyplot: nothing global changes (the caller's backend stays), no GUI."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _colors(arms: list[dict]) -> dict[str, object]:
    from matplotlib import colormaps

    tab = colormaps["tab10"].colors
    trained = [a["name"] for a in _trained(arms)]
    return {"start": "0.35", **{n: tab[i % len(tab)] for i, n in enumerate(trained)}}


def _plot_gold_vs_kl(arms: list[dict], sweep: list[dict], colors: dict, gold_axis: str, path: Path) -> bool:
    fig = _figure(7.5, 5.2)
    ax = fig.add_subplot()
    drawn = False
    for a in arms:
        (x, xs), (y, ys) = _stat(a, "kl_mean"), _stat(a, "gold_mean")
        if x is None or y is None:
            continue
        ax.errorbar(x, y, xerr=xs, yerr=ys, fmt="o", ms=8, capsize=3, color=colors.get(a["name"], "0.5"),
                    label=a["label"], zorder=3)
        ax.annotate(a["label"], (x, y), textcoords="offset points", xytext=(7, 6), fontsize=9)
        drawn = True
    labels = {a["name"]: a["label"] for a in arms}
    for arm, param in dict.fromkeys((p["arm"], p["param"]) for p in sweep):
        pts = sorted((p for p in sweep if (p["arm"], p["param"]) == (arm, param)
                      and _is_num(p.get("kl_mean")) and _is_num(p.get("gold_mean"))), key=lambda p: p["kl_mean"])
        if not pts:
            continue
        ax.plot([p["kl_mean"] for p in pts], [p["gold_mean"] for p in pts], "--", marker="s", ms=4, alpha=0.75,
                color=colors.get(arm, "0.5"), label=f"{labels.get(arm, arm)}: sweep over {param}", zorder=2)
        for p in pts:
            ax.annotate(f"{param}={p['value']:g}", (p["kl_mean"], p["gold_mean"]), textcoords="offset points",
                        xytext=(5, -11), fontsize=7, color="0.3")
        drawn = True
    if not drawn:
        return False
    ax.axvline(0, color="0.8", lw=0.8, zorder=1)
    ax.set_xlabel("KL(policy || start), nats per completion")
    ax.set_ylabel(gold_axis)
    ax.set_title("Gold reward vs KL to the starting policy (up and left is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path)
    return True


def _plot_curves(arms: list[dict], colors: dict, path: Path) -> bool:
    curved = [a for a in arms if a.get("curve")]
    metrics = list(dict.fromkeys(a.get("curve_metric", "metric") for a in curved))
    if not metrics:
        return False
    ncols = min(len(metrics), 3)
    nrows = -(-len(metrics) // ncols)
    fig = _figure(5.2 * ncols, 3.9 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    # One panel per metric: a PPO reward and a DPO margin are different units and must not share an axis.
    for ax, m in zip(axes, metrics):
        for a in curved:
            if a.get("curve_metric", "metric") != m:
                continue
            pts = [(p["step"], p["metric"]) for p in a["curve"] if _is_num(p.get("step")) and _is_num(p.get("metric"))]
            ax.plot([s for s, _ in pts], [v for _, v in pts], marker="." if len(pts) <= 40 else None,
                    color=colors.get(a["name"], "0.5"), label=a["label"])
        ax.set_xlabel("training step")
        ax.set_ylabel(m)
        ax.set_title(CURVE_METRICS.get(m, m), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    fig.suptitle("Training curves, one line per arm")
    fig.savefig(path)
    return True


def _plot_gold_vs_wall(arms: list[dict], colors: dict, gold_axis: str, path: Path) -> bool:
    pts = [(a, _wall(a, "total"), *_stat(a, "gold_mean")) for a in _trained(arms)]
    pts = [p for p in pts if _is_num(p[1]) and p[2] is not None]
    if not pts:
        return False
    fig = _figure(7.5, 5.2)
    ax = fig.add_subplot()
    for a, wall, gold, std in pts:
        ax.errorbar(wall, gold, yerr=std, fmt="o", ms=8, capsize=3, color=colors.get(a["name"], "0.5"),
                    label=a["label"], zorder=3)
        ax.annotate(a["label"], (wall, gold), textcoords="offset points", xytext=(7, 6), fontsize=9)
    start = next((a for a in arms if a["name"] == "start"), None)
    start_gold = _stat(start, "gold_mean")[0] if start is not None else None
    if start_gold is not None:
        ax.axhline(start_gold, ls="--", color=colors["start"], lw=1, label=f"{start['label']} (no training)")
    ax.set_xlim(left=0, right=max(p[1] for p in pts) * 1.15 or 1)
    ax.set_xlabel("total wall time, s (pairs + reward model + policy)")
    ax.set_ylabel(gold_axis)
    ax.set_title("Gold reward vs wall-clock cost")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path)
    return True


def draw_plots(summary: dict, out_dir: Path) -> dict[str, Path]:
    """Write the PNG plots that have data; returns ``{name: path}``."""
    arms, sweep = summary["arms"], summary.get("sweep") or []
    colors = _colors(arms)
    gold_axis = f"gold score, mean ({(summary.get('settings') or {}).get('judge', 'gold judge')})"
    jobs = {"gold_vs_kl": lambda p: _plot_gold_vs_kl(arms, sweep, colors, gold_axis, p),
            "training_curves": lambda p: _plot_curves(arms, colors, p),
            "gold_vs_wall_time": lambda p: _plot_gold_vs_wall(arms, colors, gold_axis, p)}
    return {name: out_dir / f"{name}.png" for name, draw in jobs.items() if draw(out_dir / f"{name}.png")}


# ---------------------------------------------------------------------------------------------- entry point


def _check(summary: dict) -> None:
    """Stop on a summary the renderer cannot use, naming the key."""
    arms = summary.get("arms")
    if not isinstance(arms, list) or not arms:
        raise ValueError("summary['arms'] must be a non-empty list of arms")
    for i, a in enumerate(arms):
        if not isinstance(a, dict) or "name" not in a or not isinstance(a.get("eval"), dict):
            raise ValueError(f"summary['arms'][{i}] needs a 'name' and an 'eval' dict")
    names = [a["name"] for a in arms]
    if len(set(names)) != len(names):
        raise ValueError(f"arm names must be unique, got {names}")


def write_report(summary: dict, out_dir: Path) -> dict[str, Path]:
    """Write the report files into ``out_dir`` (created if needed); returns ``{kind: path}``.

    Keys: ``markdown``, ``html``, ``summary`` and one per plot written (``gold_vs_kl``,
    ``training_curves``, ``gold_vs_wall_time``). ``summary`` is not modified.
    """
    _check(summary)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    view = {**summary, "arms": [{**a, "label": a.get("label") or a["name"]} for a in summary["arms"]]}
    files: dict[str, Path] = dict(draw_plots(view, out_dir))
    blocks = _blocks(view, files)
    title = view.get("title") or "PPO-RLHF vs DPO"
    files["markdown"] = out_dir / "report.md"
    atomic_write_text(files["markdown"], render_markdown(blocks))
    files["html"] = out_dir / "report.html"
    atomic_write_text(files["html"], render_html(blocks, title))
    files["summary"] = out_dir / "summary.json"
    write_json(files["summary"], {**summary, "files": sorted(p.name for p in files.values())})
    return files
