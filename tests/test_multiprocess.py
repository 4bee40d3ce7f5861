"""`accelerate launch --multi_gpu --num_processes 2` on the CPU (gloo): same global batch, same losses."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import learnable_pairs, read_metrics, write_jsonl

ACCELERATE = str(Path(sys.executable).parent / "accelerate")
CPU_CONFIG = Path(__file__).resolve().parents[1] / "examples" / "accelerate" / "cpu-2proc.yaml"
# Tolerance: the 2-process gradient is the mean of two half-batch means, all-reduced in float32;
# the summation order differs from the 1-process mean, so values agree to float32 rounding, not bitwise.
TOL = 1e-5


def _launch(processes, args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    if processes == 1:
        cmd = [sys.executable, "-m", "prefalign", *map(str, args)]
    else:
        assert processes == 2  # the shipped example config is the one under test
        cmd = [ACCELERATE, "launch", "--config_file", str(CPU_CONFIG), "-m", "prefalign", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.parametrize("command", ["sft", "dpo", "reward"])
def test_two_processes_give_the_losses_of_one(tmp_path, tiny_model_dir, command):
    data = write_jsonl(tmp_path / "pairs.jsonl", learnable_pairs(40))
    common = [command, "--data", data, "--model", tiny_model_dir, "--max-steps", "4", "--learning-rate", "1e-3",
              "--precision", "fp32", "--eval-split", "0.2", "--lr-scheduler", "constant"]
    one = _launch(1, [*common, "--batch-size", "4", "--output", tmp_path / "one"])
    assert one.returncode == 0, one.stderr[-3000:]
    two = _launch(2, [*common, "--batch-size", "2", "--output", tmp_path / "two"])  # same global batch: 2 x 2
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "eval/loss"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], abs=TOL), (ra["step"], key)
    assert len([r for r in a if "loss" in r]) == 4
    assert (tmp_path / "two" / "final" / "config.json").is_file()


# Two processes that each run PPO on half of every rollout batch: the real launcher and gloo. The CLI's own
# parse and trainer, plus one line per process that saves its final parameters (only the main process writes
# final/), so the test can check that DDP kept both copies identical.
PPO_WORKER = """
import sys

import torch

from prefalign.cli._args import parse
from prefalign.trainers.checkpoint import trainable_state_dict
from prefalign.trainers.ppo import PPOConfig, PPOTrainer

cfg = parse(PPOConfig, sys.argv[1:], prog="prefalign ppo")
trainer = PPOTrainer(cfg)
trainer.train()
torch.save({"policy": trainable_state_dict(trainer.policy), "value": trainable_state_dict(trainer.value)},
           f"{cfg.output}/params-rank{trainer.accelerator.process_index}.pt")
"""
# A deterministic toy reward, loaded from the CLI as file.py:function: the share of letters in the completion.
TOY_REWARD = """
def score(prompts, completions):
    return [sum(c.isalpha() for c in t) / max(len(t), 1) for t in completions]
