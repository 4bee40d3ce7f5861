"""Preflight: before a run or a race writes anything, will its files fit on the disk of ``--output``, and its
models in memory?

A run that cannot fit is refused in one line (`UserError`) before its output directory exists; one whose models
may not fit in memory gets a one-line warning. The estimates are rough on purpose: parameter counts times bytes
per parameter. They count what grows with the model (checkpoints, ``final/``, weights, gradients, AdamW state)
and leave out what does not (metrics, logs, tokenizer files) and activations (they depend on the batch).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from prefalign.errors import UserError
from prefalign.runio import is_launch_main

log = logging.getLogger(__name__)

GIB = 2**30
WEIGHT_BYTES = 4
"""Weights are trained and saved in float32 whatever --precision (bf16 is autocast)."""
CHECKPOINT_BYTES = WEIGHT_BYTES + 8
"""A checkpoint holds each trainable weight and AdamW's two float32 moments."""
TRAINING_BYTES = WEIGHT_BYTES + 4 + 8
"""In memory, each trainable weight has a gradient and AdamW's two moments beside it."""

STAGE_MODELS = {"sft": (1, 0), "dpo": (1, 1), "reward": (1, 0), "ppo": (2, 2)}
"""(trained, frozen) models of a compare stage, each the size of the starting policy: PPO trains a policy and a
value model beside a frozen reference and (as compare runs it) a frozen reward model; DPO a policy beside its
reference (a reference-free variant has none: the estimate errs high). prefs and eval stages train nothing."""


@dataclass(frozen=True)
class TrainedModel:
    """A model a run trains, counted in parameters."""

    trainable: int
    """What the optimizer steps (the adapter under LoRA): in every checkpoint."""
    total: int
    """Every parameter, the adapter included."""
    lora: bool


# -- the estimates (pure) --
def checkpoints_on_disk(save_steps: int | None, save_total_limit: int, total_steps: int | None) -> int:
    """The most checkpoints on disk at once: ``--save-total-limit`` + 1 (the newest is written before the oldest
    is pruned), or as many as the run writes if that is fewer (without ``--save-steps`` only the end's)."""
    written = 1 if not save_steps else (math.ceil(total_steps / save_steps) if total_steps else math.inf)
    return int(min(save_total_limit + 1, written))


def run_disk_bytes(models: list[TrainedModel], checkpoints: int, merge_lora: bool) -> int:
    """What a run writes at most: ``checkpoints`` x the trainable weights and AdamW state of every trained model,
    plus each one's final directory (``final/``; PPO's ``value/``): the whole model, or under LoRA the adapter and,
    with ``--merge-lora``, the merged model (counted for every LoRA model: an upper bound for PPO's value model)."""
    checkpoint = sum(m.trainable for m in models) * CHECKPOINT_BYTES
    final = sum(m.trainable + (m.total - m.trainable) * merge_lora if m.lora else m.total for m in models)
    return checkpoints * checkpoint + final * WEIGHT_BYTES


def training_memory_bytes(models: list[TrainedModel], frozen: int) -> int:
    """Rough peak memory of a run's weights: trainable parameters with their gradients and AdamW moments, the
    frozen ones (a LoRA base, ``frozen`` more: a reference or reward model) as weights alone."""
    trainable = sum(m.trainable for m in models)
    return trainable * TRAINING_BYTES + (sum(m.total for m in models) - trainable + frozen) * WEIGHT_BYTES


def race_bytes(commands: list[str], parameters: int) -> tuple[int, int]:
    """``(disk, memory)`` of a compare race whose stages run ``commands`` one after another on a model of
    ``parameters``: every training stage's final directories stay, while its checkpoint (compare passes no
    --save-steps: only the end's) lives until the stage ends (`prefalign.compare.stages`); the memory is the
    largest stage's."""
    finals = checkpoint = memory = 0
    for command in commands:
        trained, frozen = STAGE_MODELS.get(command, (0, 0))
        models = [TrainedModel(parameters, parameters, lora=False)] * trained
        final = run_disk_bytes(models, checkpoints=0, merge_lora=False)
        finals += final
        checkpoint = max(checkpoint, run_disk_bytes(models, checkpoints=1, merge_lora=False) - final)
        memory = max(memory, training_memory_bytes(models, frozen * parameters))
    return finals + checkpoint, memory


def lora_parameters(model, r: int, targets: list[str]) -> int:
    """Parameters LoRA will add to ``model``: r x (in + out) per adapted linear layer, every one but the output
    layer for all-linear (as peft chooses), else those whose name ends in a target."""
    import torch

    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    count = 0
    for name, module in model.named_modules():
        if (
            isinstance(module, torch.nn.Linear)
            and module is not output
            and (targets == ["all-linear"] or any(name == t or name.endswith("." + t) for t in targets))
        ):
            count += r * (module.in_features + module.out_features)
    return count


