"""What-if runs behind BENCHMARKS.md's "what would move it": one workload, a few variants of one side's
config (``--set``) or code (``--exp``), each a fresh process measured like the race (wait4 peak RSS, the
step times after warm-up). Not part of ``make bench``.

    python -m bench.levers dpo-memory        # prefalign DPO full fp32: baseline, gradient checkpointing,
                                             # precompute_ref, 2 x 4 pairs, fused AdamW; TRL with its default
                                             # gradient checkpointing
    python -m bench.levers dpo-chunks        # prefalign DPO full fp32: the 8 pairs of a step forwarded as
                                             # 8, 2 or 1 pair(s) at a time (grad accumulation: same math)
    python -m bench.levers reward-memory     # prefalign reward fp32: lean activations and longest-first chunks,
                                             # each off, both off (the step before them), 1 pair per forward
    python -m bench.levers reward-bf16-speed # prefalign reward bf16: as raced, lean activations off, 2 and 4
                                             # pairs per forward; TRL 1.16 (A B C D E E D C B A)
    python -m bench.levers reward-embedding-grad  # prefalign reward fp32 (dpo-, ppo-embedding-grad: DPO, PPO fp32):
                                             # the input embedding's sparse backward vs dense
    python -m bench.levers ppo-bf16-policy-first  # prefalign PPO bf16 (ppo-fp32-policy-first: fp32): the policy
                                             # stepped before the value model's forward vs both after both backwards
    python -m bench.levers reward-norm-outputs  # prefalign reward fp32 (dpo-, ppo-norm-outputs: DPO, PPO fp32): the
                                             # RMSNorm outputs rebuilt from the norms' inputs vs kept by the GEMMs
    python -m bench.levers ppo-optimizer     # prefalign PPO fp32: baseline vs fused AdamW
    python -m bench.levers ppo-sampler-copy  # prefalign PPO bf16 (grpo-sampler-copy: GRPO bf16): the bf16 sampling
                                             # copy's weights freed during the update (as raced) vs kept
    python -m bench.levers adamw             # one AdamW step over 134.5M parameters: for-loop, foreach, fused
    python -m bench.levers held-activations  # what one fp32 training forward of the default model leaves for its
                                             # backward, per token and layer: transformers' forwards vs lean
"""

from __future__ import annotations

import json
import statistics
import sys
import time

from bench import envs, report
from bench.__main__ import ensure_data, run_one, wait_for_quiet

_BEFORE = ["--set", "lean_activations=false", "--exp", "chunks_in_data_order"]
"""The reward and DPO steps before the lean activations and the longest-first forward chunks."""


def _there_and_back(runs: list[tuple[str, str, list[str]]]) -> list[tuple[str, str, list[str]]]:
    """``runs`` in order, then in reverse (A B C C B A): a drift through the study lands on every variant alike."""
    return runs + runs[::-1]


def _raced_against(raced: str, label: str, exp: str) -> list[tuple[str, str, list[str]]]:
    """prefalign as raced against one ``--exp`` what-if, in the order A B B A."""
    return _there_and_back([("prefalign", f"as raced: {raced}", []), ("prefalign", label, ["--exp", exp])])


