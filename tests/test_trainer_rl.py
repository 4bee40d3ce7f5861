"""`prefalign rl` (trainers/rl.py): critic-free estimators on a tiny model."""

import json
import math
import shutil

import pytest
import torch
from conftest import TOY_REWARD, read_metrics, run_cli
from test_loop import _documented, assert_run_json_documented
from test_trainer_ppo import LowIdReward, peaked_model_dir  # noqa: F401  (a fixture)

from prefalign.errors import UserError
from prefalign.trainers.rl import RLConfig, RLTrainer


@pytest.fixture()
def prompts(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("".join(f"review {i}: the movie was\n" for i in range(32)))
    return p


def _cfg(tmp_path, model_dir, prompts, **kw):
    base = dict(
        prompts=str(prompts),
        reward=["low-id"],
        model=str(model_dir),
        output=str(tmp_path / "run"),
        max_steps=2,
        rollout_batch_size=4,
        num_generations=4,
        num_minibatches=2,
        ppo_epochs=2,
        max_new_tokens=6,
        learning_rate=1e-3,
        precision="fp32",
        lr_scheduler="constant",
        temperature=1.0,
        seed=0,
    )
    return RLConfig(**{**base, **kw})


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo", "reinforce_pp"])
def test_toy_reward_rises(tmp_path, peaked_model_dir, prompts, tokenizer, estimator):  # noqa: F811
    # PPO's toy-reward setting (tests/test_trainer_ppo.py) with 4 prompts x K = 4 completions per iteration
    lr = 3e-1 if estimator == "dr_grpo" else 3e-2  # its loss is divided by max-new-tokens per row: ~8x smaller
    trainer = RLTrainer(
        _cfg(
            tmp_path,
            peaked_model_dir,
            prompts,
            estimator=estimator,
            max_steps=16,
            learning_rate=lr,
            kl_coef=0.0,
            num_minibatches=1,
            ppo_epochs=4,
            max_new_tokens=8,
        ),
        reward_source=LowIdReward(tokenizer),
    )
    trainer.train()
    scores = [r["objective/scores"] for r in read_metrics(tmp_path / "run")]
    first, last = sum(scores[:3]) / 3, sum(scores[-3:]) / 3
    assert last > first + 0.15, scores


def test_one_iteration_changes_every_parameter_and_logs_every_metric(tmp_path, tiny_model_dir, prompts, tokenizer):
    from transformers import AutoModelForCausalLM

    before = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())
    trainer = RLTrainer(
        _cfg(
            tmp_path, tiny_model_dir, prompts, max_steps=1, kl_in_loss=True, clip_eps_high=0.28, dynamic_sampling=True
        ),
        reward_source=LowIdReward(tokenizer),
    )
    trainer.train()
    assert trainer.value is None and len(trainer.trained) == 1  # no critic loaded
    for name, p in trainer.accelerator.unwrap_model(trainer.policy).named_parameters():
        assert not torch.equal(p.detach(), before[name]), f"{name} did not change"
    first = trainer.minibatch_stats[0]
    assert first["val/ratio"] == pytest.approx(1.0, abs=1e-6) and first["policy/clipfrac"] == 0.0
    assert first["loss/kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before the first step
    row = read_metrics(tmp_path / "run")[0]
    for key in (
        "objective/scores",
        "objective/scores/low-id",
        "objective/kl",
        "loss/policy",
        "loss/kl",
        "policy/clipfrac_low",
        "policy/clipfrac_high",
        "policy/grad_norm",
        "rl/group_score_std",
        "rl/groups_dropped",
        "rl/advantage_abs",
        "episodes",
        "tokens_per_second",
    ):
        assert key in row and math.isfinite(row[key]), key
    assert row["episodes"] == 16
    keys, _ = _documented("`prefalign rl`")  # docs/metrics.md names every logged key
    assert not {k for k in row if not k.startswith("objective/scores/")} - keys
    assert_run_json_documented(tmp_path / "run", "rl")
    assert not (tmp_path / "run" / "value").exists()
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["loss_aggregation"] == "seq_mean_token_mean"
    assert info["activations"] == {"policy": "lean (5 RMSNorm, 2 SwiGLU MLP, 2 attention layers)"}  # no value model


def test_a_group_does_not_depend_on_the_batch_layout(tmp_path, tiny_model_dir, prompts, tokenizer):
    trainer = RLTrainer(_cfg(tmp_path, tiny_model_dir, prompts), reward_source=LowIdReward(tokenizer))
    trainer.prepare()
    both = trainer.rollout([3, 5], step=7, timing={})
    alone = trainer.rollout([5], step=7, timing={})
    assert both.completions[4:] == alone.completions  # prompt 5's K completions, whoever shares the batch
    assert len(set(alone.completions)) > 1  # K different draws of one prompt
    torch.testing.assert_close(both.scores[4:], alone.scores)
    torch.testing.assert_close(both.advantages[4:, 0], alone.advantages[:, 0])  # a group's baseline is its own


def test_resume_is_exact(tmp_path, tiny_model_dir, prompts, tokenizer):
    kw = dict(max_steps=4, save_steps=2, adaptive_kl=True, estimator="rloo", kl_in_loss=True)

    def run(out, **more):
        t = RLTrainer(
            _cfg(tmp_path, tiny_model_dir, prompts, output=str(tmp_path / out), **kw, **more),
            reward_source=LowIdReward(tokenizer),
        )
        t.train()
        return t

    full = run("full")
    run("cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-0000004")
    resumed = run("cut", resume="latest")
    assert json.loads((tmp_path / "cut" / "run.json").read_text())["resumed_from_step"] == 2
    want = dict(full.policy.named_parameters())
    for name, p in resumed.policy.named_parameters():
        assert torch.equal(p, want[name]), f"{name} differs after resume"
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    assert [r["loss/policy"] for r in a] == [r["loss/policy"] for r in b]
    assert [r["kl_coef"] for r in a] == [r["kl_coef"] for r in b]
    # another K keys other completions: refused before any step, nothing written
    metrics = (tmp_path / "cut" / "metrics.jsonl").read_text()
    with pytest.raises(UserError, match=r"step-0000004: written with --num-generations 4, now 2; resume with the same"):
        run("cut", resume="latest", num_generations=2)
    assert (tmp_path / "cut" / "metrics.jsonl").read_text() == metrics


def test_several_rewards_are_weighted_summed_and_logged(tmp_path, tiny_model_dir, prompts):
    (tmp_path / "toy_reward.py").write_text(
        TOY_REWARD + "\ndef length(prompts, completions):\n    return [float(len(c)) for c in completions]\n"
    )
    toy = str(tmp_path / "toy_reward.py")
    trainer = RLTrainer(
        _cfg(
            tmp_path,
            tiny_model_dir,
            prompts,
            max_steps=1,
            reward=[f"{toy}:score", f"{toy}:length"],
            reward_weights=[2.0, -0.5],
        )
    )
    trainer.train()
    row = read_metrics(tmp_path / "run")[0]
    want = 2.0 * row["objective/scores/toy_reward.score"] - 0.5 * row["objective/scores/toy_reward.length"]
    assert row["objective/scores"] == pytest.approx(want, rel=1e-5)
    assert row["objective/scores/toy_reward.length"] > 1  # the unweighted part


@pytest.mark.parametrize(
    "kw,match",
    [
        (
            dict(estimator="grpo", num_generations=1),
            "--estimator grpo compares the completions of a prompt: --num-generations must be >= 2, got 1",
        ),
        (dict(estimator="reinforce_pp", num_generations=1, dynamic_sampling=True), "--dynamic-sampling compares"),
        (dict(estimator="gae"), r"gae needs a value model: run prefalign ppo"),
        (dict(estimator="ppo"), "--estimator must be one of grpo, dr_grpo, rloo, reinforce_pp, got 'ppo'"),
        (dict(reward=["a:f", "b:g"], reward_weights=[1.0]), "--reward-weights has 1 values for 2 --reward sources"),
        (dict(reward=["a:f"], reward_weights=[float("nan")]), r"--reward-weights must be a finite number, got \[nan\]"),
        (dict(reward=["a:f", "a:f"]), "--reward given twice"),
        (dict(vf_coef=0.5), "vf_coef belongs to the value model"),
        (dict(loss_agg="sum"), "--loss-agg must be one of token_mean"),
        (dict(clip_eps_high=0.0), "--clip-eps-high > 0, got 0.2, 0.0"),
        (dict(resample_rounds=2), "--resample-rounds .* needs --dynamic-sampling .*got 2 without --dynamic-sampling"),
        (dict(resample_rounds=-1, dynamic_sampling=True), r"--resample-rounds must be >= 0 .*got -1$"),
        (dict(kl_coef=-1.0), r"^--kl-coef must be >= 0, got -1.0$"),  # naming no --vf-coef, which rl lacks
        (dict(gamma=2.0), r"^--gamma must be in \[0, 1\], got 2.0$"),
        (dict(estimator="grpo", gamma=0.9), r"^--gamma does nothing with --estimator grpo \(it scores whole"),
        (dict(estimator="rloo", gamma=0.9), r"^--gamma does nothing with --estimator rloo"),
    ],
)
def test_config_refuses_bad_input(prompts, kw, match):
    with pytest.raises(ValueError, match=match):
        RLConfig(**{**dict(prompts=str(prompts), reward=["vader"]), **kw})


def test_a_reward_returning_the_wrong_length_is_one_line(tmp_path, tiny_model_dir, prompts):

    (tmp_path / "bad.py").write_text("def score(prompts, completions):\n    return [1.0]\n")
    with pytest.raises(
        UserError, match=r"reward function '.*bad.py:score' returned 1 scores for 16 completions; expected one per"
    ):
        RLTrainer(_cfg(tmp_path, tiny_model_dir, prompts, reward=[f"{tmp_path / 'bad.py'}:score"])).train()


def test_cli_rl_smoke(tmp_path, tiny_model_dir, prompts):
    (tmp_path / "toy_reward.py").write_text(TOY_REWARD)
    out = tmp_path / "cli"
    r = run_cli(
        "rl",
        "--prompts",
        prompts,
        "--reward",
        f"{tmp_path / 'toy_reward.py'}:score",
        "--reward",
        "vader",
        "--reward-weights",
        "1.0",
        "0.5",
        "--model",
        tiny_model_dir,
        "--estimator",
        "rloo",
        "--num-generations",
        "2",
        "--rollout-batch-size",
        "4",
        "--max-steps",
        "1",
        "--max-new-tokens",
        "4",
        "--precision",
        "fp32",
        "--output",
        out,
    )
    assert r.returncode == 0, r.stderr
    row = read_metrics(out)[0]
    assert {"objective/scores/toy_reward.score", "objective/scores/vader"} <= set(row)
    assert (out / "final" / "config.json").is_file()
    bad = run_cli("rl", "--prompts", prompts, "--reward", "vader", "--num-generations", "1", "--output", tmp_path / "x")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: --estimator grpo compares the completions of a prompt: --num-generations must be >= 2, got 1"
    ]


