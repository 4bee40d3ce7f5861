"""The backend seam: plain, DDP, FSDP2 and DeepSpeed ZeRO-1/2/3 behind one small interface.

A trainer holds its trainable models as `Trained` (the model, the engine that trains it, its optimizer and
schedule) and asks the `Backend` to prepare them, run backward with the accumulation boundary, take the clipped
and guarded optimizer step, gather whole-model state dicts and save or load checkpoints. `AccelerateBackend`
covers one process, DDP and FSDP (accelerate does the wrapping and the all-reduces), `DeepSpeedBackend` drives
DeepSpeed's engine, which steps, clips and zeroes inside itself.
A trainer reads at most the backend's capability flags (``deepspeed``, ``zero3``, ``sharded``) to refuse a launch
it cannot run or to choose what to hold (no sampling copy of a sharded policy); its step goes through the methods.
"""

from __future__ import annotations

import math
import os
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prefalign.collectives import process_max
from prefalign.errors import UserError
from prefalign.trainers.checkpoint import (
    CheckpointManager,
    full_model_state,
    load_training_state,
    training_state,
    without_tied_aliases,
)
from prefalign.trainers.embedding_grad import sparse_embedding_backward


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(accelerator) -> torch.dtype | None:
    """The dtype ``accelerator.autocast()`` computes matmuls in, or None where it does not autocast (fp32; under
    DeepSpeed, whose engine runs bf16 itself): accelerate autocasts exactly when it set ``native_amp``."""
    if not getattr(accelerator, "native_amp", False):
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)


def resolve_precision(precision: str) -> str:
    """'fp32' or 'bf16' (what accelerate calls 'no' / 'bf16')."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


def make_accelerator(precision: str):
    """An ``Accelerator`` for one run at ``precision`` ('fp32' or 'bf16').

    accelerate keeps a process-wide AcceleratorState that refuses a second mixed-precision setting, yet
    the Python API may run several trainers in one process (fp32 then bf16); each run starts from a fresh
    AcceleratorState. The distributed PartialState (process group) is kept.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)  # private API: no public way to do this
    mixed = "bf16" if precision == "bf16" else "no"
    # `accelerate launch` with a DeepSpeed config sets this for every process
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        from accelerate.utils import InitProcessGroupKwargs

        # not cpu=True, which makes accelerate drop DeepSpeed without a word; without a GPU the process group
        # must be named gloo, or every process believes it is alone
        handlers = [] if torch.cuda.is_available() else [InitProcessGroupKwargs(backend="gloo")]
        acc = Accelerator(mixed_precision=mixed, kwargs_handlers=handlers)
        stage = acc.state.deepspeed_plugin.zero_stage
        if stage not in (1, 2, 3):
            raise UserError(
                f"DeepSpeed zero_stage {stage}: prefalign runs ZeRO stages 1-3 (stage 0 reports no "
                "gradient norm and applies non-finite steps); use DDP (examples/accelerate/ddp.yaml) "
                "for no sharding"
            )
        return acc
    # Without a GPU, say cpu=True: under torchrun (`accelerate launch --multi_gpu --num_processes N`) that
    # makes accelerate join a gloo process group on the CPU instead of silently running N copies alone.
    return Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available())