STUDIES = {
    "dpo-memory": (
        "dpo",
        "fp32",
        3,
        [
            ("prefalign", "as raced", []),
            ("prefalign", "fused AdamW", ["--exp", "fused_adamw"]),
            ("prefalign", "gradient checkpointing", ["--set", "gradient_checkpointing=true"]),
            ("prefalign", "precompute_ref", ["--set", "precompute_ref=true"]),
            ("prefalign", "4 pairs x grad_accum 2", ["--set", "batch_size=4", "--set", "grad_accum=2"]),
            ("trl", "as raced", []),
            ("trl", "TRL default gradient_checkpointing=True", ["--set", "gradient_checkpointing=true"]),
        ],
    ),
    "lora-memory": (
        "dpo_lora",
        "fp32",
        3,
        [
            ("prefalign", "as raced", []),
            ("prefalign", "gradient checkpointing", ["--set", "gradient_checkpointing=true"]),
            ("prefalign", "4 pairs x grad_accum 2", ["--set", "batch_size=4", "--set", "grad_accum=2"]),
            ("trl", "as raced", []),
            ("trl", "TRL default gradient_checkpointing=True", ["--set", "gradient_checkpointing=true"]),
        ],
    ),
    "dpo-chunks": (
        "dpo",
        "fp32",
        3,
        [
            ("prefalign", "as raced", []),
            ("prefalign", "2 pairs x grad_accum 4", ["--set", "batch_size=2", "--set", "grad_accum=4"]),
            ("prefalign", "1 pair x grad_accum 8", ["--set", "batch_size=1", "--set", "grad_accum=8"]),
            (
                "prefalign",
                "1 pair x grad_accum 8 + fused AdamW",
                ["--set", "batch_size=1", "--set", "grad_accum=8", "--exp", "fused_adamw"],
            ),
            ("prefalign", "as raced", []),
            (
                "prefalign",
                "1 pair x grad_accum 8 + fused AdamW",
                ["--set", "batch_size=1", "--set", "grad_accum=8", "--exp", "fused_adamw"],
            ),
            ("trl", "as raced", []),
        ],
    ),
    "reward-memory": (
        "reward",
        "fp32",
        4,
        [
            ("prefalign", "as raced", []),
            ("prefalign", "before: transformers' forwards, chunks in data order", _BEFORE),
            ("prefalign", "1 pair per forward", ["--set", "forward_batch_size=1"]),
            ("prefalign", "transformers' forwards", ["--set", "lean_activations=false"]),
            ("prefalign", "chunks in data order", ["--exp", "chunks_in_data_order"]),
            ("prefalign", "1 pair per forward", ["--set", "forward_batch_size=1"]),
            ("prefalign", "before: transformers' forwards, chunks in data order", _BEFORE),
            ("prefalign", "as raced", []),
        ],
    ),
    "reward-bf16-speed": (
        "reward",
        "bf16",
        4,
        _there_and_back(
            [
                ("prefalign", "as raced", []),
                ("prefalign", "transformers' forwards", ["--set", "lean_activations=false"]),
                ("prefalign", "2 pairs per forward", ["--set", "forward_batch_size=2"]),
                ("prefalign", "4 pairs per forward", ["--set", "forward_batch_size=4"]),
                ("trl", "as raced", []),
            ]
        ),
    ),
    **{
        f"{workload}-sampler-copy": (
            workload,
            "bf16",
            3,
            _raced_against(
                "the copy freed during the update", "the copy kept through the update", "keep_sampling_copy"
            ),
        )
        for workload in ("ppo", "grpo")
    },
    **{
        f"{workload}-embedding-grad": (
            workload,
            precision,
            steps,
            _raced_against("sparse embedding backward", "dense embedding backward", "dense_embedding_backward"),
        )
        for workload, precision, steps in (("reward", "fp32", 3), ("dpo", "fp32", 3), ("ppo", "fp32", 4))
    },
    **{
        f"ppo-{precision}-policy-first": (
            "ppo",
            precision,
            4,
            _raced_against(
                "the policy stepped before the value forward", "both stepped after both backwards", "joint_ppo_step"
            ),
        )
        for precision in ("fp32", "bf16")
    },
    **{
        f"{workload}-norm-outputs": (
            workload,
            "fp32",
            steps,
            _raced_against(
                "norm outputs rebuilt from the norms' inputs",
                "norm outputs kept by the projections",
                "norm_outputs_kept",
            ),
        )
        for workload, steps in (("reward", 4), ("dpo", 3), ("ppo", 4))
    },
    "ppo-optimizer": (
        "ppo",
        "fp32",
        3,
        [
            ("prefalign", "as raced", []),
            ("prefalign", "fused AdamW", ["--exp", "fused_adamw"]),
            ("prefalign", "as raced", []),
            ("prefalign", "fused AdamW", ["--exp", "fused_adamw"]),
        ],
    ),
}


