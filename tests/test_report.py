"""The comparison report renderer: tables, escaping, plots, self-contained HTML, optional pieces."""

import copy
import json
import re
import subprocess
import sys

import pytest

from prefalign.eval.report import write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROW_LABELS = ["Reward model", "Policy update", "Loss", "Compute cost", "Sample efficiency", "Result"]


def _eval(gold, kl, win, proxy=None, n=200):
    return {
        "gold_mean": gold,
        "gold_std": 0.4,
        "proxy_mean": proxy,
        "kl_mean": kl,
        "kl_std": kl / 3 + 0.1,
        "win_rate": win,
        "length_mean": 21.5,
        "eos_rate": 0.3,
        "n": n,
    }


def _cost(pairs_s, rm_s, policy_s, pairs_used, rm_acc=None, tokens=40_000):
    return {
        "wall_seconds": {
            "pairs": pairs_s,
            "reward_model": rm_s,
            "policy": policy_s,
            "total": pairs_s + rm_s + policy_s,
            "evaluation": 7.0 if rm_s else 3.0,
        },
        "peak_rss_mb": 2100.0,
        "tokens_generated": tokens,
        "gradient_steps": 80,
        "pairs_used": pairs_used,
        "rm_heldout_accuracy": rm_acc,
    }


def _arm(name, label, gold, kl, win, cost, metric=None, proxy=None, seeds=(0.0, 0.02, -0.02)):
    arm = {
        "name": name,
        "label": label,
        "eval": _eval(gold, kl, win, proxy),
        "seeds": [_eval(gold + d, kl + 3 * d, win + d, proxy) for d in seeds],
    }
    if cost is not None:
        arm["cost"] = cost
    if metric:
        arm["curve_metric"] = metric
        arm["curve"] = [{"step": s, "wall_seconds": 2.0 * s, "metric": gold * s / 10} for s in range(1, 11)]
    return arm


def full_summary():
    return {
        "title": "PPO-RLHF vs DPO",
        "created": "2025-01-01T12:00:00+00:00",
        "settings": {
            "model": "smollm2-135m",
            "judge": "vader",
            "prompts": "packaged movie prefixes",
            "preset": "default",
            "seeds": 3,
            "arms": ["ppo", "dpo", "dpo_rf", "ppo_gt"],
        },
        "arms": [
            _arm("start", "Starting policy", 0.05, 0.0, 0.5, None, seeds=(0.0, 0.01, -0.01)),
            _arm(
                "ppo",
                "PPO-RLHF",
                0.42,
                4.1,
                0.71,
                _cost(60, 90, 400, 288, rm_acc=0.81, tokens=52_000),
                "objective/scores",
                proxy=1.3,
            ),
            _arm("dpo", "DPO", 0.35, 2.2, 0.66, _cost(60, 0, 120, 288), "rewards/margins"),
            _arm("dpo_rf", "DPO (reference-free)", 0.31, 6.0, 0.62, _cost(60, 0, 110, 288), "rewards/margins"),
            _arm(
                "ppo_gt",
                "PPO on the gold judge",
                0.61,
                5.5,
                0.8,
                _cost(0, 0, 380, 0, tokens=30_000),
                "objective/scores",
            ),
        ],
        "sweep": [
            {"arm": "dpo", "param": "beta", "value": v, "gold_mean": g, "kl_mean": k}
            for v, g, k in ((0.05, 0.45, 5.0), (0.1, 0.35, 2.2), (0.5, 0.15, 0.6))
        ]
        + [
            {"arm": "ppo", "param": "kl_coef", "value": v, "gold_mean": g, "kl_mean": k}
            for v, g, k in ((0.01, 0.55, 9.0), (0.05, 0.42, 4.1), (0.2, 0.2, 1.0))
        ],
        "samples": [
            {
                "prompt": "The second half of this thriller",
                "completions": {
                    "start": " is | a mess | of ideas",
                    "ppo": " is a <b>joy</b> & a delight",
                    "dpo": " keeps you *guessing*\nuntil the end",
                    "dpo_rf": "",
                    "ppo_gt": " is wonderful",
                },
                "gold": {"start": -0.36, "ppo": 0.85, "dpo": 0.0, "dpo_rf": 0.0, "ppo_gt": 0.57},
            },
            {
                "prompt": "I walked out of the theater feeling",
                "completions": {
                    "start": " tired",
                    "ppo": " happy " + "and grateful " * 40,
                    "dpo": " good",
                    "dpo_rf": " fine",
                    "ppo_gt": " great",
                },
                "gold": {"start": -0.44, "ppo": 0.9, "dpo": 0.44, "dpo_rf": 0.2, "ppo_gt": 0.62},
            },
        ],
    }


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    summary = full_summary()
    files = write_report(summary, out)
    return summary, files, out


