"""The run skeleton every trainer plugs its step into.

`Run.train` does, once for every command: the backend and precision, the output directory's lifecycle
(nothing written before the inputs are checked; removed again if a user error ends a run before its first
checkpoint), ``config.yaml`` and ``run.json``, metrics (``metrics.jsonl`` + trackers), the progress bar,
resume (``--resume latest|DIR``), checkpoint cadence and retention, the last good checkpoint, the non-finite
guard, a graceful stop on SIGINT/SIGTERM, evaluation cadence and ``final/``.

A trainer subclass supplies its setup and its step::

    setup()            load and check models and data; write nothing (runs before the output directory exists)
    check_inputs()     refuse inputs that cannot make a run (still before the output directory exists)
    build()            optimizers, ``self.trained = [backend.prepare(...)]``; set ``self.total_steps`` (LoRA: the
                       dataset trainers apply it here, PPO in setup, where its random init has always come)
    train_step(step)   one step (sft/dpo/reward: an optimizer step; ppo: an iteration, rollout then update);
                       report each optimizer step's outcome with `record_step`
    log_row(done)      the metrics row of the steps since the last log (a collective on every process)

    save_final(out)    write ``final/`` (every process calls it: sharded weights are gathered), each model with the
                       model card of `card` (`prefalign.trainers.final.save_final_model` writes it)

and optionally ``check_backend``, ``run_info``, ``progress``, ``has_eval`` / ``evaluate``, ``checkpoint_state`` /
``load_state``, ``check_resumable``, ``on_start``, ``card_method``.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefalign.allocator import tune_malloc
from prefalign.collectives import broadcast_object, gather_objects
from prefalign.errors import UserError
from prefalign.methods import METHODS, Method
from prefalign.preflight import preflight_run
from prefalign.progress import ProgressBar
from prefalign.runio import (
    clear_previous_training,
    prepare_output_dir,
    run_in_output_dir,
    to_plain,
    write_config,
    write_json,
)
from prefalign.trackers import load_tracker_packages
from prefalign.trainers.backend import Trained, check_mergeable, make_backend, resolve_precision
from prefalign.trainers.card import CardFacts
from prefalign.trainers.checkpoint import (
    CheckpointManager,
    check_same_settings,
    process_rng_state,
    rng_state,
    set_rng_state,
)
from prefalign.trainers.embedding_grad import dense_embedding_backward
from prefalign.trainers.guard import GracefulStop, NonFiniteGuard
from prefalign.trainers.metrics import MetricsLogger
from prefalign.trainers.optim import realign_lr

log = logging.getLogger(__name__)


class Run:
    """Base of every trainer: the skeleton of one run. Subclasses implement the hooks named in the module doc."""

    command = "train"
    """The CLI command: the progress bar's label and the resume hint."""
    unit = "step"
    """What one `train_step` is, for the progress bar and messages."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.trained: list[Trained] = []
        self.total_steps = 0
        self.last_good = "none yet"
        self.saved_at: int | None = None  # the step of the checkpoint written last by this process's run
        self.guard = NonFiniteGuard(cfg.max_nonfinite_steps)  # its count of skipped steps is saved and resumed
        self.resumed_wall: float | None = None  # the checkpoint's clock, on resume
        self.clock: Callable[[], float] = lambda: 0.0  # the run's wall clock (its metrics logger's, once open)

    # -- hooks --
    def check_backend(self) -> None:
        """Refuse a launch this trainer cannot run (before anything is loaded)."""

    def setup(self) -> None:
        raise NotImplementedError

    def check_inputs(self) -> None:
        """Refuse, after `setup` and before anything is written, inputs that cannot make a run."""

    def build(self) -> None:
        raise NotImplementedError

    def train_step(self, step: int) -> None:
        raise NotImplementedError

    def log_row(self, done: int) -> dict[str, float]:
        raise NotImplementedError

    def run_info(self) -> dict[str, Any]:
        return {}

    def progress(self) -> dict[str, str]:
        """The progress bar's postfix after a step."""
        return {}

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics (``eval/...``); empty when the trainer has no evaluation set."""
        return {}

    def save_final_eval(self, out: Path) -> None:
        """After the final evaluation, on every process: write what it measured beyond its metrics row (the pair
        trainers' ``eval_pairs.jsonl``)."""

    @property
    def eval_steps(self) -> int | None:
        return getattr(self.cfg, "eval_steps", None)

    def checkpoint_state(self) -> dict[str, Any]:
        """JSON-able state saved in every checkpoint beside the skeleton's (called on every process; the main
        process's is written, so it may gather from the others)."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Put `checkpoint_state` back (after the weights, optimizers and RNG are restored)."""

    def check_resumable(self, path: Path, state: dict[str, Any]) -> None:
        """Refuse a checkpoint this launch cannot continue exactly."""

    def on_start(self, start: int, metrics: MetricsLogger) -> None:
        """After the run's files are ready, before the first step (``start``: the step resumed from, or 0)."""

    def save_final(self, out: Path) -> None:
        raise NotImplementedError

    def card_method(self) -> Method:
        """How this run trains, for its model cards: the command's entry of `prefalign.methods.METHODS` (dpo and rl
        name their --loss-type or --estimator)."""
        return METHODS[self.command]

    def card(self, method: Method | None = None, base: str | None = None) -> CardFacts:
        """The trainer's facts for the card of a model `save_final` writes: `card_method` (or ``method``, e.g.
        PPO's critic) and the model it started from (``base``, default --model)."""
        return CardFacts(self.out_dir, self.command, method or self.card_method(), base or self.cfg.model)

    # -- the skeleton --
    def train(self) -> dict[str, float]:
        """Run the whole training; a user error before the first checkpoint leaves no output directory."""
        try:
            return run_in_output_dir(self.cfg, self._run)
        finally:  # finished or failed, the model handed back trains like any other
            for t in self.trained:
                dense_embedding_backward(t.sparse_embeddings)

    def init_backend(self) -> None:
        """The precision, the backend (and its accelerator) of this launch, the checks on it, the seed."""
        from accelerate.utils import set_seed

        self.precision = resolve_precision(self.cfg.precision)
        self.backend = make_backend(self.precision)
        self.accelerator = self.backend.acc
        self.world = self.accelerator.num_processes
        self.check_backend()
        check_mergeable(self.backend, self.cfg.merge_lora)
        set_seed(self.cfg.seed)

    def prepare(self) -> None:
        """The backend, `setup`, `check_inputs`, the output directory, `build`: a run ready to resume or start."""
        cfg = self.cfg
        self.malloc = tune_malloc()  # before the models load: their copies and every step's tensors reuse the heap
        self.init_backend()
        load_tracker_packages(cfg.trackers, cfg.output)  # a missing extra stops the run before models load
        self.setup()  # models and data first: bad input fails before anything is written
        self.check_inputs()
        preflight_run(self)  # refuses what cannot fit on the disk, warns what may not fit in memory
        self.out_dir = prepare_output_dir(cfg.output, overwrite=cfg.overwrite, resume=cfg.resume is not None)
        self.accelerator.wait_for_everyone()  # every process has checked the directory before the main one writes
        self.build()

    def _run(self) -> dict[str, float]:
        self.prepare()
        cfg, acc, out = self.cfg, self.accelerator, self.out_dir
        if cfg.overwrite and cfg.resume is None and acc.is_main_process:
            clear_previous_training(out)  # an earlier run's checkpoints would be pruned in with and resumed as ours
        acc.wait_for_everyone()
        self.ckpts = CheckpointManager(out, cfg.save_total_limit)
        start = self._resume() if cfg.resume is not None else 0
        if acc.is_main_process:
            write_config(out, cfg)
            write_json(
                out / "run.json",
                {
                    "precision": self.precision,
                    "processes": self.world,
                    "backend": self.backend.name,
                    "malloc": self.malloc,
                    **self.run_info(),
                    "resumed_from_step": start if cfg.resume else None,
                },
            )
        metrics = MetricsLogger(
            out,
            resume_step=start if cfg.resume else None,
            enabled=acc.is_main_process,
            trackers=cfg.trackers,
            run_name=cfg.output,
            config=to_plain(cfg),
            resume_wall=self.resumed_wall,
        )
        self.clock = metrics.clock
        self.on_start(start, metrics)
        if self.evaluate_now(start, first=True):
            metrics.log(0, self.evaluate())
        last_logged = self._steps(start, metrics)
        if start == self.total_steps:  # resumed at its end: no step ran; its last training row was logged before
            last_logged = broadcast_object(metrics.logged_at(start))
        final_eval = self.evaluate() if self.has_eval else {}
        # a run resumed at its end (killed while saving final/) has its final evaluation's row already
        if final_eval and not (start == self.total_steps and metrics.kept_row_with(start, "eval/")):
            metrics.log(self.total_steps, final_eval)
        if final_eval:
            self.save_final_eval(out)
        metrics.close()
        acc.wait_for_everyone()
        self.save_final(out)
        self._record_gpu_peak(out / "run.json")
        acc.wait_for_everyone()
        return {**last_logged, **final_eval}

    def _record_gpu_peak(self, run_json: Path) -> None:
        """On CUDA, ``peak_gpu_allocated_mb`` in run.json: the largest ``torch.cuda.max_memory_allocated`` of any
        process (MiB), the memory a GPU race compares (`prefalign compare`); host RSS says little there. A
        collective; nothing on CPU."""
        import json

        import torch

        from prefalign.collectives import process_max

        device = self.accelerator.device
        if device.type != "cuda":
            return
        peak = process_max(torch.cuda.max_memory_allocated(device), device)
        if self.accelerator.is_main_process:
            info = json.loads(run_json.read_text())
            write_json(run_json, {**info, "peak_gpu_allocated_mb": round(peak / 2**20, 1)})

    def _steps(self, start: int, metrics: MetricsLogger) -> dict[str, float]:
        """Steps ``start`` .. total: the step, its metrics, evaluation and checkpoint cadence, a stop on a signal."""
        cfg, total = self.cfg, self.total_steps
        hint = f"prefalign {self.command} --config {self.out_dir / 'config.yaml'} --resume latest"
        last_logged: dict[str, float] = {}
        # the bar closes before an error propagates, so the error stays the last line on the terminal
        with (
            ProgressBar(
                total=total,
                initial=start,
                desc=self.command,
                unit=self.unit,
                disable=not self.accelerator.is_main_process,
            ) as bar,
            GracefulStop(self.accelerator) as stop,
        ):
            for step in range(start, total):
                self.train_step(step)
                done = step + 1
                if done % cfg.logging_steps == 0 or done == total:
                    last_logged = {**self.log_row(done), "skipped_steps": self.guard.skipped}
                    metrics.log(done, last_logged)
                if self.evaluate_now(done):
                    metrics.log(done, self.evaluate())
                # no checkpoint while steps are being skipped: "last good" stays the last finite state
                if ((cfg.save_steps and done % cfg.save_steps == 0) or done == total) and self.guard.in_a_row == 0:
                    self.save_checkpoint(done)
                bar.set_postfix(self.progress())
                bar.update(1, metrics=last_logged)  # compare shows the metric its arm table names
                if done < total:
                    stop.check(done, total, functools.partial(self.stop_checkpoint, done), hint)
        return last_logged

    def evaluate_now(self, done: int, first: bool = False) -> bool:
        """Evaluation cadence: before the first step of a fresh run, every ``eval_steps``; the end has its own."""
        if not self.has_eval:
            return False
        if first:
            return done == 0
        if not self.eval_steps:
            return False
        return done % self.eval_steps == 0 and done != self.total_steps

    @property
    def has_eval(self) -> bool:
        return False

    def record_step(self, finite: bool, done: int) -> None:
        """Count an optimizer step skipped for a non-finite loss or gradient; stop after too many in a row."""
        self.guard.record(finite, done, self.last_good)

    def stop_checkpoint(self, step: int) -> Path:
        """The checkpoint a signal stops at: this step's, written now unless it was just saved (a second write would
        replace it by removing it first, leaving none if killed between, with --save-total-limit 1)."""
        return Path(self.last_good) if self.saved_at == step else self.save_checkpoint(step)

    def save_checkpoint(self, step: int) -> Path:
        """Every trained model's weights and optimizer, schedules, RNG and state as checkpoint ``step``: collectives
        on every process, written by the main one. Becomes the last good checkpoint."""
        acc = self.accelerator
        acc.wait_for_everyone()
        objects = {t.key("scheduler"): t.scheduler.state_dict() for t in self.trained}
        objects["rng"] = {"processes": gather_objects(rng_state())}  # a collective
        weights, into = self.backend.checkpoint_objects(self.trained, self.ckpts, step)
        objects.update(weights)
        acc.wait_for_everyone()
        path = self.ckpts.path(step)
        state = {
            "total_steps": self.total_steps,
            "skipped_steps": self.guard.skipped,
            "nonfinite_in_a_row": self.guard.in_a_row,
            "wall_seconds": self.clock(),  # where a resumed run's clock goes on (main process: its metrics' clock)
            "processes": self.world,
            "config": self.plain_config(),
            **self.checkpoint_state(),  # on every process: it may be a collective
        }
        if acc.is_main_process:
            path = self.ckpts.save(step, objects, state, into=into)
        acc.wait_for_everyone()
        self.last_good, self.saved_at = str(path), step
        return path

    def plain_config(self) -> dict:
        """The config as JSON values, as a checkpoint's state.json holds it."""
        return json.loads(json.dumps(to_plain(self.cfg)))

    def _resume(self) -> int:
        """Restore the checkpoint named by --resume; returns its step."""
        path, state, objects = self.ckpts.load_for_resume(self.cfg.resume)
        start = int(state["step"])
        if start > self.total_steps:  # the loop would not run, and final/ would hold the later weights
            raise UserError(
                f"{path}: a checkpoint at {self.unit} {start}, past this run's last ({self.total_steps}); resume "
                f"with a budget of {start} {self.unit}s or more (--max-steps), or from an earlier checkpoint"
            )
        self.backend.check_resumable(path, state)
        self.check_resumable(path, state)
        check_same_settings(path, state.get("config"), self.plain_config())
        self.backend.load_checkpoint(self.trained, path, objects)
        for t in self.trained:
            t.scheduler.load_state_dict(objects[t.key("scheduler")])
            realign_lr(t.scheduler)  # a longer --max-steps: the new schedule from the first resumed step
        set_rng_state(process_rng_state(objects["rng"], self.accelerator.process_index))
        self.guard.skipped = int(state.get("skipped_steps", 0))
        self.guard.in_a_row = int(state.get("nonfinite_in_a_row", 0))  # a streak across the stop still counts
        self.resumed_wall = state.get("wall_seconds")  # None: a checkpoint from before it was recorded
        self.load_state(state)
        self.last_good = str(path)
        # from --output's own checkpoints or a copy elsewhere alike: the abandoned later ones would be what
        # --resume latest continues, and what pruning keeps over the checkpoints this run writes
        if self.accelerator.is_main_process:
            self.ckpts.drop_newer_than(start)
        self.accelerator.wait_for_everyone()
        log.info("resuming from %s (%s %d of %d)", path, self.unit, start, self.total_steps)
        return start
