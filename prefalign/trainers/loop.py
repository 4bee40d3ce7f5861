"""The step of every dataset trainer (sft, dpo, reward): one optimizer step over a global batch of examples.

A trainer subclass says what the model, data and loss are; this module turns them into a step for the run
skeleton (`prefalign.trainers.run.Run`, which does outputs, checkpoints, resume and the rest): deterministic data
order, gradient accumulation over micro-batches, forward chunks inside a micro-batch, the loss weighted so the
gradient is the step's mean however its rows fall into chunks and processes, and evaluation; the clipped and
guarded optimizer step is the backend's (`prefalign.trainers.backend`).

Data order is a pure function of (seed, epoch, step), so resuming needs only the step count: step
``s`` of epoch ``e`` reads a fixed slice of ``randperm(n, seed + e)``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from prefalign.collectives import gather_objects, process_max
from prefalign.errors import UserError
from prefalign.models.lean import save_activation_memory
from prefalign.trainers.backend import Trained, param_numel
from prefalign.trainers.config import TrainConfig
from prefalign.trainers.dist import (
    pooled_mean_across_processes,
    sum_across_processes,
    sums_and_weights_across_processes,
)
from prefalign.trainers.final import save_final_model
from prefalign.trainers.guard import NonFiniteGuard
from prefalign.trainers.lora import apply_lora
from prefalign.trainers.metrics import EVAL_PAIRS, RunningMean
from prefalign.trainers.optim import make_optimizer
from prefalign.trainers.run import Run

FORWARD_POSITIONS = 512
"""Auto forward chunks on CPU: padded positions (rows x length) per forward (why: BENCHMARKS.md, design notes)."""


@dataclass(frozen=True)
class RunSizes:
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


class Trainer(Run):
    """Base of the dataset trainers. Subclasses implement:

    - ``setup()``: set ``self.model`` (the trainable model, before LoRA), ``self.tokenizer``,
      ``self.train_data`` and ``self.eval_data`` (lists of examples, ``eval_data`` possibly empty);
      load anything frozen (a reference model).
    - ``collate(examples) -> dict`` of tensors (shapes documented by the subclass).
    - ``compute_loss(batch) -> (loss, stats)``; stats are 0-dim tensors or floats. Forwards that need
      gradients go through ``self.train_forward(fn, ...)``. A pair trainer (dpo, reward) implements
      ``compute_loss_rows`` instead, which adds each pair's margin for ``eval_pairs.jsonl``.
    - ``count_tokens(batch) -> int`` for throughput (default: attention_mask sum).
    Optional hooks: ``before_train()`` (after LoRA, before the first step; e.g. precompute references),
    ``lora_task_type``, ``lora_modules_to_save``, ``key_metric`` (shown in the progress bar).
    """

    lora_task_type = "CAUSAL_LM"
    lora_modules_to_save: ClassVar[list[str] | None] = None
    key_metric = "loss"

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        self.model: Any = None  # a transformers (or peft) model, set by setup()
        self.trained_model: Trained | None = None  # the `Trained` model, once built
        self.tokenizer: Any = None
        self.train_data: list = []
        self.eval_data: list = []
        self.eval_margins: dict[int, float] = {}  # the last evaluation's margin per example index of this process

    # -- subclass interface --
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

    def train_forward(self, fn, *args, **kwargs):
        """``fn(model, *args)`` with gradients through the prepared engine; before `build` (a setup-only
        trainer) on the model directly."""
        if self.trained_model is None:
            return fn(self.model, *args, **kwargs)
        return self.trained_model.forward(fn, *args, **kwargs)

    @property
    def prepared(self) -> Trained:
        """The `Trained` model `build` prepared: what the steps and the final save go through."""
        if self.trained_model is None:
            raise RuntimeError(f"{type(self).__name__}: the model is not built yet (build() prepares it)")
        return self.trained_model

    # -- the run skeleton's hooks --
    @property
    def has_eval(self) -> bool:
        return bool(self.eval_data)

    def check_inputs(self) -> None:
        """Enough training examples for one global batch (before the output directory exists)."""
        cfg = self.cfg
        if not self.train_data:
            raise UserError("no training examples left after validation; see the drop summary above")
        n, world = len(self.train_data), self.world
        global_batch = cfg.batch_size * cfg.grad_accum * world
        if n < global_batch:
            raise UserError(
                f"{n} training examples are fewer than one global batch ({global_batch} = batch_size "
                f"{cfg.batch_size} x grad_accum {cfg.grad_accum} x {world} processes); lower --batch-size"
            )

    def build(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        if cfg.lora_r:
            self.model = apply_lora(self.model, cfg, self.lora_task_type, self.lora_modules_to_save)
        self.activations = save_activation_memory(
            self.model, gradient_checkpointing=cfg.gradient_checkpointing, lean=cfg.lean_activations
        )
        self.model.train()
        n, world = len(self.train_data), self.world
        total = cfg.max_steps or max(1, math.ceil(cfg.epochs * (n // (cfg.batch_size * cfg.grad_accum * world))))
        self.sizes = RunSizes(n, cfg.batch_size, cfg.grad_accum, world, total)
        self.total_steps = total
        # forward chunks: a fixed size, or (None) sized to ~FORWARD_POSITIONS padded positions on CPU, where big
        # activations fall out of cache; GPUs take the whole micro-batch
        self.forward_batch = cfg.forward_batch_size or (None if acc.device.type == "cpu" else cfg.batch_size)
        self.n_trainable = sum(param_numel(p) for p in self.model.parameters() if p.requires_grad)
        optimizer, scheduler = make_optimizer(self.model, cfg, cfg.learning_rate, total)
        self.backend.configure(cfg.batch_size, cfg.max_grad_norm)
        self.trained_model = self.backend.prepare("model", self.model, optimizer, scheduler)
        self.trained = [self.trained_model]
        self.before_train()
        self.running = RunningMean()
        # throughput is timed from the first step (not from before resume, run.json and the step-0 evaluation)
        self.tokens, self.lr = 0, 0.0
        self.t_last: float | None = None
        self.last_row: dict[str, float] = {}

    def run_info(self) -> dict:
        s = self.sizes
        return {
            "train_examples": s.n_train,
            "eval_examples": len(self.eval_data),
            "global_batch": s.global_batch,
            "steps_per_epoch": s.steps_per_epoch,
            "total_steps": s.total_steps,
            "forward_batch_size": self.forward_batch or f"auto ({FORWARD_POSITIONS} padded positions)",
            "trainable_parameters": self.n_trainable,
            "activations": self.activations,
            **self.extra_run_info(),
        }

    def checkpoint_state(self) -> dict:
        """The global batch, and the stats averaged since the last log row, summed over processes (a collective):
        a checkpoint between two rows (a signal, --save-steps not a multiple of --logging-steps) would otherwise
        make the resumed run's next row the mean of its own steps only."""
        sums, counts = sums_and_weights_across_processes(self.accelerator, self.running.sums, self.running.counts)
        return {"global_batch": self.sizes.global_batch, "running": {"sums": sums, "counts": counts}}

    def load_state(self, state: dict) -> None:
        """The running stats go to the main process only: the next row pools every process's sums. Every other
        process holds the same keys at zero: the pooling is one all-reduce over the keys each process holds, so if
        every step before the next row were skipped (non-finite), processes holding different keys would call
        different collectives and hang."""
        saved = state.get("running", {"sums": {}, "counts": {}})  # older checkpoints: none
        main = self.accelerator.is_main_process
        for k, v in saved["sums"].items():
            self.running.sums[k] += v if main else 0.0
            self.running.counts[k] += saved["counts"][k] if main else 0.0

    def check_resumable(self, path: Path, state: dict) -> None:
        """Refuse a checkpoint written with another global batch: data order and schedule would not continue."""
        global_batch = self.sizes.global_batch
        if state.get("global_batch", global_batch) != global_batch:
            raise UserError(
                f"{path}: written with a global batch of {state['global_batch']} (batch size x grad "
                f"accum x processes), now {global_batch}; resume with the same, so data order and "
                "schedule continue"
            )

    def train_step(self, step: int) -> None:
        """One optimizer step: every micro-batch's forward chunks and backward, then the guarded step."""
        cfg, acc = self.cfg, self.accelerator
        if self.t_last is None:
            self.t_last = time.perf_counter()
        micro_batches = [self._forward_chunks(self.batch_for(step, m)) for m in range(cfg.grad_accum)]
        # what the step's loss averages over (examples; SFT: completion tokens), on every process
        step_weight = float(
            sum_across_processes(
                acc,
                torch.tensor(sum(self.loss_weight(b) for chunks in micro_batches for b in chunks), device=acc.device),
            )
        )
        step_stats = RunningMean()
        for m, chunks in enumerate(micro_batches):
            self.tokens += self.forward_backward(chunks, step_weight, step_stats, sync=m == cfg.grad_accum - 1)
        self.lr = self.prepared.scheduler.get_last_lr()[0]
        # the loss of every process (a local NaN must stop every process's step, or they drift apart)
        loss_sum = float(sum_across_processes(acc, torch.tensor(step_stats.sums["loss"], device=acc.device)))
        [grad_norm], finite = self.backend.step([self.prepared], cfg.max_grad_norm, NonFiniteGuard.finite(loss_sum))
        if finite:
            self.running.merge(step_stats)
            self.running.add({"grad_norm": grad_norm})
        self.record_step(finite, step + 1)

    def log_row(self, done: int) -> dict[str, float]:
        now = time.perf_counter()
        assert self.t_last is not None, "train_step starts the clock"
        # summed, not this process's count times the processes: each process's examples have their own lengths
        acc = self.accelerator
        tokens = float(sum_across_processes(acc, torch.tensor(float(self.tokens), device=acc.device)))
        self.last_row = {
            **self.pooled_mean(self.running),
            "lr": self.lr,
            "epoch": done / self.sizes.steps_per_epoch,
            "tokens_per_second": tokens / max(now - self.t_last, 1e-9),
        }
        self.tokens, self.t_last = 0, now
        return self.last_row

    def progress(self) -> dict[str, str]:
        return {k: f"{self.last_row[k]:.4g}" for k in ("loss", self.key_metric) if k in self.last_row}

    def save_final(self, out: Path) -> None:
        """``final/`` in Hugging Face format (adapter for LoRA), plus ``final-merged/`` with --merge-lora; each with
        its model card."""
        save_final_model(
            self.backend, out / "final", self.prepared, self.tokenizer, merged=self.cfg.merge_lora, card=self.card()
        )

    # -- the step's parts --
    def batch_for(self, step: int, micro: int) -> list:
        """The examples of one micro-batch on this process; a pure function of (seed, step, micro)."""
        s = self.sizes
        epoch, offset = divmod(step, s.steps_per_epoch)
        gen = torch.Generator().manual_seed(self.cfg.seed + epoch)
        perm = torch.randperm(s.n_train, generator=gen)
        start = ((offset * s.grad_accum + micro) * s.world + self.accelerator.process_index) * s.micro_batch
        return [self.train_data[i] for i in perm[start : start + s.micro_batch].tolist()]

    def _to_device(self, batch: dict) -> dict:
        dev = self.accelerator.device
        return {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def forward_backward(self, chunks: list[dict], step_weight: float, stats: RunningMean, sync: bool) -> int:
        """Loss and gradients of one micro-batch, given as its forward chunks; returns its token count.

        Each chunk's loss is scaled by its share of ``step_weight``, the ``loss_weight`` of the whole step over
        every process (times the process count: DDP and FSDP average gradients over processes). The accumulated
        gradient is then that of the step's mean (over examples; SFT: over completion tokens) however its rows fall
        into micro-batches, chunks and processes. Only the last chunk of a syncing micro-batch all-reduces. The
        chunks' stats go into ``stats``, weighted by their ``loss_weight``.
        """
        acc = self.accelerator
        tokens = 0
        for i, batch in enumerate(chunks):
            weight = self.loss_weight(batch)
            boundary = sync and i == len(chunks) - 1
            # backward inside the accumulate context too: FSDP2 reads its no-sync flag during backward (DDP at forward)
            with self.backend.accumulate([self.prepared], boundary):
                with acc.autocast():
                    loss, chunk_stats = self.compute_loss(batch)
                # backward even on a NaN loss: every process must join the gradient all-reduce
                self.backend.backward(self.prepared, loss * (weight * acc.num_processes / step_weight), boundary)
            stats.add({"loss": loss.detach(), **chunk_stats}, weight=weight)
            tokens += self.count_tokens(batch)
        return tokens

    def _forward_chunks(self, examples: list) -> list[dict]:
        """The micro-batch as collated chunks on the device: ``forward_batch`` examples each, or (auto) as few
        equal chunks as keep each under ~FORWARD_POSITIONS padded positions (rows x length). Examples go into
        chunks longest first, so a chunk holds rows of similar length (less padding) and the first forward is
        the largest: the heap blocks its activations free then hold every later chunk's (allocated in another
        order, glibc's heap grows for a longer chunk's blocks between the step's gradients: BENCHMARKS.md)."""
        size = self.forward_batch
        if size is None:
            full = self.collate(examples)  # token ids only: cheap
            # every process runs as many forwards (FSDP gathers the weights in each): the largest count of any
            n_chunks = process_max(math.ceil(full["input_ids"].numel() / FORWARD_POSITIONS), self.accelerator.device)
            if n_chunks <= 1:
                return [self._to_device(full)]
            size = math.ceil(len(examples) / n_chunks)
        if size < len(examples):
            examples = self.longest_first(examples)
        return [self._to_device(self.collate(examples[lo : lo + size])) for lo in range(0, len(examples), size)]

    def longest_first(self, examples: list) -> list:
        """``examples`` by their collated length, longest first (stable: equal lengths keep their order)."""
        return sorted(examples, key=lambda e: self.collate([e])["input_ids"].shape[-1], reverse=True)

    def compute_loss_rows(self, batch) -> tuple[torch.Tensor, dict, torch.Tensor | None]:
        """``compute_loss`` plus each example's margin ``(N,)`` where the trainer ranks pairs (> 0: the chosen
        completion ranked above the rejected one); None for a trainer that does not."""
        return (*self.compute_loss(batch), None)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean of the loss stats over the eval set, prefixed ``eval/``, and ``eval/seconds``: the evaluation's
        wall time (`prefalign compare` charges measurement to no arm). A pair trainer's per-pair margins are kept
        for `save_final_eval`."""
        acc = self.accelerator
        t0 = time.perf_counter()
        self.model.eval()
        running = RunningMean()
        margins: dict[int, float] = {}  # example index -> margin
        bs = self.cfg.batch_size
        shard = self.eval_data[acc.process_index :: acc.num_processes]
        # as many forwards on every process (under FSDP each one is a collective): a process whose shard is
        # shorter runs a batch again and counts it with weight 0
        n_batches = process_max(math.ceil(len(shard) / bs), acc.device)
        for i in range(n_batches):
            chunk = shard[i * bs : (i + 1) * bs]
            batch = self._to_device(self.collate(chunk or self.eval_data[:bs]))
            with acc.autocast():
                loss, stats, rows = self.compute_loss_rows(batch)
            running.add({"loss": loss, **stats}, weight=self.loss_weight(batch) if chunk else 0.0)
            if chunk and rows is not None:
                margins.update(zip(batch["index"].tolist(), rows.float().cpu().tolist(), strict=True))
        self.model.train()
        self.eval_margins = margins
        # the mean over all eval rows (processes may hold one more than others)
        return {
            **{f"eval/{k}": v for k, v in self.pooled_mean(running).items()},
            "eval/seconds": time.perf_counter() - t0,
        }

    def save_final_eval(self, out: Path) -> None:
        """``eval_pairs.jsonl``: the final evaluation's outcome on each held-out pair, in the eval set's order
        (``pair``: its position there, ``prompt``: its prompt's text, ``margin``: chosen minus rejected reward,
        ``correct``: margin > 0). `prefalign compare` reads it to group the pairs by prompt (row 1's interval)."""
        from prefalign.runio import write_jsonl

        # a collective (every process calls this): each holds the margins of its shard of the eval set
        margins = {k: v for part in gather_objects(self.eval_margins) for k, v in part.items()}
        if not margins or not self.accelerator.is_main_process:
            return
        rows = [
            {"pair": j, "prompt": item.prompt, "margin": margins[index], "correct": margins[index] > 0}
            for j, (index, item) in enumerate(self.eval_data)
        ]
        write_jsonl(out / EVAL_PAIRS, rows)

    def pooled_mean(self, running: RunningMean) -> dict[str, float]:
        """Empty ``running``: each stat's weighted mean over every process's rows (a collective)."""
        pooled = pooled_mean_across_processes(self.accelerator, running.sums, running.counts)
        running.pop()
        return pooled
