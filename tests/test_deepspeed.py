"""DeepSpeed ZeRO-2 and ZeRO-3 on two CPU processes: the shipped configs through the real `accelerate launch`.

prefalign drives DeepSpeed's accumulation boundary itself (every forward chunk and micro-batch is one backward,
the step is one `engine.step()`), so a step with several backwards gives the update of one big batch; DeepSpeed
writes its own sharded checkpoint files, resumed on the same number of processes; ZeRO-3's final/ gathers the
whole model. On a CPU, DeepSpeed talks over gloo (prefalign names the backend when there is no GPU).
"""

import json
import shutil
from pathlib import Path

import pytest
from conftest import (
    assert_same_adamw_weights,
    assert_same_tensors,
    checkpointed_chunks,
    chunk_probe,
    final_weights,
    launch,
    launch_failure,
    launch_ok,
    learnable_pairs,
    read_metrics,
    run_here,
    two_process_config,
    uneven_pairs,
    write_jsonl,
)

pytest.importorskip("deepspeed", reason="make install installs deepspeed; a bare environment may not have it")

# `prefalign dpo` whose loss is NaN at step 2 (tests/conftest.py's NaNAt), run alone or under accelerate launch
NAN_WORKER = f"""
import sys

sys.path.insert(0, {str(Path(__file__).parent)!r})
from conftest import nan_at_trainer
from prefalign.cli._args import parse
from prefalign.trainers.dpo import DPOConfig

nan_at_trainer()(parse(DPOConfig, sys.argv[1:], prog="prefalign dpo"), bad_steps=[2]).train()
"""
# `prefalign` itself, after `chunk_probe`'s source
CLI_WORKER = """
import sys

from prefalign.cli import main

sys.exit(main(sys.argv[1:]))
"""
# 2 processes vs 1, same global batch: gradients averaged over processes in float32 and summed in another order
TOL = 1e-5


def _assert_same_losses(a, b, keys=("loss", "eval/loss", "grad_norm"), rel=None):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        for key in keys:
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=rel, abs=TOL), (ra["step"], key)


def test_zero2_dpo_with_chunks_and_accumulation_matches_one_process_and_resumes(tmp_path, tiny_model_dir):
    """4 backwards a step (2 micro-batches x 2 forward chunks): DeepSpeed must step once, on the whole batch's
    gradient, clipped to --max-grad-norm; the checkpoint of step 2 resumes to the same final weights."""
    config = two_process_config("deepspeed_zero2", tmp_path)
    data = write_jsonl(tmp_path / "pairs.jsonl", learnable_pairs(40))
    common = [
        "dpo",
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
        "--save-steps",
        "2",
        "--grad-accum",
        "2",
        "--forward-batch-size",
        "1",
        "--max-grad-norm",
        "0.5",
    ]
    run_here([*common, "--batch-size", "2", "--output", tmp_path / "one"])
    launch_ok([*common, "--batch-size", "1", "--output", tmp_path / "two"], config)  # same global batch: 1 x 2 x 2
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    _assert_same_losses(a, b)
    assert a[1]["grad_norm"] > 0.5  # clipping was active: the logged norm is the one before clipping
    assert a[-2]["loss"] < a[1]["loss"] - 1e-3
    final = final_weights(tmp_path / "two")
    assert_same_tensors(final, final_weights(tmp_path / "one"), TOL)
    assert (tmp_path / "two" / "checkpoints" / "step-0000002" / "deepspeed").is_dir()

    shutil.rmtree(tmp_path / "two" / "checkpoints" / "step-0000004")
    shutil.rmtree(tmp_path / "two" / "final")
    launch_ok([*common, "--batch-size", "1", "--output", tmp_path / "two", "--resume", "latest"], config)
    assert_same_tensors(final_weights(tmp_path / "two"), final, TOL)
    assert read_metrics(tmp_path / "two")[-1]["eval/loss"] == pytest.approx(b[-1]["eval/loss"], abs=TOL)