class Forward(torch.nn.Module):
    """Runs ``fn(model, *args)`` as its own forward.

    Training forwards call the backbone and a head directly (to skip logits nobody needs), which a
    DDP/FSDP/DeepSpeed wrapper around the model would never see. Wrapping this module instead puts
    every training forward through ``accelerate``'s wrapper, so gradients are synchronised.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, fn, *args, **kwargs):
        return fn(self.model, *args, **kwargs)


@dataclass
class Trained:
    """One trainable model and what trains it.

    ``model`` is the plain (or peft) model: sampling, checkpoints, ``final/``. ``engine`` is `Forward` around it
    as the backend prepared it: every forward that needs gradients goes through it, so a DDP/FSDP/DeepSpeed
    wrapper sees it. ``name`` keys its files in a checkpoint (``model.pt`` + ``optimizer.pt``, or ``policy.pt`` +
    ``policy_optimizer.pt`` ...).
    """

    name: str
    model: Any
    engine: Any
    optimizer: Any
    scheduler: Any
    sharded: bool = False
    sparse_embeddings: list = field(default_factory=list)  # what `sparse_embedding_backward` set, to undo

    def forward(self, fn, *args, **kwargs):
        """``fn(model, *args)`` with gradients, through the engine."""
        return self.engine(fn, *args, **kwargs)

    def frozen_forward(self, fn, *args, model=None, **kwargs):
        """``fn(model, *args)`` for a no-gradient forward: on the plain ``model`` (default: this one; or its
        sampling copy), or through the engine when parameters are sharded, where only the sharded root gathers
        the weights (a collective); a sharded model has no whole copy, so ``model`` is then not used."""
        if self.sharded:
            return self.engine(fn, *args, **kwargs)
        return fn(self.model if model is None else model, *args, **kwargs)

    def key(self, what: str) -> str:
        """Checkpoint file stem of ``what`` ('optimizer' or 'scheduler')."""
        return what if self.name == "model" else f"{self.name}_{what}"


def inner_optimizer(optimizer):
    """The torch optimizer inside accelerate's wrapper (for state dicts)."""
    return getattr(optimizer, "optimizer", optimizer)


def param_ndim(p: torch.Tensor) -> int:
    """Dimensions of a parameter; a ZeRO-3 parameter loaded under zero.Init is an empty 1-D tensor whose
    real shape is ``ds_shape``."""
    return len(getattr(p, "ds_shape", p.shape))


def param_numel(p: torch.Tensor) -> int:
    return getattr(p, "ds_numel", p.numel())


def whole_parameters(params: list):
    """A context in which DeepSpeed ZeRO-3's partitioned ``params`` are whole, and what the main process writes
    into them is kept (loaded under ZeRO-3, a new head is partitioned: writing its empty local shard would do
    nothing); a no-op for ordinary parameters."""
    if not any(hasattr(p, "ds_id") for p in params):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


class AccelerateBackend:
    """One process, DDP or FSDP2: accelerate wraps the engines and all-reduces (or reduce-scatters) gradients."""

    deepspeed = False

    def __init__(self, accelerator):
        from accelerate.utils import DistributedType

        self.acc = accelerator
        self.sharded = accelerator.distributed_type == DistributedType.FSDP
        self.zero3 = False

    @property
    def name(self) -> str:
        return "fsdp" if self.sharded else ("ddp" if self.acc.num_processes > 1 else "single")

    def configure(self, micro_batch: int, max_grad_norm: float | None) -> None:
        """Sizes the backend must know before `prepare` (DeepSpeed's micro-batch and clipping)."""

    def prepare(self, name: str, model, optimizer, scheduler) -> Trained:
        """Wrap ``model`` (in `Forward`) and its optimizer; one model per call (accelerate's FSDP2 path takes one
        model at a time)."""
        engine, optimizer = self.acc.prepare(Forward(model), optimizer)
        check_still_tied(model)
        sparse = sparse_embedding_backward(model) if self.name == "single" else []
        return Trained(name, model, engine, optimizer, scheduler, sharded=self.sharded, sparse_embeddings=sparse)

    def accumulate(self, models: list[Trained], boundary: bool):
        """A context for a forward and backward of ``models`` that all-reduces gradients only at the accumulation
        ``boundary`` (the last backward before a step); the others only accumulate."""
        if boundary:
            return nullcontext()
        stack = ExitStack()
        for t in models:
            stack.enter_context(self.acc.no_sync(t.engine))
        return stack

    def backward(self, trained: Trained, loss: torch.Tensor, boundary: bool) -> None:
        self.acc.backward(loss)

    def step(self, models: list[Trained], max_grad_norm: float | None, losses_finite: bool) -> tuple[list[float], bool]:
        """Clip each model's gradients, then step every optimizer and schedule only if every gradient norm is
        finite and ``losses_finite`` holds on every process; gradients are zeroed either way.
        Returns ``(pre-clip gradient norms, stepped)``. The decision is agreed across processes (one small gather)
        because a caller's losses may be local (PPO's are); the dataset step passes an already global one."""
        norms = [self.acc.clip_grad_norm_(t.engine.parameters(), max_grad_norm or float("inf")) for t in models]
        # the norms come from all-reduced gradients (the same everywhere); a loss may be local: agree on one branch
        local = losses_finite and all(math.isfinite(float(n)) for n in norms)
        finite = process_max(int(not local), self.acc.device) == 0
        for t in models:
            if finite:
                t.optimizer.step()
                t.scheduler.step()
            t.optimizer.zero_grad(set_to_none=True)
        return [float(n) for n in norms], finite

    def full_state(self, trained: Trained) -> dict | None:
        """Every weight of the model, unsharded, on the main process; None when the model's own state dict is
        whole (a collective when sharded)."""
        return full_model_state(trained.model) if self.sharded else None

    def checkpoint_objects(
        self, models: list[Trained], ckpts: CheckpointManager, step: int
    ) -> tuple[dict, Path | None]:
        """``(objects, staging dir or None)``: each model's trainable weights and optimizer state, unsharded and
        keyed by name (collectives under FSDP)."""
        objects = {}
        for t in models:
            objects[t.name], objects[t.key("optimizer")] = training_state(t.model, inner_optimizer(t.optimizer))
        return objects, None

    def load_checkpoint(self, models: list[Trained], path: Path, objects: dict) -> None:
        for t in models:
            load_training_state(
                t.model, inner_optimizer(t.optimizer), objects[t.name], objects[t.key("optimizer")], path
            )

    def check_resumable(self, path: Path, state: dict) -> None:
        if (path / DEEPSPEED_TAG).is_dir():
            raise UserError(
                f"{path}: written with DeepSpeed; resume it under the same kind of launch (DeepSpeed "
                "checkpoints hold DeepSpeed's own sharded optimizer files)"
            )


