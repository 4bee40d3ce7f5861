"""Checkpoints written atomically (temp dir + rename), found and validated on resume.

A checkpoint directory ``checkpoints/step-0000100/`` holds ``model.pt`` (trainable parameters only:
the whole model for full fine-tuning, the adapter for LoRA), ``optimizer.pt``, ``scheduler.pt``,
``rng.pt`` and, written last, ``state.json``. Parameters and optimizer state are stored unsharded and keyed
by parameter name, so a checkpoint written under FSDP resumes on any number of processes, sharded or not.
Under DeepSpeed, DeepSpeed's own sharded files replace model.pt and optimizer.pt (in ``deepspeed/``, written by
`prefalign.trainers.backend.DeepSpeedBackend`).
A directory without a readable ``state.json`` is incomplete and is skipped.

Every ``.pt`` file holds tensors and plain values only (dicts, lists, tuples, numbers, strings, None) and is read
with ``torch.load(weights_only=True)``, so a checkpoint from anywhere else cannot run code on ``--resume``: one
holding any other object is refused (`UnsafeCheckpoint`). DeepSpeed's own files in ``deepspeed/`` are read by
DeepSpeed, not here (see docs/reliability.md).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil
import tempfile
from pathlib import Path
from typing import cast

import torch

from prefalign.errors import UserError
from prefalign.runio import as_created

log = logging.getLogger(__name__)
STATE_FILE = "state.json"
PREFIX = "step-"


RESUME_MAY_CHANGE = frozenset(
    # where the run writes and how long it trains (a resumed run may be extended: the schedule follows the new
    # length), what it logs, saves, evaluates or how it chunks the same computation, and how the global batch is
    # split (on another number of processes: the global batch itself is checked, `check_resumable`)
    [
        "batch_size",
        "grad_accum",
        "output",
        "overwrite",
        "resume",
        "max_steps",
        "epochs",
        "episodes",
        "logging_steps",
        "report_to",
        "save_steps",
        "save_total_limit",
        "max_nonfinite_steps",
        "merge_lora",
        "forward_batch_size",
        "gradient_checkpointing",
        "lean_activations",
        "eval_steps",
        "sample_every",
        "heldout_every",
        "heldout_limit",
        "reward_batch_size",
        "decoder",
    ]
)
"""Config fields a resumed run may change; any other change is refused (`check_same_settings`)."""


def check_same_settings(path: Path, saved: dict | None, now: dict) -> None:
    """Refuse a resume whose training settings differ from those the checkpoint was written with: the optimizer and
    schedule come back from the checkpoint, so a new --learning-rate would be ignored while config.yaml said
    otherwise, and a new --data, --seed or loss would continue another run. ``saved``/``now``: the configs as plain
    JSON values (`prefalign.runio.to_plain`); None (a checkpoint written before they were recorded): not checked."""
    if saved is None:
        return
    changed = sorted(k for k in saved.keys() | now.keys() if k not in RESUME_MAY_CHANGE and saved.get(k) != now.get(k))
    if not changed:
        return
    flags = ["--" + k.replace("_", "-") for k in changed]
    more = f" (also {', '.join(flags[1:])})" if len(flags) > 1 else ""
    raise UserError(
        f"{path}: written with {flags[0]} {saved.get(changed[0])!r}, now {now.get(changed[0])!r}{more}; resume with "
        "the settings in the run's config.yaml, or start a new --output"
    )


class UnsafeCheckpoint(UserError):
    """A checkpoint file that holds more than tensors and plain values: refused, never skipped for an older one."""


def rng_state() -> dict:
    """Every generator a run draws from, as tensors and plain values (loadable with ``weights_only=True``).

    Python's Mersenne Twister state (624 words and a position) and numpy's (624 uint32 words) become int64
    tensors: every word fits, so `set_rng_state` restores them exactly."""
    import numpy as np

    py_version, py_words, py_gauss = random.getstate()
    # legacy=True is the default; numpy's stub types the no-argument call as the dict of legacy=False
    np_state = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state(legacy=True))
    np_kind, np_words, np_pos, np_has_gauss, np_gauss = np_state
    state = {
        "torch": torch.get_rng_state(),
        "python": {"version": py_version, "words": torch.tensor(py_words, dtype=torch.int64), "gauss": py_gauss},
        "numpy": {
            "kind": str(np_kind),
            "words": torch.from_numpy(np_words.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
    }
    if torch.cuda.is_available():  # dropout on a GPU draws from its own generators
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Put back an `rng_state`."""
    import numpy as np

    torch.set_rng_state(state["torch"])
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["words"].tolist()), py["gauss"]))
    np.random.set_state(
        (npy["kind"], npy["words"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["gauss"])
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def process_rng_state(saved: dict, rank: int) -> dict:
    """Process ``rank``'s `rng_state` in a checkpoint's ``rng`` object: every process saves its own (processes
    holding rows of other lengths draw dropout masks of other sizes, so their generators part ways); a launch of
    more processes than saved them reuses them in turn; a checkpoint from before holds the main process's only."""
    states = saved.get("processes")
    return saved if states is None else states[rank % len(states)]


def load_tensors_only(path: Path):
    """``torch.load`` of a checkpoint file that may hold tensors and plain values only: nothing in it can run
    code. Anything else is an `UnsafeCheckpoint`, named by the globals torch found in it."""
    from torch.serialization import get_unsafe_globals_in_checkpoint

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        try:
            found = get_unsafe_globals_in_checkpoint(path)
        except (ValueError, RuntimeError, OSError):  # not torch's zip format: prefalign never writes a bare pickle
            found = ["a bare pickle"]
        except pickle.UnpicklingError as e:  # a damaged pickle (a flipped byte): unreadable, not unsafe
            raise UserError(
                f"{path}: checkpoint unreadable (UnpicklingError: {e}); resume from an older one with --resume <dir>"
            ) from None
    if path.name == "rng.pt" and found and all(name.startswith("numpy.") for name in found):
        raise UnsafeCheckpoint(
            f"{path}: written by prefalign before checkpoints held tensors only (its RNG state "
            "holds numpy objects, which prefalign no longer unpickles); finish that run with the "
            "prefalign version that wrote it, or start it again without --resume"
        ) from None
    names = ", ".join(found[:4]) or "content torch's safe loader refuses"
    raise UnsafeCheckpoint(
        f"{path}: holds objects that could run code when loaded ({names}); prefalign loads only "
        "tensors and plain values, so it refuses this checkpoint: resume only from checkpoints "
        "prefalign wrote, or start again without --resume"
    ) from None


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # full (unsharded) tensors, gathered to the CPU of the main process: a checkpoint that any process count or
    # sharding can resume. Plain and DDP models go through the same calls (nothing to gather).
    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def training_state(model, optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """``(parameters, optimizer state)`` of ``model``'s trainable parameters, unsharded, on the CPU.

    A collective under FSDP: every process calls it; the main process gets the tensors (others may get empty
    dicts). Parameters are keyed by name, the optimizer state
    by parameter name too (torch.distributed.checkpoint's format), not by position. A tied weight is stored
    once, under its first name.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    # torch types every state dict as dict[str, ValueType]; a model's holds tensors
    params = cast("dict[str, torch.Tensor]", get_model_state_dict(model, options=_options(ignore_frozen_params=True)))
    optim = get_optimizer_state_dict(model, optimizer, options=_options(ignore_frozen_params=True))
    return without_tied_aliases(model, params), optim


def full_model_state(model) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``model``, unsharded, on the main process's CPU (a collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = cast("dict[str, torch.Tensor]", get_model_state_dict(model, options=_options()))  # tensors (see above)
    return without_tied_aliases(model, state)


def without_tied_aliases(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without the second names of tied parameters (``lm_head.weight`` of tied embeddings): gathered
    copies no longer share storage, so they would be written twice."""
    first: dict[int, str] = {}
    aliases = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(p), name) != name:
            aliases.add(name)
    return {k: v for k, v in state.items() if k not in aliases}


def load_training_state(model, optimizer, params: dict[str, torch.Tensor], optim: dict, where: Path) -> None:
    """Put a `training_state` back: every process passes the full state; under FSDP each keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}  # tied aliases too
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(trainable - params.keys())
    unknown = sorted(params.keys() - names)
    if missing or unknown:
        raise UserError(
            f"{where}: checkpoint does not match this model (missing {missing[:3]}, unexpected "
            f"{unknown[:3]}); resume with the same --model and LoRA settings"
        )
    opts = StateDictOptions(full_state_dict=True, strict=False)  # strict=False: frozen weights are not in it
    set_model_state_dict(model, params, options=opts)  # type: ignore[arg-type]  # torch: dict[str, ValueType]
    set_optimizer_state_dict(model, optimizer, optim, options=opts)


class CheckpointManager:
    def __init__(self, out_dir: Path, keep: int):
        self.root = Path(out_dir) / "checkpoints"
        self.keep = keep

    def path(self, step: int) -> Path:
        """Where checkpoint ``step`` lives once written: ``checkpoints/step-0000042``."""
        return self.root / f"{PREFIX}{step:07d}"

    def staging_dir(self, step: int, create: bool) -> Path:
        """A temp directory every process can name (``create`` on the main process only, before the others write
        into it): for checkpoints whose shards each process writes itself (DeepSpeed), then `save` ``into`` it."""
        tmp = self.root / f".tmp-{self.path(step).name}-shared"
        if create:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        return tmp

    def save(self, step: int, objects: dict[str, dict], state: dict, into: Path | None = None) -> Path:
        """Write ``objects`` (name -> state dict) and ``state`` (JSON) as checkpoint ``step``, in a temp directory
        (``into``: a `staging_dir` already holding other files) renamed into place."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.path(step)
        tmp = into or Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=self.root))
        try:
            for name, obj in objects.items():
                torch.save(obj, tmp / f"{name}.pt")
            (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=2))
            as_created(tmp, directory=True)
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
        except (OSError, RuntimeError) as e:  # a full disk surfaces as either (torch's zip writer: RuntimeError)
            shutil.rmtree(tmp, ignore_errors=True)
            free = shutil.disk_usage(self.root).free / 2**30
            first = (str(e).splitlines() or [""])[0][:160]
            raise UserError(
                f"{final}: could not write the checkpoint ({type(e).__name__}: {first}); {free:.1f} GiB "
                "free on that disk. Free space (or lower --save-total-limit) and rerun with "
                "--resume latest: the previous checkpoints are intact"
            ) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._prune()
        return final

    def _prune(self) -> None:
        for old in self.complete()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for junk in self.root.glob(".tmp-*"):
            shutil.rmtree(junk, ignore_errors=True)

    def drop_newer_than(self, step: int) -> list[str]:
        """Remove the checkpoints after ``step`` (a run resumed from an older checkpoint abandons them: left in
        place, a later ``--resume latest`` would continue the abandoned run); returns their names."""
        newer = sorted(
            d
            for d in self.root.glob(f"{PREFIX}*")
            if d.name[len(PREFIX) :].isdigit() and int(d.name[len(PREFIX) :]) > step
        )
        for d in newer:
            shutil.rmtree(d)
        if newer:
            log.warning(
                "resumed from step %d: removed the later checkpoints %s", step, ", ".join(d.name for d in newer)
            )
        return [d.name for d in newer]

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first; incomplete or unreadable ones are reported and skipped."""
        if not self.root.is_dir():
            return []
        good = []
        named = [d for d in self.root.glob(f"{PREFIX}*") if d.name[len(PREFIX) :].isdigit()]
        for d in sorted(named, key=lambda d: int(d.name[len(PREFIX) :])):  # by step: names pad to 7 digits only
            try:
                json.loads((d / STATE_FILE).read_text())
            except (OSError, ValueError) as e:
                log.warning("skipping incomplete checkpoint %s (%s)", d, type(e).__name__)
                continue
            good.append(d)
        return good

    def resolve(self, resume: str) -> Path:
        """The checkpoint to resume from: 'latest' or an explicit directory."""
        if resume == "latest":
            found = self.complete()
            if not found:
                raise UserError(f"{self.root}: no complete checkpoint to resume from; start without --resume")
            return found[-1]
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise UserError(
                f"{resume}: not a complete checkpoint (no {STATE_FILE}); use --resume latest or a "
                f"directory under {self.root}"
            )
        return path

    def load_for_resume(self, resume: str) -> tuple[Path, dict, dict]:
        """``(path, state, objects)`` to resume from. With 'latest', a checkpoint that cannot be read
        (a truncated file, bad JSON) is reported and skipped in favour of the next older one."""
        if resume != "latest":
            path = self.resolve(resume)
            return (path, *self.load(path))
        candidates = self.complete()
        if not candidates:
            raise UserError(f"{self.root}: no checkpoint to resume from; start again without --resume")
        for path in reversed(candidates):
            try:
                return (path, *self.load(path))
            except UnsafeCheckpoint:  # a tampered (or pre-safe-format) directory: do not quietly resume an older one
                raise
            except UserError as e:
                log.warning("skipping unreadable checkpoint: %s", e)
        raise UserError(
            f"{self.root}: no readable checkpoint to resume from ({len(candidates)} found, all "
            "unreadable); start again without --resume"
        )

    @staticmethod
    def load(path: Path) -> tuple[dict, dict]:
        """Return ``(state, objects)`` of a checkpoint; each ``.pt`` through `load_tensors_only`."""
        try:
            state = json.loads((path / STATE_FILE).read_text())
            objects = {p.stem: load_tensors_only(p) for p in sorted(path.glob("*.pt"))}
        except (OSError, ValueError, RuntimeError, EOFError) as e:
            raise UserError(
                f"{path}: checkpoint unreadable ({type(e).__name__}: {e}); resume from an older one with --resume <dir>"
            ) from None
        return state, objects
