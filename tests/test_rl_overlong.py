"""`prefalign rl --overlong-buffer`: DAPO's soft overlong punishment in the scores (Yu et al. 2025, section 3.4).

The tiny random model rarely samples EOS, so these runs end completions at the stop string "n": with
--max-new-tokens 6 their lengths spread over 1..6 tokens, inside and outside the buffer.
"""

import pytest
import torch
from conftest import read_metrics
from test_loop import _documented
from test_trainer_rl import ConstantReward, _cfg, prompts  # noqa: F401  (a fixture)

from prefalign.errors import UserError
from prefalign.trainers.rl import RLConfig, RLTrainer


def _naive_penalties(lengths: list[int], max_len: int, buffer: int, factor: float = 1.0) -> list[float]:
    """The paper's penalty, completion by completion (no completion is longer than max_len)."""
    start = max_len - buffer
    return [0.0 if n <= start else (start - n) / buffer * factor for n in lengths]


def _rollout(tmp_path, model_dir, prompts, reward, **kw):  # noqa: F811
    """Iteration 1's rollout of prompts 0-3 (K = 4) by the untrained policy, completions cut at "n"."""
    cfg = _cfg(tmp_path, model_dir, prompts, stop=["n"], **kw)
    trainer = RLTrainer(cfg, reward_source=reward)
    trainer.prepare()
    return trainer.rollout([0, 1, 2, 3], step=1, timing={})


# -- config ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(overlong_buffer=0), r"^--overlong-buffer must be >= 1, got 0$"),
        (dict(overlong_buffer=-3), r"^--overlong-buffer must be >= 1, got -3$"),
        (
            dict(overlong_buffer=48),  # the default --max-new-tokens
            r"^--overlong-buffer must be < --max-new-tokens \(48\), got 48: .* every completion would pay it$",
        ),
        (dict(overlong_buffer=10, max_new_tokens=8), r"^--overlong-buffer must be < --max-new-tokens \(8\), got 10"),
        (dict(overlong_buffer=4, overlong_penalty_factor=0.0), r"^--overlong-penalty-factor must be > 0, got 0.0$"),
        (dict(overlong_buffer=4, overlong_penalty_factor=-1.0), r"^--overlong-penalty-factor must be > 0, got -1.0$"),
        (
            dict(overlong_penalty_factor=0.5),
            r"^--overlong-penalty-factor 0.5 needs --overlong-buffer \(the tokens the penalty grows over\)$",
        ),
        (
            dict(overlong_buffer=4, overlong_penalty_factor=float("inf")),
            r"^--overlong-penalty-factor must be a finite number, got inf$",
        ),
    ],
)
def test_config_refuses_bad_overlong_options(prompts, kw, match):  # noqa: F811
    with pytest.raises(ValueError, match=match):
        RLConfig(prompts=str(prompts), reward=["vader"], **kw)


def test_config_takes_the_overlong_options(prompts):  # noqa: F811
    base = dict(prompts=str(prompts), reward=["vader"])
    assert RLConfig(**base).overlong_buffer is None  # off by default
    cfg = RLConfig(**base, overlong_buffer=47)  # the widest buffer: a 1-token completion goes free
    assert (cfg.overlong_buffer, cfg.overlong_penalty_factor, cfg.overlong_factor) == (47, None, 1.0)
    assert RLConfig(**base, overlong_buffer=1, overlong_penalty_factor=0.5).overlong_factor == 0.5


def test_cli_flags_parse_and_a_factor_without_a_buffer_is_one_line(prompts):  # noqa: F811
    from prefalign.cli._args import parse

    args = ["--prompts", str(prompts), "--reward", "vader", "--output", "x"]
    cfg = parse(RLConfig, [*args, "--overlong-buffer", "8", "--overlong-penalty-factor", "0.5"], prog="prefalign rl")
    assert (cfg.overlong_buffer, cfg.overlong_factor) == (8, 0.5)
    with pytest.raises(UserError, match=r"^--overlong-penalty-factor 0.5 needs --overlong-buffer \(the tokens"):
        parse(RLConfig, [*args, "--overlong-penalty-factor", "0.5"], prog="prefalign rl")


# -- the scores -----------------------------------------------------------------------------------------------------


def test_the_penalty_is_added_to_each_completions_score(tmp_path, tiny_model_dir, prompts):  # noqa: F811
    """The same completions (keyed sampling, the same untrained policy) with and without the flag: the scores
    differ by the paper's penalty of each completion's length, the EOS or stopping token counted."""
    off = _rollout(tmp_path / "off", tiny_model_dir, prompts, ConstantReward())
    on = _rollout(
        tmp_path / "on", tiny_model_dir, prompts, ConstantReward(), overlong_buffer=4, overlong_penalty_factor=0.5
    )
    assert on.completions == off.completions
    lengths = on.response_mask.sum(1).tolist()
    want = _naive_penalties(lengths, max_len=6, buffer=4, factor=0.5)
    assert 0.0 in want and len(set(want)) >= 3  # free, partly and (at 6 tokens) wholly penalised completions
    torch.testing.assert_close(on.scores - off.scores, torch.tensor(want), rtol=0.0, atol=1e-6)


