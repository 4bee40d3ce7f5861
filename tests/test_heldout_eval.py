"""The online trainers' held-out evaluation (issue 14, `prefalign/trainers/heldout.py`): gold and proxy score on
held-out prompts with KL to the reference while `prefalign ppo` and `prefalign rl` train, in a row of its own at
step 0, then in the rows of every --heldout-every-th and the last iteration; with no effect on training."""

import math
import shutil

import pytest
import torch
from conftest import (
    EXAMPLES,
    final_weights,
    launch,
    launch_failure,
    ppo_flags,
    read_metrics,
    run_cli,
    run_here,
    two_process_config,
    write_jsonl,
)
from test_fsdp import WORKER as FSDP_WORKER
from test_loop import _documented
from test_trainer_ppo import LowIdReward

from prefalign.errors import UserError
from prefalign.trainers.ppo import PPOConfig, PPOTrainer
from prefalign.trainers.rl import RLConfig, RLTrainer

POINT_KEYS = {"heldout/gold", "heldout/gold_std", "heldout/proxy", "heldout/kl", "heldout/n", "time/heldout"}
# what measures the machine, not the run
TIMINGS = ("time/", "tokens_per_second", "wall_seconds")
ANSWERS = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0]

# Gold judges, loaded as file.py:function: the share of letters in the completion, and the row's `answer` column.
JUDGES = """
def letters(prompts, completions):
    return [sum(c.isalpha() for c in t) / max(len(t), 1) for t in completions]


def answer(prompts, completions, answer):
    return [float(a) for a in answer]
"""


