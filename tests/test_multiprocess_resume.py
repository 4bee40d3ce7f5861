"""Stops and resumes of a 2-process launch (`accelerate launch`, CPU, gloo): a signal that reaches one process
stops both after the same step with one checkpoint, and a resumed launch ends with an uninterrupted launch's weights,
bit for bit, each process's generators restored."""

import signal
import subprocess
import sys
from pathlib import Path

import psutil
import torch
from conftest import EXAMPLES, final_weights, free_port, launch_ok, learnable_pairs, write_jsonl
from test_reliability import _wait_for_step

CPU_CONFIG = EXAMPLES / "cpu-2proc.yaml"


def _worker(launcher: subprocess.Popen, rank: int) -> psutil.Process:
    """The launched process of ``rank`` (its RANK variable), among the launcher's descendants."""
    for p in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if p.environ().get("RANK") == str(rank) and "prefalign" in " ".join(p.cmdline()):
                return p
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no process of rank {rank}")


def test_sigterm_to_one_process_stops_both_after_one_step_and_resumes_exactly(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "pairs.jsonl", learnable_pairs(48))
    flags = ["dpo", "--data", data, "--model", tiny_model_dir, "--max-steps", "200", "--logging-steps", "1"]
    flags += ["--learning-rate", "1e-3", "--lr-scheduler", "constant", "--precision", "fp32", "--save-steps", "1000"]
    out = tmp_path / "two"
    two = [*flags, "--batch-size", "2", "--output", out]
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(CPU_CONFIG)]
    cmd += ["--main_process_port", str(free_port()), "-m", "prefalign", *map(str, two)]
    env = {"HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONFAULTHANDLER": "1"}
    launcher = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**psutil.os.environ, **env})
    try:
        _wait_for_step(launcher, out, 3)
        _worker(launcher, 1).send_signal(signal.SIGTERM)  # rank 1 only: rank 0 learns of it in the collective
        _, err = launcher.communicate(timeout=180)
    finally:
        launcher.kill()
    assert launcher.returncode != 0
    stops = [line for line in err.splitlines() if "SIGTERM: stopped after step" in line]
    assert stops, err[-3000:]
    step = int(stops[0].split("stopped after step ")[1].split()[0])
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert [c.name for c in ckpts] == [f"step-{step:07d}"] and 3 <= step < 200
    assert not (out / "final").exists()

    launch_ok([*two, "--resume", "latest"], CPU_CONFIG)
    launch_ok([*flags, "--batch-size", "2", "--output", tmp_path / "whole"], CPU_CONFIG)  # uninterrupted
    whole, resumed = final_weights(tmp_path / "whole"), final_weights(out)
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_a_resume_on_two_processes_with_lora_dropout_is_exact(tmp_path, tiny_model_dir):
    """LoRA dropout draws from each process's own generator, and processes holding rows of other lengths draw
    different amounts: each process's RNG state must come back, not the main process's on both."""
    import shutil

    from conftest import uneven_pairs

    data = write_jsonl(tmp_path / "pairs.jsonl", uneven_pairs(32))
    flags = ["dpo", "--data", data, "--model", tiny_model_dir, "--max-steps", "4", "--save-steps", "2"]
    flags += ["--lora-r", "4", "--lora-dropout", "0.5", "--learning-rate", "1e-2", "--batch-size", "2"]
    flags += ["--precision", "fp32", "--save-total-limit", "3"]
    launch_ok([*flags, "--output", tmp_path / "whole"], CPU_CONFIG)
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    for done in ("final", "checkpoints/step-0000004"):
        shutil.rmtree(tmp_path / "cut" / done)
    launch_ok([*flags, "--output", tmp_path / "cut", "--resume", "latest"], CPU_CONFIG)
    whole, resumed = final_weights(tmp_path / "whole"), final_weights(tmp_path / "cut")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