def _md_table_rows(md: str, heading: str) -> list[str]:
    """The table lines that follow ``## heading``."""
    section = md.split(f"\n## {heading}\n", 1)[1]
    table = next(block for block in section.split("\n\n") if block.strip().startswith("|"))
    return table.strip().splitlines()


def test_every_arm_and_row_label_in_both_reports(full_report):
    summary, files, _ = full_report
    md, page = files["markdown"].read_text(), files["html"].read_text()
    for text in (md, page):
        for arm in summary["arms"]:
            assert arm["label"] in text
        for label in ROW_LABELS:
            assert label in text
        assert "How to read this report" in text
    assert "held-out pair accuracy 0.810" in md  # the PPO reward model's measured accuracy
    assert "+ 7 s of evaluation while training, not charged" in md  # reported apart from the charged wall time
    # the comparison table has one column per arm and the six rows, in order
    rows = _md_table_rows(md, "PPO-RLHF vs DPO")
    assert rows[0].count(" | ") == len(summary["arms"])
    assert [re.match(r"\| \*\*(.+?)\*\*", r).group(1) for r in rows[2:]] == ROW_LABELS


def test_plots_are_valid_pngs(full_report):
    _, files, out = full_report
    for name in ("gold_vs_kl", "training_curves", "gold_vs_wall_time"):
        data = (out / f"{name}.png").read_bytes()
        assert files[name] == out / f"{name}.png"
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000


def test_html_is_self_contained(full_report):
    _, files, _ = full_report
    page = files["html"].read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert page.count('src="data:image/png;base64,') == 3
    assert "<link" not in page and "<script" not in page


def test_sample_text_is_escaped_and_kept_whole(full_report):
    summary, files, _ = full_report
    md, page = files["markdown"].read_text(), files["html"].read_text()
    assert r" is \| a mess \| of ideas" in md  # a raw pipe would split the markdown cell
    rows = _md_table_rows(md, "Sample completions (held-out prompts)")
    assert all(len(re.findall(r"(?<!\\)\|", r)) == len(summary["arms"]) + 2 for r in rows)
    assert "&lt;b&gt;joy&lt;/b&gt; &amp; a delight" in page and "<b>joy</b>" not in page
    assert r"\<b\>joy\</b\>" in md and r"\*guessing\*<br>until" in md
    long = summary["samples"][1]["completions"]["ppo"]
    assert long.strip() in md and long.strip() in page  # never cut


def test_seeds_render_mean_and_spread(full_report):
    _, files, _ = full_report
    md = files["markdown"].read_text()
    rows = _md_table_rows(md, "Results per arm (held-out prompts)")
    assert "±" in rows[3] and "means over 3 seeds" in md  # the PPO row


def test_summary_json_is_the_summary_plus_files(full_report):
    summary, files, out = full_report
    saved = json.loads(files["summary"].read_text())
    listed = saved.pop("files")
    assert saved == summary
    assert listed == sorted(p.name for p in files.values())
    assert {"report.md", "report.html", "summary.json", "gold_vs_kl.png"} <= set(listed)
    assert all((out / name).is_file() for name in listed)


def test_minimal_summary(tmp_path):
    """start + one arm, one seed, no sweep, samples, curves, proxy or costs."""
    summary = {
        "title": "tiny",
        "arms": [{"name": "start", "eval": _eval(0.0, 0.0, 0.5)}, {"name": "dpo", "eval": _eval(0.2, 1.0, 0.6)}],
    }
    before = copy.deepcopy(summary)
    files = write_report(summary, tmp_path / "r")
    assert summary == before  # the renderer never writes into its input
    assert set(files) == {"markdown", "html", "summary", "gold_vs_kl"}
    md = files["markdown"].read_text()
    assert "±" not in md and "proxy mean" not in md and "No training curves" in md
    for label in ROW_LABELS:
        assert label in md
    assert "Sample completions" not in md and "sweep" not in md
    assert (tmp_path / "r" / "gold_vs_kl.png").read_bytes().startswith(PNG_SIGNATURE)


def test_unusable_summary_names_the_problem(tmp_path):
    with pytest.raises(ValueError, match="non-empty list"):
        write_report({"arms": []}, tmp_path)
    with pytest.raises(ValueError, match="unique"):
        write_report({"arms": [{"name": "dpo", "eval": {}}, {"name": "dpo", "eval": {}}]}, tmp_path)


def test_import_does_not_load_matplotlib():
    """Matplotlib (and its backend choice) is the renderer's business, not a side effect of importing prefalign."""
    code = "import sys, prefalign.eval.report; print('matplotlib' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr[-2000:]


def test_training_curves_say_they_are_one_run_not_the_seeds_mean(full_report):
    """Every table above the curves is a mean over the seeds; an arm's curve is one training run (compare draws
    its first seed's), which the note must say."""
    _, files, _ = full_report
    md = files["markdown"].read_text()
    section = md.split("\n## Training curves\n", 1)[1]
    assert "Each line is one training run of its arm, not a mean over the 3 seeds. " in section
