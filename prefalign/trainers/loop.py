"""The training loop every dataset trainer (sft, dpo, reward) runs on.

A trainer subclass says what the model, data and loss are; this loop does the rest, once:
accelerate (so ``accelerate launch`` scales it), AdamW with warmup and a schedule, gradient
accumulation and clipping, bf16 autocast, LoRA, deterministic data order, atomic checkpoints with
exact resume, periodic evaluation, ``metrics.jsonl`` + TensorBoard, a progress bar and ``final/``.

Data order is a pure function of (seed, epoch, step), so resuming needs only the step count: step
``s`` of epoch ``e`` reads a fixed slice of ``randperm(n, seed + e)``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prefalign.errors import UserError
from prefalign.runio import prepare_output_dir, run_in_output_dir, write_config, write_json
from prefalign.trainers.checkpoint import (
    DEEPSPEED_TAG,
    CheckpointManager,
    full_deepspeed_state,
    full_model_state,
    is_deepspeed,
    is_sharded,
    is_zero3,
    load_deepspeed_state,
    load_training_state,
    rng_state,
    set_rng_state,
    training_state,
    zero_deepspeed_gradients,
)
from prefalign.trainers.config import TrainConfig
from prefalign.trainers.dist import max_across_processes, pooled_mean_across_processes, sum_across_processes
from prefalign.trainers.guard import GracefulStop, NonFiniteGuard
from prefalign.trainers.lora import apply_lora
from prefalign.trainers.metrics import MetricsLogger, RunningMean

log = logging.getLogger(__name__)


FORWARD_POSITIONS = 512
"""Auto forward chunks on CPU: padded positions (rows x length) per forward."""


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


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
            raise UserError(f"DeepSpeed zero_stage {stage}: prefalign runs ZeRO stages 1-3 (stage 0 reports no "
                            "gradient norm and applies non-finite steps); use DDP (examples/accelerate/ddp.yaml) "
                            "for no sharding")
        return acc
    # Without a GPU, say cpu=True: under torchrun (`accelerate launch --multi_gpu --num_processes N`) that
    # makes accelerate join a gloo process group on the CPU instead of silently running N copies alone.
    return Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available())


def configure_deepspeed(acc, micro_batch: int, max_grad_norm: float | None) -> None:
    """prefalign drives DeepSpeed's accumulation boundary itself (forward chunks and micro-batches alike), so
    DeepSpeed sees one micro-batch per step, and clips to --max-grad-norm: the config's own values are replaced."""
    ds = acc.state.deepspeed_plugin.deepspeed_config
    ds.update(train_micro_batch_size_per_gpu=micro_batch, gradient_accumulation_steps=1,
              train_batch_size=micro_batch * acc.num_processes, gradient_clipping=max_grad_norm or 0.0)


def exact_div(a: int, b: int, what: str) -> int:
    if a % b:
        raise UserError(f"{what}: {a} is not divisible by {b}")
    return a // b


def lr_lambda(kind: str, warmup: int, total: int):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / (warmup + 1)  # never exactly 0: the first step must move the weights
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def make_optimizer(model, cfg, learning_rate: float, total_steps: int):
    """AdamW over the trainable parameters (no decay on biases and norms) and its LR schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    # a ZeRO-3 parameter loaded under zero.Init is an empty 1-D tensor: its shape is ds_shape
    ndim = {id(p): len(getattr(p, "ds_shape", p.shape)) for p in params}
    groups = [{"params": [p for p in params if ndim[id(p)] >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if ndim[id(p)] < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]  # LoRA has no 1-D weights; DeepSpeed drops empty groups
    # the fused kernel steps all tensors at once: 8x faster than the default per-tensor loop on CPU for a 135M model
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    optimizer = torch.optim.AdamW(groups, lr=learning_rate, betas=tuple(cfg.adam_betas), fused=fused or None)
    schedule = lr_lambda(cfg.lr_scheduler, cfg.warmup_steps, total_steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def inner_optimizer(optimizer):
    """The torch optimizer inside accelerate's wrapper (for state dicts)."""
    return getattr(optimizer, "optimizer", optimizer)