@pytest.mark.parametrize("command", ["dpo", "reward"])
def test_zero3_lora_dpo_and_reward_write_whole_models(tmp_path, tiny_model_dir, command):
    """ZeRO-3 partitions the parameters: LoRA DPO (reference = the adapter-off policy, through the engine) and a
    reward model give a 1-process run's losses, and final/ gathers the whole model (or adapter)."""
    config = two_process_config("deepspeed_zero3", tmp_path)
    data = write_jsonl(tmp_path / "pairs.jsonl", learnable_pairs(33))
    common = [
        command,
        "--data",
        data,
        "--model",
        tiny_model_dir,
        "--max-steps",
        "3",
        "--precision",
        "fp32",
        "--eval-split",
        "0.28",
        "--lr-scheduler",
        "constant",
    ]
    # weight decay: under zero.Init every weight loads as an empty 1-D tensor, and must still be decayed like a 2-D one
    common += (
        ["--lora-r", "4", "--learning-rate", "1e-2", "--save-steps", "2"]
        if command == "dpo"
        else ["--learning-rate", "1e-3", "--weight-decay", "0.5"]
    )
    run_here([*common, "--batch-size", "4", "--output", tmp_path / "one"])
    launch_ok([*common, "--batch-size", "2", "--output", tmp_path / "two"], config)
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    _assert_same_losses(a, b)
    assert a[-1]["eval/loss"] < a[0]["eval/loss"] - 1e-3
    one, two = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert_same_tensors(two, one, TOL)
    runs = [json.loads((tmp_path / d / "run.json").read_text()) for d in ("one", "two")]
    assert runs[0]["trainable_parameters"] == runs[1]["trainable_parameters"] > 0
    if command == "dpo":
        assert all("lora_" in k for k in two)
        # the LoRA checkpoint holds the adapter, not the frozen base, and resumes to the same adapter
        ckpt = tmp_path / "two" / "checkpoints" / "step-0000002"
        assert sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) < 5e6  # the base alone is ~6.3 MB
        shutil.rmtree(tmp_path / "two" / "checkpoints" / "step-0000003")
        shutil.rmtree(tmp_path / "two" / "final")
        launch_ok([*common, "--batch-size", "2", "--output", tmp_path / "two", "--resume", "latest"], config)
        assert_same_tensors(final_weights(tmp_path / "two"), two, TOL)


@pytest.mark.parametrize("command", ["dpo-lora", "sft"])
def test_zero3_processes_agree_on_the_chunk_count(tmp_path, tiny_model_dir, command):
    """ZeRO-3 all-gathers the partitioned LM head at every call of it, so processes running different numbers of
    chunks would wait in gathers the others never join: without an agreement this run hung (measured, LoRA DPO) at
    the step-0 evaluation (5 and 4 examples a process) and, with no evaluation, in the first training forward:
    chosen completions of 3 to 7 tokens (EOS included) make it 18 and 16 completion tokens, 5 and 4 chunks of 4.
    `completion_logprobs` makes every process run the most chunks any needs, empty ones where it has fewer tokens:
    on 2 ZeRO-3 processes as many chunks are checkpointed on each, some of them empty, and the losses and weights
    are those of 1 process. LoRA DPO: a frozen head; SFT full fine-tuning: the partitioned head trains, its
    gradient reduced from every chunk's recompute, empty ones included."""
    data = write_jsonl(tmp_path / "pairs.jsonl", uneven_pairs(33))
    common = [command.split("-")[0], "--data", data, "--model", tiny_model_dir, "--max-steps", "3"]
    common += ["--precision", "fp32", "--eval-split", "0.28", "--lr-scheduler", "constant", "--learning-rate", "1e-2"]
    if command == "dpo-lora":
        common += ["--lora-r", "4"]
    (tmp_path / "worker.py").write_text(chunk_probe(4) + CLI_WORKER)
    launch_ok([*common, "--batch-size", "4", "--output", tmp_path / "one"], script=tmp_path / "worker.py")
    config = two_process_config("deepspeed_zero3", tmp_path)
    launch_ok([*common, "--batch-size", "2", "--output", tmp_path / "two"], config, script=tmp_path / "worker.py")
    assert checkpointed_chunks(tmp_path / "one", 1)[0] > 0
    two_chunks = checkpointed_chunks(tmp_path / "two", 2)
    assert two_chunks[0] == two_chunks[1] > 0, two_chunks
    assert sum(checkpointed_chunks(tmp_path / "two", 2, "empty")) > 0  # the processes' own counts differed
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    keys = ("loss", "eval/loss", "grad_norm", *(("rewards/margins",) if command == "dpo-lora" else ()))
    assert all(any(key in r for r in a) for key in keys)
    _assert_same_losses(a, b, [k for k in keys if k != "grad_norm"])
    # SFT's full fine-tuning at lr 1e-2: ZeRO-3's gradient norm of ~3 differs from 1 process's by up to 3.5e-5 of it
    # (measured, the same with the head in one call: ZeRO-3's own summation, not the chunks)
    _assert_same_losses(a, b, ["grad_norm"], rel=1e-4 if command == "sft" else None)
    assert a[-1]["eval/loss"] < a[0]["eval/loss"] - 1e-3
    two, one = final_weights(tmp_path / "two"), final_weights(tmp_path / "one")
    assert_same_adamw_weights(two, one, TOL, lr=1e-2, steps=3)  # LoRA DPO: one LoRA B element 2.7e-5 off (AMD EPYC)


