"""What every runner shares (imported inside each venv: stdlib and torch only, never prefalign or trl).

A runner is one fresh process that sets up one library on one workload, runs ``steps`` optimizer steps
(PPO: iterations; rollout: generate calls) and prints one line ``BENCH_RESULT {json}`` with at least:

    step_seconds   list[float], one per step, warm-up steps included (the aggregator drops them)
    items_per_step int, pairs (dpo, reward), episodes (ppo, grpo: completions) or prompts (rollout) per step
    tokens         list[int], real tokens per step that the MFU estimate counts (see `bench.report`)
    losses         list[float] per step (training workloads)
    extra          dict of workload-specific figures (first-step log-probs, PPO / GRPO time split, ...)
    replay         true on a same-math check run (``--replay``): not timed, only its first-step figures count

and, run with ``--device cuda`` (`emit`): ``device``, ``gpu`` (its name), ``peak_gpu_bytes``
(``torch.cuda.max_memory_allocated``: tensors' peak) and ``peak_gpu_reserved_bytes`` (the caching allocator's).
On a GPU every time mark waits for the device first (`now`): kernels run asynchronously, and a clock read
without it would time their launches, not the step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

RESULT_PREFIX = "BENCH_RESULT "
WORKLOADS = ("dpo", "dpo_lora", "reward", "ppo", "grpo", "rollout8", "rollout16")
PRECISIONS = ("fp32", "bf16")

# One config for both sides; each runner maps it onto its library's own names.
HPARAMS = {
    "batch_size": 8,  # pairs per optimizer step (dpo, reward); rollout batch (ppo); completions per step (grpo)
    "max_length": 256,  # dpo/reward: the data holds only pairs that fit untruncated
    "beta": 0.1,
    "lr_dpo": 1e-6,
    "lr_dpo_lora": 1e-4,
    "lr_reward": 1e-5,
    "lr_ppo": 3e-6,
    "lr_grpo": 1e-6,  # TRL's GRPOConfig default
    "num_generations": 4,  # grpo: K completions per prompt, so batch_size / K = 2 prompts per step
    "lora_r": 16,
    "lora_alpha": 32,
    "max_grad_norm": 1.0,
    "max_new_tokens": 40,
    "temperature": 0.7,
    "kl_coef": 0.05,
    "seed": 0,
}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", required=True, choices=WORKLOADS)
    ap.add_argument("--precision", required=True, choices=PRECISIONS)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--data", required=True, help="the prepared inputs (bench.prepare)")
    ap.add_argument("--work", required=True, help="a scratch directory for this run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="where the models run (cuda: the first visible GPU; its peak memory is reported)",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="what-if experiments only (never in the race): override a config field of this side",
    )
    ap.add_argument("--exp", action="append", default=[], help="what-if experiments only: named patches")
    ap.add_argument(
        "--replay",
        default=None,
        metavar="ROLLOUTS_JSON",
        help="grpo same-math check (TRL side): score and train on these recorded completions instead of "
        "sampling (bench.common.save_rollouts wrote them)",
    )
    args = ap.parse_args(argv)
    args.overrides = dict(_kv(x) for x in args.set)
    return args


def _kv(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def length_reward(prompts, completions, **kwargs) -> list[float]:
    """The grpo race's reward, called by both sides: the completion's length in characters.

    Deterministic and nearly free, so the race times the trainers, not a judge. Both libraries call it on the
    same decoded text (``skip_special_tokens=True``): prefalign as ``--reward bench.common:length_reward``
    (positional ``prompts, completions``), TRL as a reward function (keywords, plus extra columns in
    ``kwargs``). Its spread within a group (tens of characters) also keeps the two libraries' different
    GRPO std epsilons (prefalign 1e-6, TRL 1e-4) below 1e-5 of the advantages.
    """
    return [float(len(c)) for c in completions]


def save_rollouts(path: Path, steps: list[dict]) -> None:
    """The completions a grpo run trained on, one dict per step (``prompt_ids``, ``completion_ids``: a list per
    row, the completion up to and including its first EOS), for the other side's ``--replay``."""
    path.write_text(json.dumps(steps))