@dataclass
class Schedule:
    """Derived run sizes (read-only; never written back into the config)."""

    n_train: int
    micro_batch: int
    grad_accum: int
    world: int
    total_steps: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world

    @property
    def steps_per_epoch(self) -> int:
        return self.n_train // self.global_batch


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


class Trainer:
    """Base of the dataset trainers. Subclasses implement:

    - ``setup()``: set ``self.model`` (the trainable model, before LoRA), ``self.tokenizer``,
      ``self.train_data`` and ``self.eval_data`` (lists of examples, ``eval_data`` possibly empty);
      load anything frozen (a reference model).
    - ``collate(examples) -> dict`` of tensors (shapes documented by the subclass).
    - ``compute_loss(batch) -> (loss, stats)``; stats are 0-dim tensors or floats.
    - ``count_tokens(batch) -> int`` for throughput (default: attention_mask sum).
    Optional hooks: ``before_train()`` (after LoRA, before the first step; e.g. precompute references),
    ``lora_task_type``, ``lora_modules_to_save``, ``key_metric`` (shown in the progress bar).
    """

    command = "train"  # the CLI command, for the resume hint
    lora_task_type = "CAUSAL_LM"
    lora_modules_to_save: list[str] | None = None
    key_metric = "loss"

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.model = None
        self.engine = None
        self.tokenizer = None
        self.train_data: list = []
        self.eval_data: list = []

    # -- subclass interface --
    def setup(self) -> None:
        raise NotImplementedError

    def collate(self, examples: list) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        raise NotImplementedError

    def count_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum())

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> float:
        """What ``compute_loss`` averages over (here: examples), to merge forward chunks into the batch mean."""
        return float(len(batch["index"]))

    def before_train(self) -> None:
        pass

    def extra_run_info(self) -> dict:
        return {}

    # -- the loop --
    def batch_for(self, step: int, micro: int) -> list:
        """The examples of one micro-batch on this process; a pure function of (seed, step, micro)."""
        s = self.schedule
        epoch, offset = divmod(step, s.steps_per_epoch)
        gen = torch.Generator().manual_seed(self.cfg.seed + epoch)
        perm = torch.randperm(s.n_train, generator=gen)
        start = ((offset * s.grad_accum + micro) * s.world + self.accelerator.process_index) * s.micro_batch
        return [self.train_data[i] for i in perm[start : start + s.micro_batch].tolist()]

    def _to_device(self, batch: dict) -> dict:
        dev = self.accelerator.device
        return {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def train(self) -> dict[str, float]:
        """Run the whole training; a user error before the first checkpoint leaves no output directory."""
        return run_in_output_dir(self.cfg, self._train)

    def _train(self) -> dict[str, float]:
        from accelerate.utils import set_seed
        from tqdm.auto import tqdm

        cfg = self.cfg
        self.precision = resolve_precision(cfg.precision)
        self.accelerator = acc = make_accelerator(self.precision)
        check_mergeable(acc, cfg.merge_lora)
        set_seed(cfg.seed)
        self.setup()  # models and data first: bad input fails before anything is written
        if not self.train_data:
            raise UserError("no training examples left after validation; see the drop summary above")
        self.out_dir = out = prepare_output_dir(cfg.output, overwrite=cfg.overwrite, resume=cfg.resume is not None)

        if cfg.lora_r:
            self.model = apply_lora(self.model, cfg, self.lora_task_type, self.lora_modules_to_save)
        if cfg.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.train()

        world = acc.num_processes
        n = len(self.train_data)
        global_batch = cfg.batch_size * cfg.grad_accum * world
        if n < global_batch:
            raise UserError(f"{n} training examples are fewer than one global batch ({global_batch} = batch_size "
                            f"{cfg.batch_size} x grad_accum {cfg.grad_accum} x {world} processes); lower --batch-size")
        steps_per_epoch = n // global_batch
        total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
        self.schedule = Schedule(n, cfg.batch_size, cfg.grad_accum, world, total)
        # forward chunks: a fixed size, or (None) sized to ~FORWARD_POSITIONS padded positions on CPU, where big
        # activations fall out of cache. Measured, DPO full fp32 on 8 HH pairs (2,776 positions): one forward
        # 13.2 s/step and 7.4 GB peak, forwards of 2 pairs 10.3 s and 4.6 GB, of 3 pairs ~12 s and 5.3 GB; 8 short
        # pairs (560 positions) are 1.2x faster in one forward than in 4. GPUs take the whole micro-batch.
        self.forward_batch = cfg.forward_batch_size or (None if acc.device.type == "cpu" else cfg.batch_size)

        params = [p for p in self.model.parameters() if p.requires_grad]
        n_trainable = sum(getattr(p, "ds_numel", p.numel()) for p in params)  # ZeRO-3 loads parameters empty
        optimizer, scheduler = make_optimizer(self.model, cfg, cfg.learning_rate, total)
        # self.model stays the plain (or peft) model; self.engine is what accelerate wraps for training
        self.ds = is_deepspeed(acc)
        if self.ds:
            configure_deepspeed(acc, cfg.batch_size, cfg.max_grad_norm)
        self.engine, self.optimizer = acc.prepare(Forward(self.model), optimizer)
        check_still_tied(self.model)
        self.scheduler = scheduler
        self.before_train()

        ckpts = CheckpointManager(out, cfg.save_total_limit)
        self.guard = NonFiniteGuard(cfg.max_nonfinite_steps)  # its count of skipped steps is saved and resumed
        start_step = 0
        if cfg.resume is not None:
            path, state, objects = ckpts.load_for_resume(cfg.resume)
            check_resumable(path, state, deepspeed=self.ds, processes=world, global_batch=global_batch)
            if self.ds:
                load_deepspeed_state(self.engine, path)
            else:
                load_training_state(self.model, inner_optimizer(self.optimizer), objects["model"], objects["optimizer"],
                                    path)
            self.scheduler.load_state_dict(objects["scheduler"])
            set_rng_state(objects["rng"])
            start_step = int(state["step"])
            self.guard.skipped = int(state.get("skipped_steps", 0))
            log.info("resuming from %s (step %d of %d)", path, start_step, total)
        if acc.is_main_process:
            write_config(out, cfg)
            write_json(out / "run.json", {
                "precision": self.precision, "processes": world, "train_examples": n,
                "eval_examples": len(self.eval_data), "global_batch": global_batch,
                "steps_per_epoch": steps_per_epoch, "total_steps": total,
                "forward_batch_size": self.forward_batch or f"auto ({FORWARD_POSITIONS} padded positions)",
                "trainable_parameters": n_trainable,
                "resumed_from_step": start_step if cfg.resume else None, **self.extra_run_info(),
            })
        metrics = MetricsLogger(out, resume_step=start_step if cfg.resume else None, enabled=acc.is_main_process)

        if self.eval_data and start_step == 0:
            metrics.log(0, self.evaluate())
        running = RunningMean()
        tokens, t_last = 0, time.perf_counter()
        last: dict[str, float] = {}
        bar = tqdm(total=total, initial=start_step, desc=self.command, unit="step", disable=not acc.is_main_process)
        hint = f"prefalign {self.command} --config {out / 'config.yaml'} --resume latest"
        # the bar closes before an error propagates, so the error stays the last line on the terminal
        with bar, GracefulStop(acc) as stop:
            for step in range(start_step, total):
                micro_batches = [self._forward_chunks(self.batch_for(step, m)) for m in range(cfg.grad_accum)]
                # what the step's loss averages over (examples; SFT: completion tokens), on every process
                step_weight = float(sum_across_processes(acc, torch.tensor(
                    sum(self.loss_weight(b) for chunks in micro_batches for b in chunks), device=acc.device)))
                step_stats = RunningMean()
                for m, chunks in enumerate(micro_batches):
                    tokens += self._forward_backward(chunks, step_weight, step_stats, sync=m == cfg.grad_accum - 1)
                lr = self.scheduler.get_last_lr()[0]
                # the loss of every process (a local NaN must stop every process's step, or they drift apart)
                loss_sum = float(sum_across_processes(acc, torch.tensor(step_stats.sums["loss"], device=acc.device)))
                if self.ds:
                    grad_norm, finite = self._deepspeed_step(loss_sum)
                else:
                    grad_norm = acc.clip_grad_norm_(self.engine.parameters(), cfg.max_grad_norm or float("inf"))
                    # the norm is computed from all-reduced gradients: the same on every process
                    finite = NonFiniteGuard.finite(grad_norm, loss_sum)
                    if finite:
                        self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                if finite:
                    self.scheduler.step()
                    running.merge(step_stats)
                    running.add({"grad_norm": grad_norm})
                done = step + 1
                last_good = ckpts.complete()[-1] if ckpts.complete() else "none yet"
                self.guard.record(finite, done, str(last_good))
                if done % cfg.logging_steps == 0 or done == total:
                    now = time.perf_counter()
                    last = {**self.pooled_mean(running), "lr": lr, "epoch": done / steps_per_epoch,
                            "tokens_per_second": tokens * world / max(now - t_last, 1e-9),
                            "skipped_steps": self.guard.skipped}
                    tokens, t_last = 0, now
                    metrics.log(done, last)
                    bar.set_postfix({k: f"{last[k]:.4g}" for k in ("loss", self.key_metric) if k in last})
                if self.eval_data and cfg.eval_steps and done % cfg.eval_steps == 0 and done != total:
                    metrics.log(done, self.evaluate())
                # no checkpoint while steps are being skipped: "last good" stays the last finite state
                if ((cfg.save_steps and done % cfg.save_steps == 0) or done == total) and self.guard.in_a_row == 0:
                    self.save_checkpoint(ckpts, done)
                bar.update(1)
                if done < total:
                    stop.check(done, total, lambda: self.save_checkpoint(ckpts, done), hint)
        final_eval = self.evaluate() if self.eval_data else {}
        if final_eval:
            metrics.log(total, final_eval)
        metrics.close()
        self.save_final(out / "final")
        acc.wait_for_everyone()
        return {**last, **final_eval}

    def _forward_backward(self, batches: list[dict], step_weight: float, stats: RunningMean, sync: bool) -> int:
        """Loss and gradients of one micro-batch, given as its forward chunks; returns its token count.

        Each chunk's loss is scaled by its share of ``step_weight``, the ``loss_weight`` of the whole step over
        every process (times the process count: DDP and FSDP average gradients over processes). The accumulated
        gradient is then that of the step's mean (over examples; SFT: over completion tokens) however its rows fall
        into micro-batches, chunks and processes. Only the last chunk of a syncing micro-batch all-reduces. The
        chunks' stats go into ``stats``, weighted by their ``loss_weight``.
        """
        acc = self.accelerator
        tokens = 0
        for i, batch in enumerate(batches):
            w = self.loss_weight(batch)
            last = sync and i == len(batches) - 1
            with (nullcontext() if last or self.ds else acc.no_sync(self.engine)), acc.autocast():
                loss, chunk_stats = self.compute_loss(batch)
            # backward even on a NaN loss: every process must join the gradient all-reduce
            scaled = loss * (w * acc.num_processes / step_weight)
            if self.ds:  # DeepSpeed reduces the gradients at the boundary we set (not its own count of backwards)
                self.engine.set_gradient_accumulation_boundary(last)
                self.engine.backward(scaled, scale_wrt_gas=False)
            else:
                acc.backward(scaled)
            stats.add({"loss": loss.detach(), **chunk_stats}, weight=w)
            tokens += self.count_tokens(batch)
        return tokens

    def _forward_chunks(self, examples: list) -> list[dict]:
        """The micro-batch as collated chunks on the device: ``forward_batch`` examples each, or (auto) as few
        equal chunks as keep each under ~FORWARD_POSITIONS padded positions (rows x length)."""
        fb = self.forward_batch
        if fb is None:
            full = self.collate(examples)  # token ids only: cheap
            # every process runs as many forwards (FSDP gathers the weights in each): the largest count of any
            n_chunks = max_across_processes(self.accelerator, math.ceil(full["input_ids"].numel() / FORWARD_POSITIONS))
            if n_chunks <= 1:
                return [self._to_device(full)]
            fb = math.ceil(len(examples) / n_chunks)
        return [self._to_device(self.collate(examples[lo : lo + fb])) for lo in range(0, len(examples), fb)]

    def _deepspeed_step(self, loss_sum: float) -> tuple[float, bool]:
        """``(grad_norm, stepped)``. DeepSpeed clips, steps and zeroes the gradients in one call: a non-finite loss
        (``loss_sum``: every process's) is caught before it and the step not taken; a non-finite gradient, which
        ZeRO detects itself, shows as a step it did not apply."""
        if not NonFiniteGuard.finite(loss_sum):
            zero_deepspeed_gradients(self.engine)
            return float("nan"), False
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = float("nan") if norm is None else float(norm)
        return norm, bool(self.engine.was_step_applied()) and math.isfinite(norm)

    def save_checkpoint(self, ckpts: CheckpointManager, step: int):
        acc = self.accelerator
        acc.wait_for_everyone()
        path = None
        objects = {"scheduler": self.scheduler.state_dict(), "rng": rng_state()}
        into = None
        if self.ds:  # DeepSpeed's own format: each process writes its shards of the optimizer state
            into = ckpts.staging_dir(step, create=acc.is_main_process)
            acc.wait_for_everyone()
            # trainable weights only (a LoRA checkpoint is the adapter, as on the other paths)
            self.engine.save_checkpoint(str(into), tag=DEEPSPEED_TAG, exclude_frozen_parameters=True)
        else:
            params, optim = training_state(self.model, inner_optimizer(self.optimizer))  # a collective under FSDP
            objects.update(model=params, optimizer=optim)
        acc.wait_for_everyone()
        if acc.is_main_process:
            s = self.schedule
            path = ckpts.save(step, objects, {"total_steps": s.total_steps, "skipped_steps": self.guard.skipped,
                                              "processes": s.world, "global_batch": s.global_batch}, into=into)
        acc.wait_for_everyone()
        return path

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean of the loss stats over the eval set, prefixed ``eval/``."""
        acc = self.accelerator
        self.model.eval()
        running = RunningMean()
        bs = self.cfg.batch_size
        shard = self.eval_data[acc.process_index :: acc.num_processes]
        # as many forwards on every process (under FSDP each one is a collective): a process whose shard is
        # shorter runs a batch again and counts it with weight 0
        n_batches = max_across_processes(acc, math.ceil(len(shard) / bs))
        for i in range(n_batches):
            chunk = shard[i * bs : (i + 1) * bs]
            batch = self._to_device(self.collate(chunk or self.eval_data[:bs]))
            with acc.autocast():
                loss, stats = self.compute_loss(batch)
            running.add({"loss": loss, **stats}, weight=self.loss_weight(batch) if chunk else 0.0)
        self.model.train()
        # the mean over all eval rows (processes may hold one more than others)
        return {f"eval/{k}": v for k, v in self.pooled_mean(running).items()}

    def pooled_mean(self, running: RunningMean) -> dict[str, float]:
        """Empty ``running``: each stat's weighted mean over every process's rows (a collective)."""
        pooled = pooled_mean_across_processes(self.accelerator, running.sums, running.counts)
        running.pop()
        return pooled

    def call(self, fn, *args, **kwargs):
        """``fn(model, *args)`` through the prepared engine: use it for every forward that needs gradients.
        Before ``train()`` has prepared the engine (a setup-only trainer), the model is called directly."""
        if self.engine is None:
            return fn(self.model, *args, **kwargs)
        return self.engine(fn, *args, **kwargs)

    def save_final(self, path: Path) -> None:
        """``final/`` in Hugging Face format (adapter for LoRA), plus ``final-merged/`` with --merge-lora.

        Called on every process (under FSDP the full weights are gathered collectively); the main process writes,
        to a temp directory then renamed, so ``final/`` is whole or absent.
        """
        save_final_model(self.accelerator, path, self.model, self.tokenizer, merged=self.cfg.merge_lora,
                         engine=self.engine)


def check_still_tied(model) -> None:
    """Refuse a model whose tied input/output embeddings came apart in ``accelerator.prepare`` (FSDP2 with
    cpu_ram_efficient_loading does this): training would silently update two copies."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    out = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if out is None or not getattr(base.config, "tie_word_embeddings", False):
        return
    if out.weight is not base.get_input_embeddings().weight:
        raise UserError("the model's tied input/output embeddings were untied while preparing it for distributed "
                        "training; with FSDP set fsdp_cpu_ram_efficient_loading: false in the accelerate config")


def check_resumable(path: Path, state: dict, *, deepspeed: bool, processes: int, global_batch: int) -> None:
    """Refuse a checkpoint this launch cannot continue exactly: written with(out) DeepSpeed, by another number of
    DeepSpeed processes (its optimizer shards), or with another global batch (data order and schedule)."""
    if (path / DEEPSPEED_TAG).is_dir() != deepspeed:
        how = "with" if not deepspeed else "without"
        raise UserError(f"{path}: written {how} DeepSpeed; resume it under the same kind of launch (DeepSpeed "
                        "checkpoints hold DeepSpeed's own sharded optimizer files)")
    if deepspeed and state.get("processes", processes) != processes:
        raise UserError(f"{path}: written by {state['processes']} DeepSpeed processes; resume it on as many (its "
                        f"optimizer state is sharded {state['processes']} ways), not {processes}")
    if state.get("global_batch", global_batch) != global_batch:
        raise UserError(f"{path}: written with a global batch of {state['global_batch']} (batch size x grad accum x "
                        f"processes), now {global_batch}; resume with the same, so data order and schedule continue")


def check_mergeable(acc, merge_lora: bool) -> None:
    if merge_lora and is_sharded(acc):
        raise UserError("--merge-lora: under FSDP or ZeRO-3 the model is sharded over the processes and cannot be "
                        "merged in place; drop the flag (final/ holds the adapter) and merge it on one process afterwards "
                        "(peft: PeftModel.from_pretrained(base, 'final').merge_and_unload())")


def save_final_model(acc, path: Path, model, tokenizer, merged: bool = False, engine=None) -> None:
    """Write ``model`` to ``path`` in Hugging Face format from the main process; with ``merged``, also the LoRA
    adapter merged into its base as ``<path>-merged``. Every process calls it: under FSDP or ZeRO-3 it gathers
    (ZeRO-3 through ``engine``, the prepared `Forward` around ``model``)."""
    import copy

    state = None
    if is_zero3(acc):
        state = full_deepspeed_state(acc, engine, model)
    elif is_sharded(acc):
        state = full_model_state(model)
    if acc.is_main_process:
        save_pretrained_atomic(path, model, tokenizer, state)
        if merged:
            save_pretrained_atomic(path.parent / f"{path.name}-merged", copy.deepcopy(model).merge_and_unload(),
                                   tokenizer)
    acc.wait_for_everyone()


def save_pretrained_atomic(path: Path, model, tokenizer, state: dict | None = None) -> None:
    """``model.save_pretrained`` (weights from ``state`` if given: a gathered full state dict) into a temp
    directory renamed to ``path``."""
    import shutil
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
    try:
        model.save_pretrained(tmp, **({} if state is None else {"state_dict": state}))
        tokenizer.save_pretrained(tmp)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