DEEPSPEED_TAG = "deepspeed"
"""Under DeepSpeed a checkpoint holds DeepSpeed's own sharded files in this subdirectory (resume needs the same
number of processes), beside prefalign's scheduler, RNG and state."""


class DeepSpeedBackend(AccelerateBackend):
    """DeepSpeed ZeRO-1/2/3: prefalign sets the accumulation boundary of each backward; the engine clips, steps and
    zeroes in one call. One trainable model (PPO, with two, refuses DeepSpeed)."""

    deepspeed = True

    def __init__(self, accelerator):
        super().__init__(accelerator)
        self.zero3 = accelerator.state.deepspeed_plugin.zero_stage == 3
        self.sharded = self.zero3

    @property
    def name(self) -> str:
        return f"deepspeed-zero{self.acc.state.deepspeed_plugin.zero_stage}"

    def configure(self, micro_batch: int, max_grad_norm: float | None) -> None:
        """prefalign drives DeepSpeed's accumulation boundary itself (forward chunks and micro-batches alike), so
        DeepSpeed sees one micro-batch per step, and clips to --max-grad-norm: the config's own values are
        replaced."""
        ds = self.acc.state.deepspeed_plugin.deepspeed_config
        ds.update(
            train_micro_batch_size_per_gpu=micro_batch,
            gradient_accumulation_steps=1,
            train_batch_size=micro_batch * self.acc.num_processes,
            gradient_clipping=max_grad_norm or 0.0,
        )

    def accumulate(self, models: list[Trained], boundary: bool):
        return nullcontext()  # the boundary set in `backward` decides when DeepSpeed reduces

    def backward(self, trained: Trained, loss: torch.Tensor, boundary: bool) -> None:
        # DeepSpeed reduces the gradients at the boundary we set (not at its own count of backwards)
        trained.engine.set_gradient_accumulation_boundary(boundary)
        trained.engine.backward(loss, scale_wrt_gas=False)

    def step(self, models: list[Trained], max_grad_norm: float | None, losses_finite: bool) -> tuple[list[float], bool]:
        """A non-finite loss is caught before the engine's step and the step not taken (its gradients dropped); a
        non-finite gradient, which ZeRO detects itself, shows as a step it did not apply."""
        [t] = models
        finite_loss = process_max(int(not losses_finite), self.acc.device) == 0
        if not finite_loss:
            t.engine.zero_grad()
            zero = getattr(t.engine.optimizer, "zero_grad", None)  # DeepSpeed keeps gradients in its own buffers
            if zero is not None:
                zero(set_to_none=True)
            return [float("nan")], False
        t.engine.step()
        norm = t.engine.get_global_grad_norm()
        norm = float("nan") if norm is None else float(norm)
        stepped = bool(t.engine.was_step_applied()) and math.isfinite(norm)
        if stepped:
            t.scheduler.step()
        return [norm], stepped

    def full_state(self, trained: Trained) -> dict | None:
        if not self.zero3:
            return None
        try:  # a collective; needs the config's zero3_save_16bit_model: true
            state = self.acc.get_state_dict(trained.engine)
        except ValueError as e:  # accelerate: the gather is off in the config
            raise UserError(
                f"final/ under ZeRO-3: {e}; set zero3_save_16bit_model: true in the accelerate config"
            ) from None
        # the main process gets the weights (keyed through `Forward`), the others None
        return without_tied_aliases(trained.model, {k.removeprefix("model."): v for k, v in (state or {}).items()})

    def checkpoint_objects(
        self, models: list[Trained], ckpts: CheckpointManager, step: int
    ) -> tuple[dict, Path | None]:
        """DeepSpeed's own format: each process writes its shards of the optimizer state into a staging directory
        the main process created."""
        [t] = models
        into = ckpts.staging_dir(step, create=self.acc.is_main_process)
        self.acc.wait_for_everyone()
        # trainable weights only (a LoRA checkpoint is the adapter, as on the other paths)
        t.engine.save_checkpoint(str(into), tag=DEEPSPEED_TAG, exclude_frozen_parameters=True)
        return {}, into

    def load_checkpoint(self, models: list[Trained], path: Path, objects: dict) -> None:
        [t] = models
        # not strict: the checkpoint holds the trainable weights only (frozen ones come from --model)
        t.engine.load_checkpoint(
            str(path),
            tag=DEEPSPEED_TAG,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
            load_module_strict=False,
        )

    def check_resumable(self, path: Path, state: dict) -> None:
        processes = self.acc.num_processes
        if not (path / DEEPSPEED_TAG).is_dir():
            raise UserError(
                f"{path}: written without DeepSpeed; resume it under the same kind of launch (DeepSpeed "
                "checkpoints hold DeepSpeed's own sharded optimizer files)"
            )
        if state.get("processes", processes) != processes:
            raise UserError(
                f"{path}: written by {state['processes']} DeepSpeed processes; resume it on as many (its "
                f"optimizer state is sharded {state['processes']} ways), not {processes}"
            )