def test_dynamic_sampling_judges_groups_before_the_penalty(tmp_path, tiny_model_dir, prompts):  # noqa: F811
    """A constant reward gives every group equal rewards, so --dynamic-sampling drops them all, with the penalty as
    without it, even where a group's completions' penalties differ: a group is judged by its rewards (the paper
    filters on correctness, verl's recipe on acc), and the penalty enters the kept groups' advantages after."""
    on = _rollout(tmp_path / "on", tiny_model_dir, prompts, ConstantReward(), dynamic_sampling=True, overlong_buffer=2)
    penalties = _naive_penalties(on.response_mask.sum(1).tolist(), max_len=6, buffer=2)
    assert any(len(set(penalties[g * 4 : (g + 1) * 4])) > 1 for g in range(4))  # lengths alone would vary a group
    assert not on.kept.any() and not on.loss_mask.any()
    torch.testing.assert_close(on.scores, 1.0 + torch.tensor(penalties), rtol=0.0, atol=1e-6)  # still in the scores


# -- a run ----------------------------------------------------------------------------------------------------------


class RecordingTrainer(RLTrainer):
    """Keeps every rollout, to check the logged metrics against the completions they came from."""

    def rollout(self, idx, step, timing):
        out = super().rollout(idx, step, timing)
        self.seen = [*getattr(self, "seen", []), out]
        return out


def test_a_run_logs_the_penalty_it_put_in_the_scores(tmp_path, tiny_model_dir, prompts):  # noqa: F811
    cfg = _cfg(tmp_path, tiny_model_dir, prompts, stop=["n"], overlong_buffer=4, overlong_penalty_factor=2.0)
    trainer = RecordingTrainer(cfg, reward_source=ConstantReward())
    trainer.train()
    rows = read_metrics(tmp_path / "run")
    assert len(rows) == len(trainer.seen) == 2
    for row, rollout in zip(rows, trainer.seen):
        penalties = _naive_penalties(rollout.response_mask.sum(1).tolist(), max_len=6, buffer=4, factor=2.0)
        mean = sum(penalties) / len(penalties)
        assert mean < 0
        assert row["objective/overlong_penalty"] == pytest.approx(mean, abs=1e-6)
        assert row["rl/overlong_fraction"] == pytest.approx(sum(p < 0 for p in penalties) / len(penalties))
        assert row["objective/scores"] == pytest.approx(1.0 + mean, abs=1e-6)  # the constant 1 less the penalty
    keys, _ = _documented("`prefalign rl`")
    assert {"objective/overlong_penalty", "rl/overlong_fraction"} <= keys  # docs/metrics.md defines them


def test_without_the_flag_no_overlong_metric(tmp_path, tiny_model_dir, prompts):  # noqa: F811
    RLTrainer(_cfg(tmp_path, tiny_model_dir, prompts, max_steps=1), reward_source=ConstantReward()).train()
    row = read_metrics(tmp_path / "run")[0]
    assert "objective/overlong_penalty" not in row and "rl/overlong_fraction" not in row
    assert row["objective/scores"] == 1.0


# -- overlong filtering ---------------------------------------------------------------------------------------------


def test_overlong_filter_takes_truncated_completions_out_of_the_loss_only(tmp_path, tiny_model_dir, prompts):  # noqa: F811
    """The rows cut at --max-new-tokens (not ended) have no token in the loss, the others all theirs; the group
    baselines still hold them, so grpo's advantages are those of the same rollout unfiltered."""
    from test_trainer_rl import HalfConstantReward

    off = _rollout(tmp_path / "off", tiny_model_dir, prompts, HalfConstantReward())
    on = _rollout(tmp_path / "on", tiny_model_dir, prompts, HalfConstantReward(), overlong_filter=True)
    ended = on.ended.tolist()
    assert True in ended and False in ended
    assert all(n == 6 for n, e in zip(on.response_mask.sum(1).tolist(), ended) if not e)  # truncated: full length
    assert (on.loss_mask.sum(1) > 0).tolist() == ended
    torch.testing.assert_close(on.loss_mask[on.ended], on.response_mask[on.ended])
    torch.testing.assert_close(off.loss_mask, off.response_mask)
    torch.testing.assert_close(on.advantages, off.advantages)


def test_reinforce_pp_whitens_over_the_completions_the_filter_keeps(tmp_path, tiny_model_dir, prompts):  # noqa: F811
    from test_trainer_rl import HalfConstantReward

    from prefalign.losses.stats import masked_mean, masked_var

    r = _rollout(
        tmp_path, tiny_model_dir, prompts, HalfConstantReward(), estimator="reinforce_pp", overlong_filter=True
    )
    mask = r.loss_mask.bool()
    assert mask.sum() < r.response_mask.sum()  # some completions were filtered
    assert masked_mean(r.advantages, mask).item() == pytest.approx(0.0, abs=1e-5)
    assert masked_var(r.advantages, mask).item() == pytest.approx(1.0, rel=1e-5)


def test_a_run_logs_the_share_it_filtered(tmp_path, tiny_model_dir, prompts):  # noqa: F811
    cfg = _cfg(tmp_path, tiny_model_dir, prompts, stop=["n"], overlong_filter=True)
    RLTrainer(cfg, reward_source=ConstantReward()).train()
    rows = read_metrics(tmp_path / "run")
    for row in rows:
        assert row["rl/overlong_filtered"] == pytest.approx(1 - row["val/num_eos"] / 16)  # 4 prompts x K = 4
    assert any(0 < row["rl/overlong_filtered"] < 1 for row in rows)
    keys, _ = _documented("`prefalign rl`")
    assert not {k for k in rows[0] if not k.startswith("objective/scores/")} - keys  # docs/metrics.md has them