"""
# Tolerance of 2 processes vs 1: keyed sampling draws the same tokens, each process weights its token means by
# its share of the micro-batch's tokens (so DDP's average is the 1-process token mean, responses of any lengths),
# and whitening uses statistics of both shards. What is left is float32 rounding (forwards over other batch
# shapes, sums in another order), carried through 2 updates. Measured over the 3 iterations: at most 6e-8
# relative on scores, 1e-7 on ratio, 5e-8 on the value loss and the summed entropy (~65 nats); 5e-7 absolute on
# the policy loss, a mean of whitened advantages that nearly cancels (~0.01), so an absolute floor is needed.
PPO_REL, PPO_ABS = 1e-5, 1e-5


def test_ppo_two_processes_give_the_losses_of_one(tmp_path, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"review {i}: the movie was{' really' * (i % 3)}\n" for i in range(16)))
    (tmp_path / "toy_reward.py").write_text(TOY_REWARD)
    (tmp_path / "ppo_worker.py").write_text(PPO_WORKER)
    # --stop k ends some responses early, so the processes hold different numbers of tokens
    common = ["--prompts", prompts, "--reward", f"{tmp_path / 'toy_reward.py'}:score", "--model", tiny_model_dir,
              "--max-steps", "3", "--rollout-batch-size", "8", "--num-minibatches", "1", "--ppo-epochs", "2",
              "--max-new-tokens", "8", "--stop", "k", "--temperature", "1.0", "--learning-rate", "1e-3",
              "--precision", "fp32", "--lr-scheduler", "constant"]
    one = _launch(1, ["ppo", *common, "--output", tmp_path / "one"])
    assert one.returncode == 0, one.stderr[-3000:]
    two = _launch_ppo_worker(tmp_path, [*common, "--save-steps", "2", "--output", tmp_path / "two"])
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        for key in ("objective/scores", "objective/kl", "objective/entropy", "loss/policy", "loss/value",
                    "policy/approxkl", "val/ratio", "val/explained_variance", "val/response_length"):
            assert rb[key] == pytest.approx(ra[key], rel=PPO_REL, abs=PPO_ABS), (ra["step"], key)
        assert rb["val/num_eos"] == ra["val/num_eos"] and rb["episodes"] == ra["episodes"]
    lengths = [r["val/response_length"] for r in a]
    assert any(0 < r["val/num_eos"] < 8 for r in a) and any(x != int(x) for x in lengths), lengths
    assert json.loads((tmp_path / "two" / "run.json").read_text())["processes"] == 2
    assert (tmp_path / "two" / "final" / "config.json").is_file() and (tmp_path / "two" / "value").is_dir()
    # DDP saw every training forward: both processes end with the same parameters, bit for bit
    ranks = [torch.load(tmp_path / "two" / f"params-rank{r}.pt") for r in (0, 1)]
    for part in ("policy", "value"):
        assert ranks[0][part].keys() == ranks[1][part].keys()
        for name, p in ranks[0][part].items():
            assert torch.equal(p, ranks[1][part][name]), (part, name)
    # and with the parameters of the 1-process run, to float rounding
    one_policy = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "final").named_parameters())
    for name, p in ranks[0]["policy"].items():
        assert torch.allclose(p, one_policy[name], atol=1e-5), name

    # resume: the main process wrote the checkpoint of iteration 2, both processes load it and end exactly where
    # the uninterrupted run ended
    shutil.rmtree(tmp_path / "two" / "checkpoints" / "step-0000003")
    resumed = _launch_ppo_worker(tmp_path, [*common, "--save-steps", "2", "--output", tmp_path / "two",
                                            "--resume", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    c = read_metrics(tmp_path / "two")
    assert [r["step"] for r in c] == [1, 2, 3] and c[:2] == b[:2]
    for key in ("objective/scores", "objective/kl", "loss/policy", "loss/value", "kl_coef"):
        assert c[2][key] == b[2][key], key
    for r in (0, 1):
        again = torch.load(tmp_path / "two" / f"params-rank{r}.pt")
        for part in ("policy", "value"):
            for name, p in ranks[0][part].items():
                assert torch.equal(again[part][name], p), (r, part, name)


def _launch_ppo_worker(tmp_path, args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    return subprocess.run([ACCELERATE, "launch", "--config_file", str(CPU_CONFIG), str(tmp_path / "ppo_worker.py"),
                           *map(str, args)], capture_output=True, text=True, timeout=600, env=env)


def test_ppo_refuses_a_batch_the_processes_cannot_share(tmp_path, tiny_model_dir):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\nc\nd\n")
    r = _launch(2, ["ppo", "--prompts", prompts, "--reward", "vader", "--model", tiny_model_dir, "--max-steps", "1",
                    "--rollout-batch-size", "3", "--output", tmp_path / "ppo"])
    assert r.returncode != 0
    assert "error: --rollout-batch-size 3 must be divisible by --num-minibatches x --grad-accum x processes" in r.stderr
    assert not (tmp_path / "ppo").exists()
