"""`accelerate launch --multi_gpu --num_processes 2` on the CPU (gloo): same global batch, same losses."""

import json
import shutil
from pathlib import Path

import pytest
from conftest import (
    EXAMPLES,
    launch,
    launch_failure,
    launch_ok,
    learnable_pairs,
    ppo_flags,
    read_eval_pairs,
    read_metrics,
    run_here,
    write_jsonl,
)

CPU_CONFIG = EXAMPLES / "cpu-2proc.yaml"
# Tolerance: the 2-process gradient is the mean of two half-batch means, all-reduced in float32;
# the summation order differs from the 1-process mean, so values agree to float32 rounding, not bitwise.
TOL = 1e-5


@pytest.mark.parametrize("command", ["sft", "dpo", "reward"])
def test_two_processes_give_the_losses_of_one(tmp_path, tiny_model_dir, command):
    data = write_jsonl(tmp_path / "pairs.jsonl", learnable_pairs(40))
    common = [
        command,
        "--data",
        data,
        "--model",
        tiny_model_dir,
        "--max-steps",
        "4",
        "--learning-rate",
        "1e-3",
        "--precision",
        "fp32",
        "--eval-split",
        "0.2",
        "--lr-scheduler",
        "constant",
    ]
    run_here([*common, "--batch-size", "4", "--output", tmp_path / "one"])
    launch_ok([*common, "--batch-size", "2", "--output", tmp_path / "two"], CPU_CONFIG)  # same global batch: 2 x 2
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "eval/loss"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], abs=TOL), (ra["step"], key)
    assert len([r for r in a if "loss" in r]) == 4
    assert (tmp_path / "two" / "final" / "config.json").is_file()
    if command == "sft":  # no pairs to rank
        assert not (tmp_path / "one" / "eval_pairs.jsonl").exists()
        return
    # each held-out pair's final margin, gathered from both processes' shards into the eval set's order
    one, two = read_eval_pairs(tmp_path / "one"), read_eval_pairs(tmp_path / "two")
    assert len(one) == 8 and [(r["pair"], r["prompt"]) for r in two] == [(r["pair"], r["prompt"]) for r in one]
    assert [r["margin"] for r in two] == pytest.approx([r["margin"] for r in one], abs=TOL)


def ppo_and_save(argv):
    """`prefalign ppo ARGV` (the CLI's own parse and trainer), then this process's trainable parameters of the
    policy and value model into ``OUTPUT/params-rankR.pt`` (only the main process writes final/)."""
    import torch

    from prefalign.cli._args import parse
    from prefalign.trainers.ppo import PPOConfig, PPOTrainer

    def trainable(model):
        return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}

    cfg = parse(PPOConfig, [str(a) for a in argv], prog="prefalign ppo")
    trainer = PPOTrainer(cfg)
    trainer.train()
    torch.save(
        {"policy": trainable(trainer.policy), "value": trainable(trainer.value)},
        f"{cfg.output}/params-rank{trainer.accelerator.process_index}.pt",
    )


# Two processes that each run PPO on half of every rollout batch: the real launcher and gloo, running
# `ppo_and_save`, so the test can check that DDP kept both copies identical and compare them with a 1-process run
# (`ppo_and_save` in this process). Processes out of step (one skips a collective the other waits in) hang rather
# than fail: the watchdog ends the worker with every thread's stack on stderr well before the launch timeout.
PPO_WORKER = f"""
import faulthandler
import sys

sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_multiprocess import ppo_and_save

faulthandler.dump_traceback_later(240, exit=True)
ppo_and_save(sys.argv[1:])
"""

# Tolerance of 2 processes vs 1: keyed sampling draws the same tokens, each process weights its token means by
# its share of the minibatch's tokens (so DDP's average is the 1-process token mean, responses of any lengths),
# and whitening uses statistics of both shards. What is left is float32 rounding (forwards over other batch
# shapes, sums in another order), carried through 2 updates. Measured over the 3 iterations: at most 6e-8
# relative on scores, 1e-7 on ratio, 5e-8 on the value loss and the summed entropy (~65 nats); 5e-7 absolute on
# the policy loss, a mean of whitened advantages that nearly cancels (~0.01), so an absolute floor is needed.
PPO_REL, PPO_ABS = 1e-5, 1e-5


def _ppo_flags(tmp_path, model_dir):
    """`ppo_flags` (prompts, toy reward) plus the worker, written into ``tmp_path``."""
    (tmp_path / "ppo_worker.py").write_text(PPO_WORKER)
    return ppo_flags(tmp_path, model_dir)


def _run_ppo(tmp_path, processes, name, flags):
    """The worker on ``processes`` processes into ``tmp_path / name``; its metrics.jsonl rows."""
    if processes == 1:
        ppo_and_save([*flags, "--output", tmp_path / name])
    else:
        launch_ok([*flags, "--output", tmp_path / name], CPU_CONFIG, script=tmp_path / "ppo_worker.py")
    return read_metrics(tmp_path / name)


