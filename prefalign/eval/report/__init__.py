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
      "name":  str,                  # "start" or an arm of `prefalign.compare.arms.ARMS` (other names
                                     # render with no method description)
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
      "wall_seconds": {"pairs": s, "reward_model": s, "policy": s, "total": s, "evaluation": s},
                                     # wall clock [s]; pairs: making the preference pairs; total: the sum of
                                     # the three; evaluation: held-out evaluations while training, taken out
                                     # of reward_model and policy (measurement, charged to no arm)
      "peak_rss_mb":         float,  # largest peak resident memory of the arm's stages [MiB]
      "peak_gpu_mb":         float | None,  # on CUDA: the largest torch.cuda.max_memory_allocated of its
                                     # trainers [MiB] (what row 4 compares there); None on CPU
      "tokens_generated":    int,    # tokens sampled to train the arm: pair making + PPO rollouts
      "gradient_steps":      int,    # optimizer steps of every model the arm trained (RM + policy)
      "pairs_used":          int,    # preference pairs the arm trained on (0: none)
      "rm_heldout_accuracy": float | None,  # reward model's accuracy on held-out pairs [0..1]
    }
    point  = {"arm": str, "param": str ("beta", "kl_coef"...), "value": float,
              "gold_mean": float [judge unit], "kl_mean": float [nats]}
    sample = {"prompt": str, "completions": {arm name: str}, "gold": {arm name: float}}

Modules: `values` (numbers read out of an arm: mean and spread, "—" for missing), `tables` (numbers ->
rows; what an arm is comes from the arm table, `prefalign.compare.arms`), `markup` (markdown and HTML),
`plots` (matplotlib, imported only when drawing), `document` (the sections in order); `write_report` here.

Files written into ``out_dir``: ``report.md``, ``report.html`` (plots embedded as base64 PNG),
``gold_vs_kl.png``, ``training_curves.png`` (only when some arm has a curve), ``gold_vs_wall_time.png``
(only when some trained arm has a cost), and ``summary.json`` (the summary plus ``"files"``).
"""

from __future__ import annotations

from pathlib import Path

from prefalign.eval.report.document import DEFAULT_TITLE, blocks
from prefalign.eval.report.markup import render_html, render_markdown
from prefalign.eval.report.plots import draw_plots
from prefalign.runio import atomic_write_text, write_json

__all__ = ["write_report"]


def _check(summary: dict) -> None:
    """Stop on a summary the renderer cannot use, naming the key."""
    arms = summary.get("arms")
    if not isinstance(arms, list) or not arms:
        raise ValueError("summary['arms'] must be a non-empty list of arms")
    for index, arm in enumerate(arms):
        if not isinstance(arm, dict) or "name" not in arm or not isinstance(arm.get("eval"), dict):
            raise ValueError(f"summary['arms'][{index}] needs a 'name' and an 'eval' dict")
    names = [arm["name"] for arm in arms]
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
    view = {**summary, "arms": [{**arm, "label": arm.get("label") or arm["name"]} for arm in summary["arms"]]}
    files: dict[str, Path] = dict(draw_plots(view, out_dir))
    document = blocks(view, files)
    files["markdown"] = out_dir / "report.md"
    atomic_write_text(files["markdown"], render_markdown(document))
    files["html"] = out_dir / "report.html"
    atomic_write_text(files["html"], render_html(document, view.get("title") or DEFAULT_TITLE))
    files["summary"] = out_dir / "summary.json"
    write_json(files["summary"], {**summary, "files": sorted(path.name for path in files.values())})
    return files