# -- what the machine has --
def free_disk_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the disk that holds ``path`` (or would: its nearest existing parent)."""
    where = Path(path).absolute()
    while not where.exists():
        where = where.parent
    return shutil.disk_usage(where).free


def bytes_under(path: str | os.PathLike[str]) -> int:
    """Bytes of the files under ``path`` already (0 if absent): a resumed or overwritten run reuses their space."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):  # removed meanwhile
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def available_memory_bytes(device_type: str = "cpu") -> int | None:
    """Memory the machine can still give: free GPU memory for ``cuda``, else ``MemAvailable`` of /proc/meminfo
    (or psutil's figure); None if unknown."""
    if device_type == "cuda":
        import torch

        return int(torch.cuda.mem_get_info()[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


# -- the checks --
def size(n: int) -> str:
    """``n`` bytes for a message: GiB with one decimal, or MiB below 1 GiB."""
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def check_disk(output: str | os.PathLike, need: int, what: str, fix: str) -> None:
    """Refuse in one line when ``need`` bytes, less what ``output`` holds already, do not fit on its disk."""
    more, free = max(0, need - bytes_under(output)), free_disk_bytes(output)
    if more > free:
        raise UserError(
            f"--output {output}: {what} needs about {size(more)} more on its disk, which has "
            f"{size(free)} free; free some space, choose another --output, or {fix}"
        )


def warn_memory(need: int, loaded: int, what: str, fix: str, device_type: str = "cpu") -> None:
    """A one-line warning when ``need`` bytes exceed the available memory plus ``loaded`` (what this process
    holds of it already)."""
    available = available_memory_bytes(device_type)
    if available is not None and need > available + loaded:
        log.warning(
            "%s may not fit in memory: about %s for weights, gradients and AdamW state (activations not "
            "counted), %s available; %s",
            what,
            size(need),
            size(available + loaded),
            fix,
        )


# -- the entry points --
def held_models(run, device_type: str) -> tuple[list[TrainedModel], int, int]:
    """``(trained models, frozen parameters, bytes already on device_type)`` of what ``run`` holds between its
    `setup` and `build`: every torch module among its attributes and a reward source's ``model``, each parameter
    counted once. The dataset trainers apply LoRA in `build`, so their adapter is estimated (`lora_parameters`)."""
    import torch

    cfg, seen = run.cfg, set[int]()
    trained, frozen, loaded = [], 0, 0
    held = [*vars(run).values(), *(getattr(v, "model", None) for v in vars(run).values())]
    for module in (m for m in held if isinstance(m, torch.nn.Module)):
        params = [p for p in module.parameters() if id(p) not in seen]
        seen.update(id(p) for p in params)
        total = sum(p.numel() for p in params)
        trainable = sum(p.numel() for p in params if p.requires_grad)
        loaded += sum(p.numel() * p.element_size() for p in params if p.device.type == device_type)
        if not trainable:
            frozen += total
        elif cfg.lora_r and not hasattr(module, "peft_config"):
            adapter = lora_parameters(module, cfg.lora_r, cfg.lora_target_modules)
            trained.append(TrainedModel(adapter, total + adapter, lora=True))
        else:
            trained.append(TrainedModel(trainable, total, lora=bool(cfg.lora_r)))
    return trained, frozen, loaded


def preflight_run(run) -> None:
    """A run's checks, after its `setup` and before its output directory exists: refuse if its checkpoints and
    final weights cannot fit on the disk of --output; warn if its models may not fit in memory. On the main
    process only: the others would measure the same machine, and the launcher stops them if it refuses."""
    if not is_launch_main():
        return
    cfg, device_type = run.cfg, run.accelerator.device.type
    trained, frozen, loaded = held_models(run, device_type)
    total_steps = getattr(cfg, "total_steps", None) or getattr(cfg, "max_steps", None)  # before build: if given
    kept = checkpoints_on_disk(cfg.save_steps, cfg.save_total_limit, total_steps)
    check_disk(
        cfg.output,
        run_disk_bytes(trained, kept, cfg.merge_lora),
        f"this run ({kept} checkpoint{'s' * (kept > 1)} and its final weights)",
        "keep fewer checkpoints (--save-total-limit) or train a LoRA adapter (--lora-r)",
    )
    processes = run.world if device_type == "cpu" else 1  # CPU processes share this machine's memory
    warn_memory(
        training_memory_bytes(trained, frozen) * processes,
        loaded * processes,
        "this run",
        "a LoRA adapter (--lora-r) trains far fewer parameters",
        device_type,
    )


def preflight_race(output: str | os.PathLike, commands: list[str], model: str) -> None:
    """A compare race's checks before its output directory exists, for stages running ``commands`` on ``model``:
    refuse if its stages' files cannot fit on the disk of --output; warn if its largest stage may not fit in
    memory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from prefalign.models.loading import resolve_model

    try:
        config = AutoConfig.from_pretrained(resolve_model(model))
    except (OSError, ValueError):
        return  # not readable here: the race stops on it with its own message
    with torch.device("meta"):  # the parameter count without reading (or allocating) a weight
        parameters = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    disk, memory = race_bytes(commands, parameters)
    check_disk(output, disk, f"this race ({len(commands)} stages)", "race fewer --arms or --seeds")
    warn_memory(
        memory, 0, "its largest stage", "race a smaller --model", "cuda" if torch.cuda.is_available() else "cpu"
    )