@pytest.fixture()
def prompts(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("".join(f"review {i}: the movie was\n" for i in range(32)))
    return p


@pytest.fixture()
def heldout(tmp_path):
    """``(held-out prompt file, judges module path)``: 6 prompts, each with an ``answer`` column."""
    (tmp_path / "judges.py").write_text(JUDGES)
    rows = [{"prompt": f"held-out {i}: the film was", "answer": a} for i, a in enumerate(ANSWERS)]
    return write_jsonl(tmp_path / "heldout.jsonl", rows), tmp_path / "judges.py"


def _heldout_kw(heldout, judge="letters", every=2, **kw):
    path, judges = heldout
    return dict(heldout_prompts=str(path), heldout_judge=f"{judges}:{judge}", heldout_every=every, **kw)


# a tiny run of 4 iterations on LowIdReward (the proxy), PPO's or rl's (GRPO, 2 prompts x K = 4)
COMMON = dict(
    max_steps=4,
    ppo_epochs=2,
    max_new_tokens=6,
    learning_rate=1e-2,
    precision="fp32",
    lr_scheduler="constant",
    temperature=1.0,
    seed=0,
)
COMMANDS = {
    "ppo": (PPOConfig, PPOTrainer, dict(reward="low-id", rollout_batch_size=4, num_minibatches=2)),
    "rl": (
        RLConfig,
        RLTrainer,
        dict(reward=["low-id"], rollout_batch_size=2, num_generations=4, estimator="grpo", num_minibatches=1),
    ),
}


def _train(command, tmp_path, name, model_dir, prompts, tokenizer, **kw):
    config, trainer_class, own = COMMANDS[command]
    cfg = config(
        **{"prompts": str(prompts), "model": str(model_dir), "output": str(tmp_path / name), **COMMON, **own, **kw}
    )
    trainer = trainer_class(cfg, reward_source=LowIdReward(tokenizer))
    trainer.train()
    return trainer


def _ppo(*args, **kw):
    return _train("ppo", *args, **kw)


def _training(row):
    return {k: v for k, v in row.items() if not k.startswith(("heldout/", *TIMINGS))}


def _check_points(rows, n, points=(2, 4)):
    """Step 0 is a row of its own; rows ``points`` carry a finite held-out point, the other rows none."""
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert set(rows[0]) == {"step", "wall_seconds", *POINT_KEYS}
    assert not set(rows[0]) - _documented("Held-out evaluation (`prefalign ppo`, `prefalign rl`)")[0]
    assert abs(rows[0]["heldout/kl"]) < 1e-4  # the starting policy is the reference
    for row in rows:
        has_point = row["step"] == 0 or row["step"] in points
        assert (set(row) >= POINT_KEYS) == has_point, row["step"]
        assert not has_point or (row["heldout/n"] == n and all(math.isfinite(row[k]) for k in POINT_KEYS))
    assert abs(rows[4]["heldout/kl"]) > 1e-3  # the point is the current policy's, not the reference's


def _check_unchanged(on, off, parts):
    """Training rows and final weights of the run with the held-out evaluation equal those of the run without."""
    rows_on, rows_off = read_metrics(on), read_metrics(off)
    assert [_training(r) for r in rows_on[1:]] == [_training(r) for r in rows_off]
    for part in parts:
        a, b = final_weights(on, part), final_weights(off, part)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{part}/{k} differs with the held-out evaluation on"


def _check_repeatable(trainer, last_row):
    """The final policy evaluated again gives the last row's point: every point draws the same random numbers."""
    again = trainer.heldout_point()
    for key in POINT_KEYS - {"time/heldout"}:
        assert again[key] == last_row[key], key


@pytest.mark.parametrize("command", ["ppo", "rl"])
def test_points_at_step_0_every_n_and_the_end_without_changing_training(
    tmp_path, tiny_model_dir, prompts, tokenizer, heldout, command
):
    trainer = _train(command, tmp_path, "on", tiny_model_dir, prompts, tokenizer, **_heldout_kw(heldout))
    _train(command, tmp_path, "off", tiny_model_dir, prompts, tokenizer)
    rows = read_metrics(tmp_path / "on")
    _check_points(rows, n=len(ANSWERS))
    _check_unchanged(tmp_path / "on", tmp_path / "off", ("final", "value") if command == "ppo" else ("final",))
    _check_repeatable(trainer, rows[4])


def test_the_kl_reads_the_decode_loops_log_probs_without_its_entropy(
    tmp_path, tiny_model_dir, prompts, tokenizer, heldout, monkeypatch
):
    """fp32: the held-out KL takes the policy's log-probs the decode loop recorded, with no entropy (it reads
    none), and equals the KL of a policy forward after sampling to float32 rounding; same completions, same
    scores."""
    import prefalign.trainers.ppo_sampling as sampling

    trainer = _ppo(tmp_path, "run", tiny_model_dir, prompts, tokenizer, **_heldout_kw(heldout))
    assert trainer.old_logprobs_from_decode
    seen, policy_forwards, generate, logprobs = [], [], sampling.generate, sampling.completion_logprobs

    def spy(*args, **kwargs):
        gen = generate(*args, **kwargs)
        seen.append((gen.logps is not None, gen.entropy is None))
        return gen

    def counting(model, *args, **kwargs):
        if model is trainer.policy:  # the reference is a model of its own (full fine-tuning)
            policy_forwards[-1].append(kwargs.get("return_entropy", False))
        return logprobs(model, *args, **kwargs)

    monkeypatch.setattr(sampling, "generate", spy)
    monkeypatch.setattr(sampling, "completion_logprobs", counting)
    rows = list(range(len(ANSWERS)))
    policy_forwards.append([])
    recorded = trainer.heldout_batch(rows)
    monkeypatch.setattr(PPOTrainer, "old_logprobs_from_decode", property(lambda self: False))
    policy_forwards.append([])
    forward = trainer.heldout_batch(rows)
    assert seen == [(True, True), (False, True)]
    # recorded: no policy forward (the KL can only read the recording); else one, without entropy
    assert policy_forwards == [[], [False]]
    assert torch.equal(recorded[:, :2], forward[:, :2])  # gold and proxy of the same completions
    assert (forward[:, 2].abs() > 1e-3).all()  # the trained policy is off the reference
    torch.testing.assert_close(recorded[:, 2], forward[:, 2], rtol=1e-4, atol=1e-4)
    # a recording without entropy does not serve a caller asking for entropy: the policy's forward runs
    monkeypatch.setattr(PPOTrainer, "old_logprobs_from_decode", property(lambda self: True))
    gen, *seqs = trainer.sample([trainer.heldout_ids[i] for i in rows], rows, {}, entropy=False)
    policy_forwards.append([])
    logps, entropy, _, _ = trainer.response_forwards(tuple(seqs), gen.prompt_ids.shape[1], gen.recorded)
    assert gen.logps is not None and gen.entropy is None and entropy is not None and policy_forwards[-1] == [True]
    torch.testing.assert_close(logps, gen.logps, rtol=1e-4, atol=1e-4)


def test_an_evaluation_leaves_every_random_stream_as_it_found_it(tmp_path, tiny_model_dir, prompts, tokenizer, heldout):
    """The evaluation draws from torch's, Python's and numpy's global generators (sampling falls back to them, a
    reward function may use them) and restores all three: training code that draws from them (none does in ppo and
    rl today) gets the numbers it would get without the evaluation."""
    import random

    import numpy as np

    from prefalign.trainers.heldout import HeldoutEval

    point, batch, seen = HeldoutEval.heldout_point, HeldoutEval.heldout_batch, []

    def drawing_batch(self, rows):
        torch.rand(3), random.random(), np.random.rand()  # as a judge or a fall-back sampler would
        return batch(self, rows)

    def checked_point(self):
        before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
        out = point(self)
        after = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
        seen.append(torch.equal(before[0], after[0]) and before[1] == after[1] and bool((before[2] == after[2]).all()))
        return out

    HeldoutEval.heldout_point, HeldoutEval.heldout_batch = checked_point, drawing_batch
    try:
        _ppo(tmp_path, "run", tiny_model_dir, prompts, tokenizer, max_steps=2, **_heldout_kw(heldout, every=1))
    finally:
        HeldoutEval.heldout_point, HeldoutEval.heldout_batch = point, batch
    assert seen == [True] * 3  # step 0, 1 and 2


def test_the_last_iteration_is_evaluated_off_the_cadence_and_the_limit_takes_the_first_prompts(
    tmp_path, tiny_model_dir, prompts, tokenizer, heldout
):
    _ppo(
        tmp_path,
        "run",
        tiny_model_dir,
        prompts,
        tokenizer,
        **_heldout_kw(heldout, judge="answer", every=3, heldout_limit=4),
    )
    rows = read_metrics(tmp_path / "run")
    _check_points(rows, n=4, points=(3, 4))
    # the judge got each prompt's `answer` column, aligned, for the first 4 prompts
    want = torch.tensor(ANSWERS[:4], dtype=torch.float64)
    for row in (rows[0], rows[3], rows[4]):
        assert row["heldout/gold"] == pytest.approx(want.mean().item(), abs=1e-12)
        assert row["heldout/gold_std"] == pytest.approx(want.std(unbiased=False).item(), abs=1e-12)


def test_a_resumed_run_continues_the_points_without_a_second_start(
    tmp_path, tiny_model_dir, prompts, tokenizer, heldout
):
    kw = dict(save_steps=2, **_heldout_kw(heldout))
    _ppo(tmp_path, "full", tiny_model_dir, prompts, tokenizer, **kw)
    _ppo(tmp_path, "cut", tiny_model_dir, prompts, tokenizer, **kw)
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-0000004")
    _ppo(tmp_path, "cut", tiny_model_dir, prompts, tokenizer, resume="latest", **kw)
    full, cut = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    assert [r["step"] for r in cut] == [0, 1, 2, 3, 4]  # one step-0 row: the resumed run logged none
    for a, b in zip(full, cut, strict=True):
        assert {k: v for k, v in a.items() if not k.startswith(TIMINGS)} == {
            k: v for k, v in b.items() if not k.startswith(TIMINGS)
        }, a["step"]


def test_a_judge_needing_a_column_the_heldout_rows_lack_is_refused_before_the_output_exists(
    tmp_path, tiny_model_dir, prompts, tokenizer, heldout
):
    texts = tmp_path / "heldout.txt"
    texts.write_text("held-out 0\nheld-out 1\n")
    kw = {**_heldout_kw(heldout, judge="answer"), "heldout_prompts": str(texts)}
    with pytest.raises(UserError, match=r"--heldout-prompts .*heldout.txt \(--heldout-judge\): .* needs 'answer'"):
        _ppo(tmp_path, "run", tiny_model_dir, prompts, tokenizer, **kw)
    assert not (tmp_path / "run").exists()


def test_cli_rl_takes_the_heldout_flags(tmp_path, tiny_model_dir, heldout):
    path, judges = heldout
    out = tmp_path / "cli"
    r = run_cli(
        "rl",
        *ppo_flags(tmp_path, tiny_model_dir),
        "--num-generations",
        "2",
        "--max-steps",
        "1",
        "--output",
        out,
        "--heldout-prompts",
        path,
        "--heldout-judge",
        f"{judges}:answer",
        "--heldout-every",
        "1",
        "--heldout-limit",
        "2",
    )
    assert r.returncode == 0, launch_failure(r.stderr)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 1]
    assert [r["heldout/gold"] for r in rows] == [2.0, 2.0]  # the mean answer of the first 2 prompts
    assert rows[1]["heldout/n"] == 2