def adamw_micro(threads: int = 2, steps: int = 5) -> None:
    """One AdamW step over the default model's 134.5M fp32 parameters: torch's default (on CPU the
    per-tensor for-loop), ``foreach=True`` and ``fused=True`` (the transformers / TRL default)."""
    import torch
    from transformers import AutoModelForCausalLM

    from bench.common import model_path

    torch.set_num_threads(threads)
    params = list(AutoModelForCausalLM.from_pretrained(model_path(str(envs.BENCH_DIR / "data"))).parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    for kw in ({}, {"foreach": True}, {"fused": True}):
        opt = torch.optim.AdamW(params, lr=1e-6, **kw)
        opt.step()  # state allocation
        secs = []
        for _ in range(steps):
            t = time.perf_counter()
            opt.step()
            secs.append(time.perf_counter() - t)
        print(
            f"AdamW {kw or 'default (for-loop on CPU)'}: median {statistics.median(secs):.3f} s "
            f"({', '.join(f'{s:.3f}' for s in secs)})",
            flush=True,
        )
        del opt


def held_activations(rows: int = 2, length: int = 256) -> None:
    """What one training forward of the default model (float32, ``rows`` x ``length`` random tokens, as a causal
    LM) leaves allocated for its backward (the logits not counted), per token and decoder layer, with transformers'
    forwards and with prefalign's lean ones: torch's profiler, the bytes allocated and not freed while the output
    is held."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from bench.common import model_path
    from prefalign.models.lean import lean_activations

    stock = AutoModelForCausalLM.from_pretrained(model_path(str(envs.BENCH_DIR / "data")))
    lean = copy.deepcopy(stock)
    lean_activations(lean)
    ids = torch.randint(0, stock.config.vocab_size, (rows, length), generator=torch.Generator().manual_seed(0))
    per = rows * length * stock.config.num_hidden_layers * 4
    for name, model in (("transformers' forwards", stock), ("lean activations", lean)):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            out = model(input_ids=ids)
        held = sum(e.self_cpu_memory_usage for e in prof.events()) - out.logits.nbytes  # the output is not kept
        del out
        print(f"{name}: {held / 2**20:.1f} MiB held for the backward, {held / per:,.0f} floats per token and layer")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "adamw":
        ensure_data(print)
        return adamw_micro()
    if argv and argv[0] == "held-activations":
        ensure_data(print)
        return held_activations()
    if not argv or argv[0] not in STUDIES:
        raise SystemExit(f"usage: python -m bench.levers {{{','.join(STUDIES)},adamw,held-activations}}")
    workload, precision, steps, variants = STUDIES[argv[0]]
    ensure_data(print)
    out = envs.BENCH_DIR / "levers" / f"{argv[0]}-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    rows = ["| side | variant | s/step (timed steps) | peak RSS GiB | first loss |", "|---|---|---|---|---|"]
    for i, (side, label, extra) in enumerate(variants):
        busy = wait_for_quiet(30, print)
        r = run_one(workload, side, precision, steps, 2, out, i, busy, extra)
        secs = report.timed(r["step_seconds"], 1)
        (out / "raw.jsonl").open("a").write(json.dumps({**r, "variant": label}) + "\n")
        split = r.get("extra", {}).get("split")
        if split:  # PPO: the phases a lever may move
            phase = {
                k: statistics.median(report.timed(split[k], 1))
                for k in ("generation", "logprobs", "update")
                if k in split
            }
            label += " (" + ", ".join(f"{k} {v:.2f} s" for k, v in phase.items()) + ")"
        rows.append(
            f"| {side} | {label} | {statistics.median(secs):.2f} ({', '.join(f'{s:.1f}' for s in secs)}) "
            f"| {r['peak_rss_kib'] / report.GIB:.2f} | {r['losses'][0] if r.get('losses') else '–'} |"
        )
        print(rows[-1], flush=True)
    print("\n".join(rows))
    (out / "table.md").write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