def _params(out, rank):
    import torch

    return torch.load(out / f"params-rank{rank}.pt")


def _assert_two_match_one(tmp_path, a, b, steps):
    """Metrics rows ``b`` of the 2-process run ``two`` equal rows ``a`` of ``one``; so do the parameters."""
    import torch

    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, steps + 1))
    for ra, rb in zip(a, b, strict=True):
        for key in (
            "objective/scores",
            "objective/kl",
            "objective/entropy",
            "loss/policy",
            "loss/value",
            "policy/approxkl",
            "val/ratio",
            "val/explained_variance",
            "val/response_length",
        ):
            assert rb[key] == pytest.approx(ra[key], rel=PPO_REL, abs=PPO_ABS), (ra["step"], key)
        assert rb["val/num_eos"] == ra["val/num_eos"] and rb["episodes"] == ra["episodes"]
    lengths = [r["val/response_length"] for r in a]
    assert any(0 < r["val/num_eos"] < 8 for r in a) and any(x != int(x) for x in lengths), lengths
    assert json.loads((tmp_path / "two" / "run.json").read_text())["processes"] == 2
    # DDP saw every training forward: both processes end with the same parameters, bit for bit,
    # and with the parameters of the 1-process run, to float rounding
    one = _params(tmp_path / "one", 0)
    rank0, rank1 = (_params(tmp_path / "two", r) for r in (0, 1))
    for part in ("policy", "value"):
        assert rank0[part].keys() == rank1[part].keys() == one[part].keys()
        for name, p in rank0[part].items():
            assert torch.equal(p, rank1[part][name]), (part, name)
            assert torch.allclose(p, one[part][name], atol=1e-5), (part, name)
    return rank0


def test_ppo_two_processes_give_the_losses_of_one(tmp_path, tiny_model_dir):
    import torch

    common = [*_ppo_flags(tmp_path, tiny_model_dir), "--max-steps", "3", "--ppo-epochs", "2"]
    a = _run_ppo(tmp_path, 1, "one", common)
    b = _run_ppo(tmp_path, 2, "two", [*common, "--save-steps", "2"])
    params = _assert_two_match_one(tmp_path, a, b, steps=3)
    assert (tmp_path / "two" / "final" / "config.json").is_file() and (tmp_path / "two" / "value").is_dir()

    # resume: the main process wrote the checkpoint of iteration 2, both processes load it and end exactly where
    # the uninterrupted run ended
    shutil.rmtree(tmp_path / "two" / "checkpoints" / "step-0000003")
    c = _run_ppo(tmp_path, 2, "two", [*common, "--save-steps", "2", "--resume", "latest"])
    assert [r["step"] for r in c] == [1, 2, 3] and c[:2] == b[:2]
    for key in ("objective/scores", "objective/kl", "loss/policy", "loss/value", "kl_coef"):
        assert c[2][key] == b[2][key], key
    for r in (0, 1):
        again = _params(tmp_path / "two", r)
        for part in ("policy", "value"):
            for name, p in params[part].items():
                assert torch.equal(again[part][name], p), (r, part, name)


@pytest.mark.parametrize("variant", ["lora", "grad-accum", "early-stop-kl"])
def test_ppo_variants_on_two_processes_give_the_losses_of_one(tmp_path, tiny_model_dir, variant):
    flags = {
        # the reference is the policy with its adapter off, on each process; only adapters and the value head train
        "lora": ["--ppo-epochs", "2", "--lora-r", "4", "--learning-rate", "1e-2"],
        # 2 micro-batches per minibatch (DDP's no_sync on the first), made of other rows than on 1 process
        "grad-accum": ["--ppo-epochs", "2", "--grad-accum", "2"],
        # approx KL after each epoch of iteration 1, measured: 0, 0.0021, 0.0078 (stop: epoch 4 never runs); of
        # iteration 2: 0, 0.0005, 0.0029 (stop). After epoch 2 of iteration 1, process 0's own rows alone give
        # 0.0028 and process 1's 0.0015: a process deciding on its local KL would stop there and leave the other
        # waiting in DDP's all-reduce
        "early-stop-kl": ["--ppo-epochs", "4", "--early-stop-kl", "0.0025"],
    }[variant]
    common = [*_ppo_flags(tmp_path, tiny_model_dir), "--max-steps", "2", *flags]
    a = _run_ppo(tmp_path, 1, "one", common)
    b = _run_ppo(tmp_path, 2, "two", common)
    params = _assert_two_match_one(tmp_path, a, b, steps=2)
    if variant == "lora":
        assert all("lora_" in name for name in params["policy"]), list(params["policy"])
        assert b[1]["objective/kl"] > 1e-3  # 0.0056: the adapter moved the policy away from the adapter-off reference
    if variant == "early-stop-kl":
        # every iteration stopped after epoch 3, on both processes (one stopping alone would hang; a different
        # epoch would change the parameters)
        assert [r.get("policy/early_stopped") for r in a] == [r.get("policy/early_stopped") for r in b] == [1.0, 1.0]