@pytest.mark.parametrize("backend", ["ddp", "fsdp"])
def test_two_processes_log_the_points_of_one(tmp_path, tiny_model_dir, heldout, backend):
    """Each process evaluates 3 of the 6 prompts; under FSDP sampling and log-probs are collectives through the
    sharded policy, which every process enters as often (12 new tokens: the processes' completions end at other
    lengths, so a decode that was not synced would hang)."""
    path, judges = heldout
    flags = ppo_flags(tmp_path, tiny_model_dir)
    flags[flags.index("--max-new-tokens") + 1] = "12"
    common = [
        "ppo",
        *flags,
        "--max-steps",
        "2",
        "--ppo-epochs",
        "1",
        "--heldout-prompts",
        path,
        "--heldout-judge",
        f"{judges}:letters",
        "--heldout-every",
        "2",
    ]
    run_here([*common, "--output", tmp_path / "one"])
    if backend == "fsdp":
        (tmp_path / "fsdp_worker.py").write_text(FSDP_WORKER)
        config, script = two_process_config("fsdp", tmp_path), tmp_path / "fsdp_worker.py"
    else:
        config, script = EXAMPLES / "cpu-2proc.yaml", None
    r = launch([*common, "--output", tmp_path / "two"], config=config, script=script)
    assert r.returncode == 0, launch_failure(r.stderr)
    one, two = ([row for row in read_metrics(tmp_path / name) if "heldout/gold" in row] for name in ("one", "two"))
    assert [r["step"] for r in one] == [r["step"] for r in two] == [0, 2]
    for a, b in zip(one, two, strict=True):
        assert a["heldout/n"] == b["heldout/n"] == len(ANSWERS)
        for key in ("heldout/gold", "heldout/gold_std", "heldout/proxy", "heldout/kl"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-5), (a["step"], key)
    assert abs(one[1]["heldout/kl"]) > 1e-4  # the policy moved: the comparison covers the policy's log-probs


