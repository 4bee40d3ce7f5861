"""Shared fixtures. Tests never touch a hub: HF_HUB_OFFLINE is forced on."""

import os
import re
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HH_RLHF = SHARED_DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz"
RT_POLARITY = SHARED_DATA / "rt-polarity"


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded default model's tokenizer (converted once per machine, then read from the cache)."""
    from prefalign.models import load_tokenizer

    return load_tokenizer()


@pytest.fixture()
def tiny_model(tokenizer):
    """A fresh 2-layer, hidden-32 random Llama with the default tokenizer."""
    from prefalign.models import tiny_causal_lm

    model, _ = tiny_causal_lm(tokenizer)
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama saved with the default tokenizer: pass it as --model to trainers and CLIs."""
    from prefalign.models import tiny_causal_lm

    path = tmp_path_factory.mktemp("tiny-model")
    model, tok = tiny_causal_lm(tokenizer, layers=2, hidden=32, seed=0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_jsonl(path, rows):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def learnable_pairs(n: int = 48):
    """A preference set a tiny model can learn: chosen always ' good.', rejected always ' bad.'."""
    return [{"prompt": f"Review {i}: the film was", "chosen": " good.", "rejected": " bad."} for i in range(n)]


def uneven_pairs(n: int = 33):
    """`learnable_pairs` whose chosen completions run 3 to 7 tokens (EOS included): consecutive rows differ in
    length, so processes holding different rows hold different numbers of completion tokens."""
    return [
        {"prompt": f"Review {i}: the film was", "chosen": " good" + " and fun" * (i % 3) + ".", "rejected": " bad."}
        for i in range(n)
    ]


def run_cli(*args, timeout=300):
    """Run ``python -m prefalign ARGS`` in a subprocess; returns CompletedProcess (text)."""
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "prefalign", *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env
    )


def read_metrics(out):
    """The rows of a run's metrics.jsonl."""
    import json

    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def read_eval_pairs(out):
    """The rows of a pair trainer's eval_pairs.jsonl (the final evaluation's outcome on each held-out pair)."""
    import json

    return [json.loads(line) for line in (out / "eval_pairs.jsonl").read_text().splitlines()]


def assert_eval_pairs_match(out, trainer, final: dict, accuracy_key: str, margin_key: str):
    """``out/eval_pairs.jsonl`` holds one row per held-out pair of ``trainer``, in order, with its prompt's text, and
    its margins and outcomes average to the final evaluation's ``margin_key`` and ``accuracy_key``."""
    rows = read_eval_pairs(out)
    assert [r["pair"] for r in rows] == list(range(len(trainer.eval_data)))
    assert [r["prompt"] for r in rows] == [item.prompt for _, item in trainer.eval_data]
    assert all(r["prompt"].strip() for r in rows)  # the prompt's text: what compare groups pairs by
    assert all(r["correct"] == (r["margin"] > 0) for r in rows)
    assert sum(r["correct"] for r in rows) / len(rows) == pytest.approx(final[accuracy_key], abs=1e-9)
    assert sum(r["margin"] for r in rows) / len(rows) == pytest.approx(final[margin_key], rel=1e-5, abs=1e-6)


def trainer_kwargs(tmp_path, model_dir, data, **overrides):
    """Config fields of a fast, deterministic dataset-trainer run on a tiny model."""
    base = dict(
        data=str(data),
        model=str(model_dir),
        output=str(tmp_path / "run"),
        batch_size=4,
        max_steps=6,
        learning_rate=1e-3,
        precision="fp32",
        lr_scheduler="constant",
        seed=0,
    )
    return {**base, **overrides}


@pytest.fixture()
def pairs(tmp_path):
    """48 learnable preference pairs in a JSONL file."""
    return write_jsonl(tmp_path / "pairs.jsonl", learnable_pairs(48))


