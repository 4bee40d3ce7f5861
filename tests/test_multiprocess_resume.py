"""Stops and resumes of a 2-process launch (`accelerate launch`, CPU, gloo): a signal that reaches one process
stops both after the same step with one checkpoint, and a resumed launch ends with an uninterrupted launch's weights,
bit for bit, each process's generators restored."""

import torch
from conftest import EXAMPLES, final_weights, launch, launch_failure, launch_ok, learnable_pairs, write_jsonl

CPU_CONFIG = EXAMPLES / "cpu-2proc.yaml"

# `prefalign` whose process of rank 1 (only) sends itself SIGTERM as it fetches step 4's batch: the signal reaches one
# process, in the middle of a step, at a step known in advance (an outside kill lands at a step the test cannot
# choose, and finding the process to signal among a launch's descendants is itself a race)
SIGNAL_WORKER = """
import os
import signal
import sys

import prefalign.trainers.dpo as dpo

fetch = dpo.DPOTrainer.batch_for


def batch_for(self, step, micro):
    if step == 3 and micro == 0 and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGTERM)
    return fetch(self, step, micro)


dpo.DPOTrainer.batch_for = batch_for
from prefalign.cli import main

sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_to_one_process_stops_both_after_its_step_and_resumes_exactly(tmp_path, tiny_model_dir):
    (tmp_path / "worker.py").write_text(SIGNAL_WORKER)
    data = write_jsonl(tmp_path / "pairs.jsonl", learnable_pairs(48))
    flags = ["dpo", "--data", data, "--model", tiny_model_dir, "--max-steps", "8", "--logging-steps", "1"]
    flags += ["--learning-rate", "1e-3", "--lr-scheduler", "constant", "--precision", "fp32", "--save-steps", "1000"]
    flags += ["--batch-size", "2"]
    out = tmp_path / "two"
    r = launch([*flags, "--output", out], config=CPU_CONFIG, script=tmp_path / "worker.py")
    assert r.returncode != 0, launch_failure(r.stderr)
    stops = {line.split("error: ")[-1] for line in r.stderr.splitlines() if "SIGTERM: stopped after step" in line}
    assert len(stops) == 1, launch_failure(r.stderr)
    assert next(iter(stops)).startswith(f"SIGTERM: stopped after step 4 of 8; checkpoint {out / 'checkpoints'}")
    assert [c.name for c in (out / "checkpoints").glob("step-*")] == ["step-0000004"]
    assert not (out / "final").exists()

    launch_ok([*flags, "--output", out, "--resume", "latest"], CPU_CONFIG)
    launch_ok([*flags, "--output", tmp_path / "whole"], CPU_CONFIG)  # uninterrupted
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
