"""`accelerate launch --multi_gpu --num_processes 2` on the CPU (gloo): same global batch, same losses."""

import os
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


def test_ppo_refuses_several_processes(tmp_path, tiny_model_dir):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\nc\nd\n")
    r = _launch(2, ["ppo", "--prompts", prompts, "--reward", "vader", "--model", tiny_model_dir, "--max-steps", "1",
                    "--rollout-batch-size", "2", "--output", tmp_path / "ppo"])
    assert r.returncode != 0 and "one process" in r.stderr