def tiny_reward_model(tokenizer, num_labels=1, seed=0):
    """A tiny random Llama with a ``num_labels`` head (a scalar reward model for 1), the default tokenizer's vocab."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        num_labels=num_labels,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(config).eval()


@pytest.fixture(scope="session")
def tiny_reward_model_dir(tmp_path_factory, tokenizer):
    """`tiny_reward_model` (seed 1) saved with the default tokenizer: a reward model directory for --reward or
    `prefalign.rewards.RewardModel`."""
    path = tmp_path_factory.mktemp("rm")
    tiny_reward_model(tokenizer, seed=1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "accelerate"


def free_port() -> int:
    """A TCP port free on this machine now (the OS picks it), for a launch's rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, config=None, script=None, timeout=600):
    """``prefalign ARGS`` (or ``python SCRIPT ARGS``) in a subprocess: alone, or with ``config`` under
    ``accelerate launch --config_file CONFIG``. Returns the CompletedProcess (text); progress bars off."""
    import subprocess
    import sys

    # PYTHONFAULTHANDLER: a process killed by a signal (an abort in a collective's C++) prints every thread's
    # Python stack, so a failure names where it died
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONFAULTHANDLER": "1"}
    target = [str(script)] if script else ["-m", "prefalign"]
    if config is None:
        cmd = [sys.executable, *target]
    else:
        # A port of its own: launches running at once (pytest -n, or another user's job) must not meet on 29500.
        port = ["--main_process_port", str(free_port())]
        cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(config), *port, *target]
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)


# A line of a failed launch's stderr that names a cause: when one process aborts (a C++ terminate, a glibc check,
# a Python error), its message comes first and the other processes' "connection reset" tracebacks fill the end.
_CAUSE = re.compile(r"terminate called|what\(\)|Abort|abort\(|corrupt|Fatal|Error:|Exception:|Killed|SIG[A-Z]+")


def launch_failure(stderr: str, tail: int = 3000) -> str:
    """A failed launch's stderr for an assertion message: the first 30 lines naming a cause (from any process,
    wherever they are), then its last ``tail`` characters."""
    causes = [line for line in stderr.splitlines() if _CAUSE.search(line)][:30]
    return "causes:\n" + "\n".join(causes) + "\n...\n" + (stderr[-tail:] if tail else "")


def launch_ok(args, config=None, script=None):
    """`launch`, asserting it exited 0 (`launch_failure` in the message)."""
    r = launch(args, config=config, script=script)
    assert r.returncode == 0, launch_failure(r.stderr)
    return r


def run_here(args):
    """``prefalign ARGS`` on 1 process, inside this one (its command's ``main``), asserting it returned 0.

    The 1-process side of a "2 processes give the numbers of 1" test: a launch would spend ~5 s of this machine's
    time importing torch and transformers again, which pytest has done. The 2-process side stays a real launch, and
    tests that check the command line itself (exit codes, stderr, a fresh interpreter) launch it."""
    import importlib

    from prefalign.cli import COMMANDS

    command, *rest = map(str, args)
    assert importlib.import_module(COMMANDS[command][0]).main(rest) == 0


