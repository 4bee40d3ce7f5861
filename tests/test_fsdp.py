"""FSDP on two CPU processes: the shipped FSDP config, sharded training, unsharded checkpoints and final/.

accelerate runs FSDP only on accelerators: on a machine without a GPU it turns an FSDP launch into plain CPU data
parallel. The worker below takes accelerate's FSDP code path anyway (torch's FSDP2 works on the CPU over gloo): it
builds the plugin from the environment `accelerate launch --config_file fsdp.yaml` sets, and marks the state as
FSDP, so `accelerator.prepare` shards the model with `fully_shard` exactly as it does on GPUs. What is not tested
here is NCCL and GPU memory; what is, is everything prefalign does differently under sharding: collective state
dicts for checkpoints and final/, equal numbers of forwards on every process (forward chunks, evaluation), and the
reference forward of a LoRA policy going through the sharded root.
"""

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from conftest import (
    assert_same_adamw_weights,
    assert_same_tensors,
    checkpointed_chunks,
    chunk_probe,
    final_weights,
    launch,
    launch_failure,
    learnable_pairs,
    ppo_flags,
    read_metrics,
    run_here,
    two_process_config,
    uneven_pairs,
    write_jsonl,
)

WORKER = """
import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

import prefalign.trainers.backend as backend

make_accelerator = backend.make_accelerator


def make_fsdp_accelerator(precision):
    acc = make_accelerator(precision)
    PartialState().distributed_type = AcceleratorState().distributed_type = DistributedType.FSDP
    AcceleratorState().fsdp_plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* variables
    return acc


backend.make_accelerator = make_fsdp_accelerator
from prefalign.cli import main

sys.exit(main(sys.argv[1:]))
"""
# 2 sharded processes vs 1 plain one, same global batch: the gradient is reduce-scattered in float32 and summed
# in another order, so losses and parameters agree to float32 rounding (measured: ~1e-7 on losses)
TOL = 1e-5


@pytest.fixture
def fsdp(tmp_path):
    """``run(args, ok=True, prelude="", **fsdp_config)``: the CLI on 2 FSDP processes (the shipped config on 2 CPU
    processes, fp32; ``fsdp_config`` overrides its fsdp_config keys), the worker's code after ``prelude`` (source
    run first, such as `chunk_probe`'s). Asserts success unless ``ok=False``."""

    def run(args, ok=True, prelude="", **fsdp_config):
        (tmp_path / "fsdp_worker.py").write_text(prelude + WORKER)
        config = two_process_config("fsdp", tmp_path, **fsdp_config)
        output = Path(args[args.index("--output") + 1])
        fresh = not output.exists()
        r = launch(args, config=config, script=tmp_path / "fsdp_worker.py")
        if ok and r.returncode != 0 and "SIGABRT" in r.stderr and fresh:
            # FSDP2 over gloo on CPU is this file's stand-in for GPUs (accelerate runs FSDP only on accelerators).
            # One process of one launch aborted (SIGABRT, the other's gloo connection reset) in one CI run of the
            # last 12 (~85 FSDP launches); 70 local repeats of that launch, idle and under load, did not. The abort
            # is reported as a warning with its causes and the launch runs once more from scratch: every check
            # below applies to the rerun, and a second abort fails the test.
            warnings.warn(f"FSDP launch aborted, rerun once: {launch_failure(r.stderr)}", stacklevel=2)
            shutil.rmtree(output, ignore_errors=True)
            r = launch(args, config=config, script=tmp_path / "fsdp_worker.py")
        if ok:
            assert r.returncode == 0, launch_failure(r.stderr)
        return r

    return run


def test_fsdp_dpo_matches_one_process_and_resumes(tmp_path, tiny_model_dir, fsdp):
    """Full fine-tuning DPO (a frozen reference model beside the sharded policy): losses and final weights of one
    process; the unsharded checkpoint resumes on 2 sharded processes and on 1 plain one, ending where it ended."""
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
        "--forward-batch-size",
        "1",
    ]  # 2 forwards a micro-batch: the no_sync path under FSDP
    run_here([*common, "--batch-size", "4", "--output", tmp_path / "one"])
    fsdp([*common, "--batch-size", "2", "--output", tmp_path / "two"])
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "eval/loss", "rewards/margins"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], abs=TOL), (ra["step"], key)
    assert a[-2]["loss"] < a[1]["loss"] - 1e-3  # it learned something the comparison can see
    assert json.loads((tmp_path / "two" / "run.json").read_text())["processes"] == 2
    final = final_weights(tmp_path / "two")
    assert_same_tensors(final, final_weights(tmp_path / "one"), TOL)  # whole tensors, not the main process's shard
    ckpt = torch.load(tmp_path / "two" / "checkpoints" / "step-0000004" / "model.pt")
    assert {k: v.shape for k, v in ckpt.items() if k in final} == {k: final[k].shape for k in ckpt if k in final}

    # resume from step 2: on 2 sharded processes, and the same checkpoint on 1 plain process
    for name, run in (("two", fsdp), ("plain", None)):
        out = tmp_path / name
        if run is None:
            shutil.copytree(tmp_path / "two" / "checkpoints", out / "checkpoints")
        shutil.rmtree(out / "checkpoints" / "step-0000004")
        shutil.rmtree(out / "final", ignore_errors=True)
        args = [*common, "--output", out, "--resume", "latest"]
        fsdp([*args, "--batch-size", "2"]) if run else run_here([*args, "--batch-size", "4"])
        assert_same_tensors(final_weights(out), final, TOL)
        assert read_metrics(out)[-1]["eval/loss"] == pytest.approx(b[-1]["eval/loss"], abs=TOL)