# ------------------------------------------------------------------------------------------- validation


def _config(cls, prompts, **kw):
    reward = ["vader"] if cls is RLConfig else "vader"
    return cls(prompts=str(prompts), reward=reward, **kw)


def test_heldout_prompts_without_a_judge_are_refused(prompts):
    with pytest.raises(ValueError, match="--heldout-prompts needs --heldout-judge"):
        _config(PPOConfig, prompts, heldout_prompts=str(prompts), heldout_every=2)


def test_a_judge_without_heldout_prompts_is_refused(prompts):
    with pytest.raises(ValueError, match="--heldout-judge needs --heldout-prompts"):
        _config(RLConfig, prompts, heldout_judge="vader", heldout_every=2)


def test_a_negative_heldout_every_is_refused(prompts):
    with pytest.raises(ValueError, match="--heldout-every must be >= 0"):
        _config(PPOConfig, prompts, heldout_prompts=str(prompts), heldout_judge="vader", heldout_every=-1)


def test_heldout_prompts_with_the_evaluation_off_are_refused(prompts):
    with pytest.raises(ValueError, match="--heldout-every is 0"):
        _config(PPOConfig, prompts, heldout_prompts=str(prompts), heldout_judge="vader")


def test_a_cadence_or_limit_without_heldout_prompts_is_refused(prompts):
    with pytest.raises(ValueError, match="--heldout-every and --heldout-limit need --heldout-prompts"):
        _config(PPOConfig, prompts, heldout_every=2)


def test_a_heldout_limit_below_one_is_refused(prompts):
    with pytest.raises(ValueError, match="--heldout-limit must be >= 1"):
        _config(
            RLConfig, prompts, heldout_prompts=str(prompts), heldout_judge="vader", heldout_every=1, heldout_limit=0
        )


def test_a_cadence_off_the_logged_rows_is_refused(prompts):
    with pytest.raises(ValueError, match="--heldout-every 3 must be a multiple of --logging-steps 2"):
        _config(
            PPOConfig, prompts, heldout_prompts=str(prompts), heldout_judge="vader", heldout_every=3, logging_steps=2
        )