def two_process_config(name, tmp_path, **overrides):
    """The shipped ``examples/accelerate/NAME.yaml`` on 2 CPU processes in fp32, ``overrides`` applied to its
    fsdp_config / deepspeed_config; written into ``tmp_path``, returns its path."""
    import yaml

    config = yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())
    config.update(num_processes=2, mixed_precision="no")
    for section in ("fsdp_config", "deepspeed_config"):
        if section in config:
            config[section].update(overrides)
    path = tmp_path / f"{name}-2cpu.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def chunk_probe(chunk_size: int) -> str:
    """Python source to put at the top of a worker script: `completion_logprobs` runs the LM head in chunks of
    ``chunk_size`` positions (its module's ``CHUNK_SIZE``, read at every call), and each process counts the chunks it
    activation-checkpoints (the chunked path with grad), and of those the empty ones (0 positions: run only to match
    another process's chunk count), and notes the head's class name (``head``), written at exit to
    ``OUTPUT/checkpointed-rankR.json`` (OUTPUT: the launch's ``--output``; read it with `checkpointed_chunks`).
    Processes out of step in a collective hang rather than fail: a watchdog ends the worker with every thread's
    stack on stderr before the launch times out."""
    return f"""
import atexit
import faulthandler
import json
import os
import sys

import prefalign.models.logprobs as logprobs

faulthandler.dump_traceback_later(240, exit=True)
logprobs.CHUNK_SIZE = {chunk_size}
checkpointed = {{"all": 0, "empty": 0}}
plain_checkpoint = logprobs.checkpoint


def counting_checkpoint(fn, head, h, *args, **kwargs):
    checkpointed["all"] += 1
    checkpointed["empty"] += h.shape[0] == 0
    checkpointed["head"] = type(head).__name__
    return plain_checkpoint(fn, head, h, *args, **kwargs)


def write_count(out=sys.argv[sys.argv.index("--output") + 1], rank=os.environ.get("RANK", "0")):
    with open(os.path.join(out, f"checkpointed-rank{{rank}}.json"), "w") as f:
        json.dump(checkpointed, f)


logprobs.checkpoint = counting_checkpoint
atexit.register(write_count)
"""


def checkpointed_chunks(out, processes: int, which: str = "all") -> list:
    """Per process, the chunks a `chunk_probe` worker activation-checkpointed in the run written to ``out``: all of
    them, or (``which="empty"``) the empty ones; ``which="head"``: the head's class name."""
    import json

    return [json.loads((out / f"checkpointed-rank{rank}.json").read_text())[which] for rank in range(processes)]


def final_weights(out, part="final"):
    """``OUT/final``'s (or ``OUT/PART``'s: PPO's value/) weights (model.safetensors, or adapter_model.safetensors
    for LoRA) as a dict of tensors."""
    from safetensors.torch import load_file

    final = out / part
    return load_file(
        final / ("adapter_model.safetensors" if (final / "adapter_config.json").exists() else "model.safetensors")
    )


def assert_same_tensors(a: dict, b: dict, tol: float):
    """Same names, shapes, and values to ``tol`` (absolute)."""
    import torch

    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert torch.allclose(a[k], b[k], atol=tol), (k, (a[k] - b[k]).abs().max().item())