@pytest.mark.parametrize("command", ["dpo", "reward"])
def test_fsdp_lora_and_reward_write_whole_models(tmp_path, tiny_model_dir, fsdp, command):
    """LoRA DPO (the adapter of a sharded policy; the reference is the same sharded weights with the adapter off)
    and a reward model (backbone + scalar head) under FSDP: losses and final/ equal a 1-process run's; eval on 9
    examples (5 + 4 per process) is the mean over the 9."""
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
    # LoRA needs the larger rate to move in 3 steps; at 1e-2 full fine-tuning's parameters drift past TOL (1e-5).
    # --precompute-ref: the adapter-off reference runs before any policy forward has gathered the sharded root
    lora = ["--lora-r", "4", "--learning-rate", "1e-2", "--precompute-ref"]
    common += lora if command == "dpo" else ["--learning-rate", "1e-3"]
    run_here([*common, "--batch-size", "4", "--output", tmp_path / "one"])
    fsdp([*common, "--batch-size", "2", "--output", tmp_path / "two"])
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert json.loads((tmp_path / "two" / "run.json").read_text())["eval_examples"] == 9
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "eval/loss"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], abs=TOL), (ra["step"], key)
    assert a[-1]["eval/loss"] < a[0]["eval/loss"] - 1e-3
    if command == "dpo":
        one, two = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
        assert one and all("lora_" in k for k in two)
        assert_same_tensors(two, one, TOL)
    else:
        assert_same_tensors(final_weights(tmp_path / "two"), final_weights(tmp_path / "one"), TOL)


def test_fsdp_refuses_embeddings_untied_by_ram_efficient_loading(tmp_path, tiny_model_dir, fsdp):
    """accelerate's FSDP2 loading with cpu_ram_efficient_loading unties tied input/output embeddings (the tiny
    Llama, like SmolLM2, ties them): training would update two copies. A clear error, not a silent divergence."""
    data = write_jsonl(tmp_path / "pairs.jsonl", learnable_pairs(8))
    r = fsdp(
        [
            "sft",
            "--data",
            data,
            "--model",
            tiny_model_dir,
            "--max-steps",
            "1",
            "--batch-size",
            "2",
            "--precision",
            "fp32",
            "--output",
            tmp_path / "out",
        ],
        ok=False,
        fsdp_cpu_ram_efficient_loading=True,
    )
    assert r.returncode != 0
    assert (
        "error: the model's tied input/output embeddings were untied while preparing it for distributed "
        "training; with FSDP set fsdp_cpu_ram_efficient_loading: false"
    ) in r.stderr
    assert not (tmp_path / "out").exists()


# the PPO metrics of 2 processes that must be those of 1 (see tests/test_multiprocess.py for why they can be)
PPO_KEYS = (
    "objective/scores",
    "objective/kl",
    "objective/entropy",
    "loss/policy",
    "loss/value",
    "policy/approxkl",
    "val/ratio",
    "val/explained_variance",
    "val/response_length",
)


@pytest.mark.parametrize("lora", [False, True])
def test_fsdp_ppo_matches_one_process(tmp_path, tiny_model_dir, fsdp, lora):
    """PPO with a sharded policy and value model: generation decodes in step on both processes (synced) through
    the sharded root, old/reference log-probs and values too; same scores, KL and losses as 1 process, and final/
    and value/ hold the same whole weights. LoRA: the reference is the sharded policy with its adapter off."""
    flags = ppo_flags(tmp_path, tiny_model_dir)
    # seed 5, 12 new tokens: in iteration 2 process 0's responses all stop by token 7 while process 1's run to 12
    # (measured), so an unsynced decode would leave process 1 alone in 5 sharded forwards
    flags[flags.index("--max-new-tokens") + 1] = "12"
    common = [
        "ppo",
        *flags,
        "--seed",
        "5",
        "--max-steps",
        "2",
        "--ppo-epochs",
        "2",
        *(["--lora-r", "4", "--learning-rate", "1e-2"] if lora else []),
    ]
    run_here([*common, "--output", tmp_path / "one"])
    fsdp([*common, "--output", tmp_path / "two"])
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2]
    for ra, rb in zip(a, b, strict=True):
        for key in PPO_KEYS:
            assert rb[key] == pytest.approx(ra[key], rel=TOL, abs=TOL), (ra["step"], key)
        assert rb["val/num_eos"] == ra["val/num_eos"]
    if lora:
        # the adapter moved the policy away from its adapter-off reference (k1, a mean of log-ratios: either sign)
        assert abs(b[1]["objective/kl"]) > 1e-3
    for part in ("final", "value"):
        assert_same_tensors(final_weights(tmp_path / "two", part), final_weights(tmp_path / "one", part), TOL)