def make_backend(precision: str) -> AccelerateBackend:
    """The accelerator for this launch, behind the backend that fits it."""
    from accelerate.utils import DistributedType

    acc = make_accelerator(precision)
    if acc.distributed_type == DistributedType.DEEPSPEED:
        return DeepSpeedBackend(acc)
    return AccelerateBackend(acc)


def check_still_tied(model) -> None:
    """Refuse a model whose tied input/output embeddings came apart in ``accelerator.prepare`` (FSDP2 with
    cpu_ram_efficient_loading does this): training would silently update two copies."""
    from prefalign.models import base_model

    base = base_model(model)
    out = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if out is None or not getattr(base.config, "tie_word_embeddings", False):
        return
    if out.weight is not base.get_input_embeddings().weight:
        raise UserError(
            "the model's tied input/output embeddings were untied while preparing it for distributed "
            "training; with FSDP set fsdp_cpu_ram_efficient_loading: false in the accelerate config"
        )


def check_mergeable(backend: AccelerateBackend, merge_lora: bool) -> None:
    if merge_lora and backend.sharded:
        raise UserError(
            "--merge-lora: under FSDP or ZeRO-3 the model is sharded over the processes and cannot be "
            "merged in place; drop the flag (final/ holds the adapter) and merge it on one process "
            "afterwards (peft: PeftModel.from_pretrained(base, 'final').merge_and_unload())"
        )
