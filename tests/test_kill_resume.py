"""kill -9 at 5 random points of one run, in a row, resuming after each: the run ends bit-identical to an
uninterrupted one (dpo, reward, ppo, and rl with GRPO as the online estimator). tests/test_reliability.py kills
once, from outside, at a random step.

Each launch is a real ``prefalign COMMAND ...`` process (`prefalign.cli.main`) that gets SIGKILL, which it cannot
catch or clean up after, at a point drawn at random: inside a step (before its optimizer step), after a step
before its checkpoint, halfway through writing its checkpoint (one file of it written), or just after the
checkpoint. The process sends the signal to itself when it reaches that point, so the point is exact rather than
wherever a polling parent happens to catch it. The 28 launches take about a minute on a busy 2-core machine: every
launch is forked from one server process that imported torch, transformers and prefalign once (multiprocessing's
forkserver), so none pays the imports again.
"""

import importlib.util
import multiprocessing
import os
import random
import signal

import pytest
import torch
from conftest import final_weights, learnable_pairs, read_metrics, write_jsonl

# What a launch imports (prefalign's commands import their heavy modules inside main): the fork server imports
# them once, so a launch starts in a fraction of a second. Names, not this module: the server does not get the
# tests directory on its path (Python 3.11's forkserver), and a preload that fails to import is skipped silently.
PRELOAD = [
    "prefalign.cli",
    "prefalign.cli._args",
    "prefalign.trainers.dpo",
    "prefalign.trainers.reward",
    "prefalign.trainers.ppo",
    "prefalign.trainers.rl",
    "prefalign.trainers.run",
    "accelerate",
    "peft",
    "safetensors.torch",
    "tqdm.auto",
    "transformers.models.auto.modeling_auto",
    "transformers.models.auto.tokenization_auto",
    "transformers.models.llama.modeling_llama",
    "torch.distributed.checkpoint.state_dict",
    "torch.utils.tensorboard",
    "tyro",
    "deepspeed",
]
PRELOAD = [name for name in PRELOAD if importlib.util.find_spec(name.split(".")[0]) is not None]  # deepspeed: optional

PHASES = ("in-step", "before-checkpoint", "mid-checkpoint", "after-checkpoint")
KILLS = 5


def _arm_kill(step: int, phase: str) -> None:
    """In a launched process: SIGKILL itself when run step ``step`` (1-based) reaches ``phase``."""
    from prefalign.trainers import backend, checkpoint, run

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    done = {"last": 0, "saving": None, "files": 0}  # the last step checkpointed or resumed from
    resume, save_checkpoint, optimizer_step, save_file = (
        run.Run._resume,
        run.Run.save_checkpoint,
        backend.AccelerateBackend.step,
        checkpoint.torch.save,
    )

    def resumed(self):
        done["last"] = resume(self)
        return done["last"]

    def saving(self, at):
        if at == step and phase == "before-checkpoint":
            die()
        done["saving"] = at
        path = save_checkpoint(self, at)
        done["last"], done["saving"] = at, None
        if at == step and phase == "after-checkpoint":
            die()
        return path

    def stepping(self, *args, **kwargs):
        if done["last"] == step - 1 and phase == "in-step":
            die()
        return optimizer_step(self, *args, **kwargs)

    def writing(obj, path, *args, **kwargs):
        if done["saving"] == step and phase == "mid-checkpoint":
            done["files"] += 1
            if done["files"] == 2:  # the first file is written, the checkpoint's temp directory is half full
                die()
        return save_file(obj, path, *args, **kwargs)

    run.Run._resume, run.Run.save_checkpoint, backend.AccelerateBackend.step = resumed, saving, stepping
    torch.save = writing


def _launch(args: list[str], kill: tuple[int, str] | None) -> None:
    """The body of one launched process: ``prefalign ARGS``, killed at ``kill`` (step, phase) if given."""
    import sys

    from prefalign.cli import main

    torch.set_num_threads(1)  # every launch alike (the runs must match bitwise); 2x faster on a busy 2-core machine
    if kill is not None:
        _arm_kill(*kill)
    sys.exit(main(args))


@pytest.fixture(scope="module")
def launcher():
    """Start a launch as a forked process of a server that has imported everything; returns its exit code."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)

    def launch(args, kill=None):
        proc = ctx.Process(target=_launch, args=([str(a) for a in args], kill))
        proc.start()
        proc.join(300)
        if proc.exitcode is None:  # hung: end it, and the test fails on its exit code
            proc.kill()
            proc.join()
            return None
        return proc.exitcode

    return launch


def _commands(tmp_path, model_dir):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", learnable_pairs(32))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"review {i}: the movie was\n" for i in range(16)))
    judge = tmp_path / "judge.py"
    judge.write_text("def score(prompts, completions):\n    return [len(c) / 10 for c in completions]\n")
    common = ["--model", model_dir, "--precision", "fp32", "--save-steps", "1", "--learning-rate", "1e-3"]
    return {
        "dpo": ["dpo", "--data", pairs, "--batch-size", "2", "--max-steps", "8", *common],
        "reward": ["reward", "--data", pairs, "--batch-size", "2", "--max-steps", "8", *common],
        "ppo": [
            "ppo",
            "--prompts",
            prompts,
            "--reward",
            f"{judge}:score",
            "--rollout-batch-size",
            "4",
            "--num-minibatches",
            "2",
            "--max-new-tokens",
            "4",
            "--max-steps",
            "7",
            "--ppo-epochs",
            "1",
            *common,
        ],
        "rl": [
            "rl",
            "--prompts",
            prompts,
            "--reward",
            f"{judge}:score",
            "--estimator",
            "grpo",
            "--num-generations",
            "2",
            "--rollout-batch-size",
            "4",
            "--num-minibatches",
            "2",
            "--max-new-tokens",
            "4",
            "--max-steps",
            "6",
            "--ppo-epochs",
            "1",
            *common,
        ],
    }


def _again(out):
    """How a user relaunches a killed run: resume its latest checkpoint, or start over if it wrote none."""
    return ["--resume", "latest"] if list(out.glob("checkpoints/step-*/state.json")) else ["--overwrite"]


def _timeless(rows):
    return [{k: v for k, v in r.items() if not k.startswith(("wall", "time/", "tokens_per"))} for r in rows]


@pytest.mark.parametrize("command", ["dpo", "reward", "ppo", "rl"])
def test_five_kills_in_a_row_then_resume_equals_uninterrupted(tmp_path, tiny_model_dir, launcher, command):
    args = _commands(tmp_path, tiny_model_dir)[command]
    total = int(args[args.index("--max-steps") + 1])
    rng = random.Random(f"kill-{command}")
    phases = [*rng.sample(PHASES, len(PHASES)), *rng.choices(PHASES, k=KILLS - len(PHASES))]  # each one at least once
    kills = list(zip(sorted(rng.sample(range(1, total + 1), KILLS)), phases))
    assert launcher([*args, "--output", tmp_path / "full"]) == 0
    out = tmp_path / "killed"
    for n, kill in enumerate(kills):
        assert launcher([*args, "--output", out, *_again(out)], kill) == -signal.SIGKILL, f"launch {n} at {kill}"
    assert launcher([*args, "--output", out, *_again(out)]) == 0
    for part in ("final", "value") if command == "ppo" else ("final",):
        want, got = final_weights(tmp_path / "full", part), final_weights(out, part)
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want), f"{part} differs after kills at {kills}"
    assert _timeless(read_metrics(out)) == _timeless(read_metrics(tmp_path / "full")), kills