@pytest.mark.parametrize("command", ["dpo", "dpo-head-unit", "ppo-lora"])
def test_fsdp_chunked_logprobs_match_one_chunk(tmp_path, tiny_model_dir, tokenizer, fsdp, command):
    """The LM head in chunks of a few positions (the path of batches past `CHUNK_SIZE` completion tokens), each
    chunk checkpointed and recomputed in backward while the policy is sharded: the losses, metrics and whole final
    weights of the same 2-process run with the head in one call. The processes hold different numbers of completion
    tokens (dpo: chosen completions of different lengths; ppo: responses stop at different lengths). dpo: full
    fine-tuning, the (tied) head trains; ppo with LoRA: the head is frozen, an entropy bonus takes the entropy's
    gradient through the chunks too. In both the head belongs to the root unit (a plain Linear): the processes run
    different numbers of chunks. dpo-head-unit: an untied head that the wrap policy makes an FSDP unit of its own,
    which gathers its weight at every call and reduce-scatters after every call's backward (without agreeing on the
    chunk count the worker hangs): the processes run as many chunks, the one with fewer tokens some empty ones."""
    wrap = {}
    if command == "dpo-head-unit":
        tiny_model_dir = untied_model_dir(tmp_path / "untied", tokenizer)
        wrap = {"fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer,Linear"}
    if command.startswith("dpo"):
        data = write_jsonl(tmp_path / "pairs.jsonl", uneven_pairs(33))
        args = ["dpo", "--data", data, "--model", tiny_model_dir, "--max-steps", "3", "--batch-size", "2"]
        args += ["--learning-rate", "1e-3", "--precision", "fp32", "--eval-split", "0.2", "--lr-scheduler", "constant"]
        keys, parts, chunk = ("loss", "eval/loss", "rewards/margins", "grad_norm"), ("final",), 3
    else:
        flags = ppo_flags(tmp_path, tiny_model_dir)
        flags[flags.index("--max-new-tokens") + 1] = "12"  # seed 5: responses of unequal lengths (the test above)
        args = ["ppo", *flags, "--seed", "5", "--max-steps", "2", "--ppo-epochs", "2", "--lora-r", "4"]
        args += ["--learning-rate", "1e-2", "--ent-coef", "0.01"]
        keys, parts, chunk = PPO_KEYS, ("final", "value"), 5
    fsdp([*args, "--output", tmp_path / "one-chunk"], prelude=chunk_probe(1024), **wrap)
    fsdp([*args, "--output", tmp_path / "chunked"], prelude=chunk_probe(chunk), **wrap)
    assert checkpointed_chunks(tmp_path / "one-chunk", 2) == [0, 0]
    own_unit = command == "dpo-head-unit"
    assert checkpointed_chunks(tmp_path / "chunked", 2, "head") == ["FSDPLinear" if own_unit else "Linear"] * 2
    chunks = checkpointed_chunks(tmp_path / "chunked", 2)
    empty = checkpointed_chunks(tmp_path / "chunked", 2, "empty")
    real = [c - e for c, e in zip(chunks, empty)]
    # chunks with positions in them, measured: dpo 16 and 18, ppo 22 and 26
    assert min(real) > 0 and real[0] != real[1], (chunks, empty)
    if own_unit:
        assert chunks[0] == chunks[1], chunks
    else:  # the root gathered the head's weight once: no agreement, no empty chunks
        assert empty == [0, 0], empty
    a, b = read_metrics(tmp_path / "one-chunk"), read_metrics(tmp_path / "chunked")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    assert all(any(key in r for r in a) for key in keys)
    for ra, rb in zip(a, b, strict=True):
        for key in keys:
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=TOL, abs=TOL), (ra["step"], key)
    for part in parts:
        chunked, one_chunk = final_weights(tmp_path / "chunked", part), final_weights(tmp_path / "one-chunk", part)
        if command.startswith("dpo"):  # full fine-tuning: one element of a tensor up to 8.1e-5 off (AMD EPYC)
            assert_same_adamw_weights(chunked, one_chunk, TOL, lr=1e-3, steps=3)
        else:
            assert_same_tensors(chunked, one_chunk, TOL)


def untied_model_dir(path, tokenizer):
    """A tiny random Llama like ``tiny_model_dir`` with its LM head untied from the input embeddings."""
    from transformers import AutoModelForCausalLM

    from prefalign.models import tiny_causal_lm

    model, tok = tiny_causal_lm(tokenizer, layers=2, hidden=32, seed=0, tied=False)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    loaded = AutoModelForCausalLM.from_pretrained(path)
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight  # stays untied through save and load
    return path