def assert_same_adamw_weights(a: dict, b: dict, tol: float, lr: float, steps: int):
    """Final weights after ``steps`` AdamW steps at ``lr`` from the same start by two summation orders (2 processes
    and 1, or the LM head in chunks and in one call): ``assert_same_tensors`` to ``tol`` except where AdamW divides a
    gradient near its eps (1e-8) by itself. There an update is lr * g / (|g| + eps), whose slope in g is up to lr/eps:
    the float32 rounding of a sum of terms of ~1e-3 (~1e-10) becomes ~1e-5 of lr per step. Measured on an AMD EPYC:
    one element in 1,024 to 1.6M of a tensor, 2.7e-5 after 3 steps at lr 1e-2 and 8.1e-5 at 1e-3, whose updates were
    0.4-0.6 of the lr * steps of the elements around them (unsaturated, so their gradients were near eps). So at most
    one element in 1,000 of a tensor (one in a smaller one) may pass ``tol``, and none by more than 0.05 * lr per step:
    a wrong gradient moves every element of its tensor, a lost one moves an element by lr a step."""
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        diff = (a[k] - b[k]).abs()
        past = int((diff > tol).sum())
        assert past <= max(1, diff.numel() // 1000), (k, past, diff.numel())
        assert diff.max().item() <= 0.05 * lr * steps, (k, diff.max().item())


def params_at_build(trainer_cls):
    """A subclass of ``trainer_cls`` that keeps its model's parameters as `build` leaves them (``.start``: name ->
    tensor; LoRA adapters are added there, so no step has run yet): for "every trainable parameter changed"."""

    class AtBuild(trainer_cls):
        def build(self):
            super().build()
            model = self.accelerator.unwrap_model(self.model)
            self.start = {n: p.detach().clone() for n, p in model.named_parameters()}

    return AtBuild


def nan_at_trainer():
    """The class `NaNAt(cfg, bad_steps)`: a DPOTrainer whose loss is NaN on the given steps (imported lazily)."""
    from prefalign.trainers.dpo import DPOTrainer

    class NaNAt(DPOTrainer):
        """A DPO trainer whose loss is NaN on the given optimizer steps (1-based), in every forward chunk."""

        def __init__(self, cfg, bad_steps):
            super().__init__(cfg)
            self.bad_steps, self.current = set(bad_steps), 0

        def batch_for(self, step, micro):
            self.current = step + 1
            return super().batch_for(step, micro)

        def compute_loss(self, batch):
            loss, stats = super().compute_loss(batch)
            if self.model.training and self.current in self.bad_steps:
                loss = loss * float("nan")
            return loss, stats

    return NaNAt


# A deterministic toy reward, loaded from the CLI as file.py:function: the share of letters in the completion.
TOY_REWARD = """
def score(prompts, completions):
    return [sum(c.isalpha() for c in t) / max(len(t), 1) for t in completions]
"""


def ppo_flags(tmp_path, model_dir):
    """Write 16 prompts and the toy reward into ``tmp_path``; the flags of a small PPO run that 2 processes can
    reproduce exactly (see tests/test_multiprocess.py).

    One minibatch per epoch: with more, each process draws a minibatch's rows from its own shard, so 2 processes
    group the rows into minibatches unlike 1 (see `PPOTrainer.update`) and the updates differ."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"review {i}: the movie was{' really' * (i % 3)}\n" for i in range(16)))
    (tmp_path / "toy_reward.py").write_text(TOY_REWARD)
    # --stop k ends some responses early, so the processes (and micro-batches) hold different numbers of tokens
    return [
        "--prompts",
        prompts,
        "--reward",
        f"{tmp_path / 'toy_reward.py'}:score",
        "--model",
        model_dir,
        "--rollout-batch-size",
        "8",
        "--num-minibatches",
        "1",
        "--max-new-tokens",
        "8",
        "--stop",
        "k",
        "--temperature",
        "1.0",
        "--learning-rate",
        "1e-3",
        "--precision",
        "fp32",
        "--lr-scheduler",
        "constant",
    ]


def assert_resume_is_exact(trainer_class, config_class, tmp_path, model_dir, data, *, cut_at: int, **kw):
    """Train uninterrupted into ``full``; train the same run into ``cut`` and keep only its checkpoints up to step
    ``cut_at`` (an interrupted run), resume it: parameters and every step's loss equal the uninterrupted run's."""
    import json
    import shutil

    import torch

    def trainer(out, **more):
        return trainer_class(
            config_class(**trainer_kwargs(tmp_path, model_dir, data, output=str(tmp_path / out), **kw, **more))
        )

    full = trainer("full")
    full.train()
    trainer("cut").train()
    for ckpt in (tmp_path / "cut" / "checkpoints").glob("step-*"):
        if int(ckpt.name.split("-")[1]) > cut_at:
            shutil.rmtree(ckpt)
    shutil.rmtree(tmp_path / "cut" / "final")
    resumed = trainer("cut", resume="latest")
    resumed.train()
    assert json.loads((tmp_path / "cut" / "run.json").read_text())["resumed_from_step"] == cut_at
    want = dict(full.accelerator.unwrap_model(full.model).named_parameters())
    for name, p in resumed.accelerator.unwrap_model(resumed.model).named_parameters():
        assert torch.equal(p, want[name]), f"{name} differs after resume"
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    steps = list(range(1, kw["max_steps"] + 1))
    assert [r["step"] for r in a] == [r["step"] for r in b] == steps
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