def test_ppo_refuses_a_batch_the_processes_cannot_share(tmp_path, tiny_model_dir):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\nc\nd\n")
    r = launch(
        [
            "ppo",
            "--prompts",
            prompts,
            "--reward",
            "vader",
            "--model",
            tiny_model_dir,
            "--max-steps",
            "1",
            "--rollout-batch-size",
            "3",
            "--output",
            tmp_path / "ppo",
        ],
        config=CPU_CONFIG,
    )
    assert r.returncode != 0
    assert "error: --rollout-batch-size 3 must be divisible by --num-minibatches x --grad-accum x processes" in r.stderr
    assert not (tmp_path / "ppo").exists()


RESUME_NAN_WORKER = f"""
import sys

sys.path.insert(0, {str(Path(__file__).parent)!r})
from conftest import nan_at_trainer
from prefalign.cli._args import parse
from prefalign.trainers.dpo import DPOConfig

bad, argv = sys.argv[1], sys.argv[2:]
steps = [int(b) for b in bad.split(",") if b.isdigit()]  # "none": no bad step
nan_at_trainer()(parse(DPOConfig, argv, prog="prefalign dpo"), bad_steps=steps).train()
"""


def test_a_resume_between_rows_then_only_skipped_steps_logs_on_two_processes(tmp_path, tiny_model_dir):
    """Resumed from a checkpoint between log rows (step 3, rows every 4): the saved stats go to the main process,
    and a non-finite step 4 adds nothing, so only the main process held the stats' keys and the row's all-reduce was
    called by it alone: the launch hung. Every process now holds the keys (the others at zero)."""
    (tmp_path / "worker.py").write_text(RESUME_NAN_WORKER)
    data = write_jsonl(tmp_path / "pairs.jsonl", learnable_pairs(16))
    flags = ["--data", data, "--model", tiny_model_dir, "--max-steps", "4", "--save-steps", "3"]
    flags += ["--logging-steps", "4", "--save-total-limit", "5", "--batch-size", "2", "--precision", "fp32"]
    flags += ["--output", tmp_path / "run"]
    launch_ok(["none", *flags], CPU_CONFIG, script=tmp_path / "worker.py")
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-0000004")
    shutil.rmtree(tmp_path / "run" / "final")
    r = launch(["4", *flags, "--resume", "latest"], CPU_CONFIG, script=tmp_path / "worker.py", timeout=180)
    assert r.returncode == 0, launch_failure(r.stderr)
    last = read_metrics(tmp_path / "run")[-1]
    assert last["step"] == 4 and last["skipped_steps"] == 1 and "loss" in last  # steps 1-3's mean, carried over


def test_a_nan_loss_on_one_process_skips_the_step_on_every_process(tmp_path, tiny_model_dir):
    """Step 2's loss is NaN on process 1 only: both processes skip it (the guard reads the loss summed over
    processes, and the all-reduced gradient's norm; either alone skips it: checked), so the run ends with the
    weights of a 1-process run whose step 2 is NaN for every example."""
    from conftest import assert_same_tensors, final_weights, nan_at_trainer

    from prefalign.cli._args import parse
    from prefalign.trainers.dpo import DPOConfig

    worker = RESUME_NAN_WORKER.replace(
        "bad, argv = sys.argv[1], sys.argv[2:]",
        "bad, argv = sys.argv[1], sys.argv[2:]\nimport os\nbad = bad if os.environ['RANK'] == '1' else 'none'",
    )
    (tmp_path / "worker.py").write_text(worker)
    data = write_jsonl(tmp_path / "pairs.jsonl", learnable_pairs(16))
    flags = ["--data", data, "--model", tiny_model_dir, "--max-steps", "3", "--logging-steps", "1"]
    flags += ["--learning-rate", "1e-3", "--lr-scheduler", "constant", "--precision", "fp32"]
    launch_ok(
        ["2", *flags, "--batch-size", "2", "--output", tmp_path / "two"], CPU_CONFIG, script=tmp_path / "worker.py"
    )
    one = [*map(str, flags), "--batch-size", "4", "--output", str(tmp_path / "one")]
    nan_at_trainer()(parse(DPOConfig, one, prog="prefalign dpo"), bad_steps=[2]).train()
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["skipped_steps"] for r in b] == [r["skipped_steps"] for r in a] == [0, 1, 1]
    assert_same_tensors(final_weights(tmp_path / "one"), final_weights(tmp_path / "two"), TOL)