class HalfConstantReward:
    """Prompts ``review i`` with even i score 1.0 whatever the completion (their groups carry no signal and are
    dropped under --dynamic-sampling); odd i score the completion's length in characters, which varies."""

    name = "half-constant"

    def __init__(self):
        self.constant_groups: list[int] = []

    def score(self, prompts, completions):
        even = [int(p.split()[1].rstrip(":")) % 2 == 0 for p in prompts]
        self.constant_groups.append(sum(even) // 4)  # K = 4 rows per prompt
        return torch.tensor([1.0 if e else float(len(c)) for e, c in zip(even, completions)])


def test_dynamic_sampling_counts_the_groups_it_drops(tmp_path, tiny_model_dir, prompts):
    reward = HalfConstantReward()
    trainer = RLTrainer(
        _cfg(tmp_path, tiny_model_dir, prompts, max_steps=3, dynamic_sampling=True), reward_source=reward
    )
    trainer.train()
    rows = read_metrics(tmp_path / "run")
    assert [r["rl/groups_dropped"] for r in rows] == reward.constant_groups
    assert [r["rl/groups_dropped_fraction"] for r in rows] == [n / 4 for n in reward.constant_groups]
    assert sum(reward.constant_groups) > 0


def test_reinforce_pp_whitens_over_the_groups_dynamic_sampling_keeps(tmp_path, tiny_model_dir, prompts):
    """The advantages in the loss are mean 0, variance 1 (unbiased) over the kept tokens: the dropped groups'
    returns (score 1.0 against completion lengths of ~10-30) are not in the statistics. A batch with every group
    dropped trains on no token and still rolls out."""
    from prefalign.losses.stats import masked_mean, masked_var

    cfg = _cfg(tmp_path, tiny_model_dir, prompts, estimator="reinforce_pp", dynamic_sampling=True)
    trainer = RLTrainer(cfg, reward_source=HalfConstantReward())
    trainer.prepare()
    r = trainer.rollout([0, 1, 2, 3], step=1, timing={})
    assert r.kept.tolist() == [False] * 4 + [True] * 4 + [False] * 4 + [True] * 4  # even prompts: equal scores
    mask = r.loss_mask.bool()
    assert masked_mean(r.advantages, mask).item() == pytest.approx(0.0, abs=1e-5)
    assert masked_var(r.advantages, mask).item() == pytest.approx(1.0, rel=1e-5)
    everything = r.response_mask.bool()
    assert abs(masked_mean(r.advantages, everything).item()) > 0.1  # the dropped rows sit apart
    trainer = RLTrainer(
        _cfg(tmp_path / "none", tiny_model_dir, prompts, estimator="reinforce_pp", dynamic_sampling=True),
        reward_source=ConstantReward(),
    )
    trainer.prepare()
    none = trainer.rollout([0, 1], step=1, timing={})
    assert not none.kept.any() and none.loss_mask.sum() == 0 and torch.isfinite(none.advantages).all()


class EvenConstantReward:
    """`HalfConstantReward`'s rule (even prompt i: 1.0 whatever the completion; odd: its length), recording the
    prompt index of every group it scores, call by call (K = 4 rows per prompt)."""

    name = "even-constant"

    def __init__(self):
        self.calls: list[list[int]] = []

    def score(self, prompts, completions):
        index = [int(p.split()[1].rstrip(":")) for p in prompts]
        self.calls.append(index[::4])
        return torch.tensor([1.0 if i % 2 == 0 else float(len(c)) for i, c in zip(index, completions)])


def test_resample_rounds_refill_the_groups_dynamic_sampling_drops(tmp_path, tiny_model_dir, prompts):
    reward = EvenConstantReward()
    cfg = _cfg(tmp_path, tiny_model_dir, prompts, max_steps=4, dynamic_sampling=True, resample_rounds=3)
    RLTrainer(cfg, reward_source=reward).train()
    rows = read_metrics(tmp_path / "run")
    calls = iter(reward.calls)
    for row in rows:
        # this iteration's scoring calls: its batch, then one per refill round, until its completions are counted
        first = next(calls)
        assert len(first) == 4
        rounds, sampled = [], len(first) * 4
        while sampled < row["rl/completions_sampled"]:
            rounds.append(next(calls))
            sampled += len(rounds[-1]) * 4
        assert sampled == row["rl/completions_sampled"] and row["rl/resample_rounds"] == len(rounds) <= 3
        # round r samples one new prompt for each slot still even; an odd one fills its slot for good
        missing = sum(i % 2 == 0 for i in first)
        for drawn in rounds:
            assert len(drawn) == missing
            missing = sum(i % 2 == 0 for i in drawn)
        assert row["rl/groups_dropped"] == missing
        assert row["rl/groups_refilled"] == sum(i % 2 == 0 for i in first) - missing
    assert next(calls, None) is None
    assert sum(r["rl/groups_refilled"] for r in rows) > 0 and sum(r["rl/resample_rounds"] for r in rows) > 0


def _close_runs(a: list[dict], b: list[dict]) -> None:
    """Two runs' metrics rows agree (to float32 rounding) on every key but timings."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        keys = {k for k in x if not k.startswith("time/") and k not in ("wall_seconds", "tokens_per_second")}
        assert keys == {k for k in y if not k.startswith("time/") and k not in ("wall_seconds", "tokens_per_second")}
        for k in keys:
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-5), k


def test_one_step_on_policy_skips_the_rollouts_policy_forward(
    tmp_path, tiny_model_dir, prompts, tokenizer, monkeypatch
):
    from prefalign.trainers.backend import Trained

    calls = []
    plain = Trained.frozen_forward

    def counted(self, fn, *a, **k):  # the policy's no-gradient log-prob forwards (not sampling's)
        calls.append(fn.__name__ == "completion_logprobs" and k.get("return_entropy", False))
        return plain(self, fn, *a, **k)

    monkeypatch.setattr(Trained, "frozen_forward", counted)
    kw = dict(max_steps=2, kl_in_loss=True, ppo_epochs=1, num_minibatches=1, grad_accum=2, kl_coef=0.1)
    runs = {}
    # skip: one step on-policy; full: the rollout's policy forward; recorded: the old log-probs the decode loop
    # recorded (what fp32 does when not one step on-policy)
    for name, skip, record in (("skip", True, False), ("full", False, False), ("recorded", False, True)):
        monkeypatch.setattr(RLTrainer, "one_step_on_policy", property(lambda self, s=skip: s))
        monkeypatch.setattr(RLTrainer, "old_logprobs_from_decode", property(lambda self, r=record: r))
        calls.clear()
        cfg = _cfg(tmp_path / name, tiny_model_dir, prompts, **kw)
        RLTrainer(cfg, reward_source=LowIdReward(tokenizer)).train()
        runs[name] = (read_metrics(tmp_path / name / "run"), sum(calls))
    assert [runs[n][1] for n in ("skip", "full", "recorded")] == [0, 2, 0]  # the policy forward per iteration
    skip_rows, full_rows = runs["skip"][0], runs["full"][0]
    assert all(r["val/ratio"] == 1.0 and r["policy/approxkl"] == 0.0 for r in skip_rows)
    assert skip_rows[1]["objective/kl"] != 0.0  # the KL of the second rollout, from the log-probs the update filled
    _close_runs(skip_rows, full_rows)  # the same run otherwise: the update's forward is the policy that sampled
    _close_runs(runs["recorded"][0], full_rows)  # and the decode loop's recording is that policy's log-probs


def test_old_logprobs_recorded_unless_one_step_on_policy(tmp_path, peaked_model_dir, prompts, tokenizer):  # noqa: F811
    """fp32, 2 epochs: the rollout takes the old log-probs the decode loop recorded (no policy forward), equal
    to the policy's fresh forward to float32 rounding; one step on-policy records nothing (the update fills them)."""
    from test_trainer_ppo import spy_response_forwards

    for name, kw, recorded in (
        ("epochs", {}, True),
        ("one-step", dict(kl_in_loss=True, ppo_epochs=1, num_minibatches=1), False),
    ):
        trainer = RLTrainer(
            _cfg(tmp_path / name, peaked_model_dir, prompts, temperature=0.7, **kw),
            reward_source=LowIdReward(tokenizer),
        )
        seen = spy_response_forwards(trainer)
        trainer.train()
        assert trainer.old_logprobs_from_decode == recorded and trainer.one_step_on_policy == (not recorded)
        assert seen["policy_forward"] == [False] * 2  # recorded, or left for the update to fill
        if recorded:
            for rollout, logps, entropy in seen["fresh"]:
                mask = rollout.response_mask.bool()
                torch.testing.assert_close(rollout.logps[mask], logps[mask], rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(rollout.entropy[mask], entropy[mask], rtol=1e-4, atol=1e-4)


def test_one_step_on_policy_only_when_one_step_and_kl_in_the_loss(tmp_path, tiny_model_dir, prompts):
    on = dict(kl_in_loss=True, ppo_epochs=1, num_minibatches=1)
    assert RLTrainer(_cfg(tmp_path, tiny_model_dir, prompts, **on)).one_step_on_policy
    for change in (dict(kl_in_loss=False), dict(ppo_epochs=2), dict(num_minibatches=2)):
        assert not RLTrainer(_cfg(tmp_path, tiny_model_dir, prompts, **{**on, **change})).one_step_on_policy


class ConstantReward:
    """1.0 for every completion: every group has equal scores, so --dynamic-sampling drops them all."""

    name = "constant"

    def score(self, prompts, completions):
        return torch.ones(len(completions))


def test_one_step_on_policy_with_every_group_dropped_fills_from_a_forward(
    tmp_path, tiny_model_dir, prompts, monkeypatch
):
    """No row is in the loss, so the update runs no forward: the skipped log-probs and entropy come from a
    no-gradient forward of the (unchanged) policy, as a rollout that did not skip them has them."""
    from prefalign.trainers.backend import Trained

    calls = []
    plain = Trained.frozen_forward

    def counted(self, fn, *a, **k):
        calls.append(fn.__name__ == "completion_logprobs" and k.get("return_entropy", False))
        return plain(self, fn, *a, **k)

    monkeypatch.setattr(Trained, "frozen_forward", counted)
    monkeypatch.setattr(RLTrainer, "old_logprobs_from_decode", property(lambda self: False))  # "full": a forward
    kw = dict(max_steps=2, kl_in_loss=True, ppo_epochs=1, num_minibatches=1, dynamic_sampling=True)
    runs = {}
    for name, skip in (("skip", True), ("full", False)):
        monkeypatch.setattr(RLTrainer, "one_step_on_policy", property(lambda self, s=skip: s))
        calls.clear()
        RLTrainer(_cfg(tmp_path / name, tiny_model_dir, prompts, **kw), reward_source=ConstantReward()).train()
        runs[name] = (read_metrics(tmp_path / name / "run"), sum(calls))
    (skip_rows, skip_calls), (full_rows, full_calls) = runs["skip"], runs["full"]
    assert [r["rl/groups_dropped"] for r in skip_rows] == [4, 4]
    assert (skip_calls, full_calls) == (2, 2)  # skipped at sampling, run after the update that took no step
    assert all(r["objective/entropy"] > 0 for r in skip_rows)  # not the placeholder zeros
    _close_runs(skip_rows, full_rows)
