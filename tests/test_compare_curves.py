"""The over-optimisation curves the race reads out of its online runs (`prefalign/compare/curves.py`), on
hand-written metrics files: the steps every seed evaluated, seed means, and the proxy's gain over each seed's own
step 0 (every seed's reward model has its own offset)."""

import json

import pytest
from scipy import stats

from prefalign.compare import CompareConfig
from prefalign.compare.curves import heldout_points, overoptimisation


def _row(step, gold, proxy, kl, **extra):
    return {"step": step, "heldout/gold": gold, "heldout/proxy": proxy, "heldout/kl": kl, **extra}


def _write(out, seed, arm, rows):
    run = out / f"seed-{seed}" / arm
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_heldout_points_keep_only_rows_with_every_heldout_metric():
    rows = [_row(0, 0.1, 2.0, 0.0), {"step": 1, "loss": 0.5}, {"step": 2, "heldout/gold": 0.3}, _row(4, 0.2, 3.0, 1.5)]
    assert heldout_points(rows) == {
        0: {"gold": 0.1, "proxy": 2.0, "kl": 0.0},
        4: {"gold": 0.2, "proxy": 3.0, "kl": 1.5},
    }


def test_overoptimisation_takes_the_common_steps_and_the_proxy_gain_per_seed(tmp_path):
    # seed 0's reward model scores 10 higher than seed 1's throughout: the raw proxy's seed interval is wide, the
    # gain's is not
    _write(tmp_path, 0, "ppo", [_row(0, 0.2, 12.0, 0.0), _row(2, 0.4, 13.0, 1.0), _row(4, 0.3, 15.0, 3.0)])
    _write(tmp_path, 1, "ppo", [_row(0, 0.0, 2.0, 0.0), _row(2, 0.2, 3.0, 2.0), _row(3, 0.9, 9.0, 9.0)])
    cfg = CompareConfig(arms=["ppo", "dpo"], seeds=2).resolved()  # dpo is offline: no curve

    [curve] = overoptimisation(cfg, tmp_path, [0, 1])

    assert curve["arm"] == "ppo"
    assert [point["step"] for point in curve["points"]] == [0, 2]  # step 4 and 3: one seed each
    first, last = curve["points"]
    assert first["proxy_gain"] == {"mean": 0.0, "low": 0.0, "high": 0.0}
    assert last["proxy_gain"] == {"mean": 1.0, "low": 1.0, "high": 1.0}  # both seeds gained exactly 1
    assert last["proxy"]["mean"] == pytest.approx(8.0)
    half = stats.t.ppf(0.975, df=1) * 5 * 2**0.5 / 2**0.5  # sd of (13, 3) = 5 * sqrt(2); over sqrt(2 seeds)
    assert last["proxy"]["high"] - last["proxy"]["mean"] == pytest.approx(half)
    assert last["gold"]["mean"] == pytest.approx(0.3) and last["kl"]["mean"] == pytest.approx(1.5)


def test_a_non_finite_heldout_point_is_left_out_not_fatal(tmp_path):
    # MetricsLogger writes a non-finite value as the string "nan" (JSON has no NaN): seed 1's step-2 proxy. The
    # summary is read after the whole race has trained; one bad point must not stop it writing the report.
    assert heldout_points([_row(0, 0.1, 2.0, 0.0), _row(2, 0.3, "nan", 1.0), _row(4, 0.2, "inf", 1.5)]) == {
        0: {"gold": 0.1, "proxy": 2.0, "kl": 0.0}
    }
    _write(tmp_path, 0, "ppo", [_row(0, 0.2, 12.0, 0.0), _row(2, 0.4, 13.0, 1.0), _row(4, 0.6, 14.0, 2.0)])
    _write(tmp_path, 1, "ppo", [_row(0, 0.0, 2.0, 0.0), _row(2, 0.2, "nan", 2.0), _row(4, 0.4, 5.0, 4.0)])
    cfg = CompareConfig(arms=["ppo", "dpo"], seeds=2).resolved()

    [curve] = overoptimisation(cfg, tmp_path, [0, 1])

    assert [point["step"] for point in curve["points"]] == [0, 4]  # step 2: seed 1's point is not a number
    last = curve["points"][-1]
    assert last["proxy_gain"]["mean"] == pytest.approx(2.5)  # (14 - 12 + 5 - 2) / 2
    assert last["gold"]["mean"] == pytest.approx(0.5) and last["kl"]["mean"] == pytest.approx(3.0)


def test_read_jsonl_reads_text_with_unicode_line_breaks_back(tmp_path):
    """write_jsonl keeps U+2028, U+2029 and U+0085 raw in a string (ensure_ascii off), and str.splitlines breaks a
    line at each: a held-out prompt holding one stopped compare's summary with a JSONDecodeError. JSON lines end at
    "\\n" alone."""
    from prefalign.compare.curves import read_jsonl
    from prefalign.compare.evidence import heldout_pairs
    from prefalign.runio import write_jsonl

    prompts = ["a\u2028b", "c\u2029d", "e\x85f", "plain"]
    runs = []
    for name in ("rm", "dpo"):
        (tmp_path / name).mkdir()
        rows = [{"pair": i, "prompt": p, "margin": 1.0, "correct": True} for i, p in enumerate(prompts)]
        write_jsonl(tmp_path / name / "eval_pairs.jsonl", rows)
        runs.append(tmp_path / name)
    assert [row["prompt"] for row in read_jsonl(runs[0] / "eval_pairs.jsonl")] == prompts
    assert heldout_pairs(runs[:1], runs[1:]).prompts == tuple(prompts)