def load_rollouts(path: str) -> list[dict]:
    return json.loads(Path(path).read_text())


def setup_process(threads: int, device: str = "cpu") -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device cuda: torch {torch.__version__} sees no CUDA device")
    torch.set_num_threads(threads)
    torch.manual_seed(HPARAMS["seed"])


def sync(device: str) -> None:
    """Wait until the device has run every kernel queued so far (a no-op on the CPU)."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def now(device: str = "cpu") -> float:
    """``time.perf_counter()`` once the device's queued work is done: a time mark that counts the kernels."""
    sync(device)
    return time.perf_counter()


def trl_training_args(precision: str, device: str = "cpu") -> dict:
    """The ``TrainingArguments`` fields every TRL runner shares: the race's AdamW (betas 0.9 / 0.999, no weight
    decay), linear decay without warmup, clipping, precision, no gradient checkpointing (TRL's configs default to
    it on, prefalign's to off), a log row every step, nothing saved or reported, progress bars off."""
    return dict(
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        max_grad_norm=HPARAMS["max_grad_norm"],
        bf16=precision == "bf16",
        gradient_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=device == "cpu",
        seed=HPARAMS["seed"],
        disable_tqdm=True,
    )


def model_path(data: str) -> str:
    """The raced causal LM's local HF directory (written by bench.prepare)."""
    return (Path(data) / "model_path.txt").read_text().strip()


def prefalign_model(data: str) -> dict:
    """The ``model=`` a prefalign config gets: none for the default (the configs' own default, as the race always
    ran), the prepared directory for a random model (`bench.models`)."""
    info = Path(data) / "model.json"
    if info.exists() and json.loads(info.read_text())["name"] != "default":
        return {"model": model_path(data)}
    return {}


def load_pairs(data: str) -> list[dict]:
    with (Path(data) / "pairs.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def load_prefixes(data: str) -> list[str]:
    return [line for line in (Path(data) / "prefixes.txt").read_text(encoding="utf-8").splitlines() if line]


def pair_tokens_per_step(pairs: list[dict], batch: int, steps: int) -> list[int]:
    """Real (unpadded) tokens of the 2N rows of each step when pairs are read in file order."""
    out = []
    for s in range(steps):
        chunk = pairs[s * batch : (s + 1) * batch]
        out.append(sum(2 * len(r["ids"][0]) + len(r["ids"][1]) + len(r["ids"][2]) for r in chunk))
    return out


def real_response_tokens(response_ids, eos_ids: list[int]) -> int:
    """Tokens up to and including each row's first EOS (all of them when it has none)."""
    import torch

    is_eos = torch.isin(response_ids, torch.tensor(eos_ids, device=response_ids.device))
    before = torch.cumsum(is_eos.long(), 1) - is_eos.long()
    return int((before == 0).sum())


class StepClock:
    """Wall time between marks: ``start()`` once, then ``mark()`` at the end of every step (`now` on ``device``)."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.t0 = None
        self.marks: list[float] = []

    def start(self) -> None:
        self.t0 = now(self.device)

    def mark(self) -> None:
        self.marks.append(now(self.device))

    def seconds(self) -> list[float]:
        out, prev = [], self.t0
        for m in self.marks:
            out.append(m - prev)
            prev = m
        return out


def emit(result: dict, device: str = "cpu") -> None:
    import torch

    result.setdefault("threads", torch.get_num_threads())
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
        if peak == 0:  # a runner that left its model on the CPU would otherwise pass for a GPU run
            raise SystemExit("--device cuda: this run allocated no GPU memory; its models stayed on the CPU")
        result.update(
            device="cuda",
            gpu=torch.cuda.get_device_name(),
            peak_gpu_bytes=peak,
            peak_gpu_reserved_bytes=torch.cuda.max_memory_reserved(),
        )
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()


def quiet() -> None:
    """Progress bars and info logs off: their output is not what we time."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