@pytest.mark.parametrize(
    "stage,command,needle",
    [
        ("deepspeed_zero3", ["dpo"], "dpo under DeepSpeed ZeRO-3 needs --lora-r"),
        (
            "deepspeed_zero3",
            ["ppo", "--reward", "vader", "--rollout-batch-size", "4"],
            "ppo does not run under DeepSpeed yet",
        ),
        ("deepspeed_zero3", ["sft", "--lora-r", "4", "--merge-lora"], "--merge-lora: under FSDP or ZeRO-3"),
        ("deepspeed_zero0", ["sft"], "DeepSpeed zero_stage 0: prefalign runs ZeRO stages 1-3"),
    ],
)
def test_deepspeed_refuses_what_it_cannot_run(tmp_path, tiny_model_dir, stage, command, needle):
    data = write_jsonl(tmp_path / "pairs.jsonl", learnable_pairs(8))
    flag = "--prompts" if command[0] == "ppo" else "--data"
    config = (
        two_process_config("deepspeed_zero2", tmp_path, zero_stage=0)
        if stage == "deepspeed_zero0"
        else two_process_config(stage, tmp_path)
    )
    size = [] if command[0] == "ppo" else ["--batch-size", "2"]
    r = launch(
        [*command, flag, data, "--model", tiny_model_dir, "--max-steps", "1", *size, "--output", tmp_path / "out"],
        config=config,
    )
    assert r.returncode != 0
    assert f"error: {needle}" in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("stage", ["deepspeed_zero2", "deepspeed_zero3"])
def test_a_nan_step_is_skipped_and_its_gradients_dropped(tmp_path, tiny_model_dir, stage):
    """DeepSpeed steps inside `engine.step()`: a NaN loss (on every process) is caught before it, the step is not
    taken and its gradients are dropped from DeepSpeed's buffers, so the run equals a plain 1-process run that
    skipped the same step (kept NaN gradients would poison the next step)."""
    (tmp_path / "nan_worker.py").write_text(NAN_WORKER)
    data = write_jsonl(tmp_path / "pairs.jsonl", learnable_pairs(16))
    common = [
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
        "--lr-scheduler",
        "constant",
        "--grad-accum",
        "2",
    ]
    if stage == "deepspeed_zero3":
        common += ["--lora-r", "4"]  # ZeRO-3's DPO reference is the adapter-off policy
    for name, config, batch in (("one", None, "2"), ("two", two_process_config(stage, tmp_path), "1")):
        r = launch(
            [*common, "--batch-size", batch, "--output", tmp_path / name],
            config=config,
            script=tmp_path / "nan_worker.py",
        )
        assert r.returncode == 0, launch_failure(r.stderr)
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["skipped_steps"] for r in b] == [0, 1, 1, 1] and "loss" not in b[1]
    _assert_same_losses(a, b)
    assert_same_tensors(final_weights(tmp_path / "two"), final_weights(tmp_path / "one"), TOL)
