"""Experiment trackers: where a run's metrics go besides ``metrics.jsonl`` (``--report-to``).

Every tracker writes inside the run's output directory and needs no network:

    tensorboard   OUT/tensorboard/events.out.tfevents.*       tensorboard --logdir OUT
    trackio       OUT/trackio/prefalign.db (SQLite)            TRACKIO_DIR=OUT/trackio trackio show
    wandb         OUT/wandb/offline-run-*/ (an offline run)    wandb sync OUT/wandb/offline-run-*

trackio and wandb are optional extras, imported only when asked for (`load_tracker_packages`, before a run
loads anything, so a missing one stops it at once). A user's own ``TRACKIO_DIR`` (one database for many runs)
and ``WANDB_MODE`` / ``WANDB_PROJECT`` win over these defaults.

A tracker gets finite scalars per step (``log``), optionally a table (``log_table``), and ``close``; only the
main process of a launch makes one (`prefalign.trainers.metrics.MetricsLogger`).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import math
import os
import sqlite3
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from prefalign.errors import UserError

log = logging.getLogger(__name__)

TRACKER_NAMES = ("tensorboard", "trackio", "wandb")
DEFAULT_REPORT_TO = "tensorboard"
PROJECT = "prefalign"
"""The trackio / wandb project every run logs into (wandb: unless WANDB_PROJECT says otherwise)."""


def parse_report_to(value: str) -> tuple[str, ...]:
    """``--report-to``'s comma list as tracker names in order: ``"tensorboard,wandb"`` -> ``("tensorboard",
    "wandb")``; ``"none"`` -> ``()``. A ValueError naming the flag for anything else."""
    names = [name.strip() for name in value.split(",")]
    if names == ["none"]:
        return ()
    if not all(name in TRACKER_NAMES for name in names):
        raise ValueError(f"--report-to takes a comma list of {', '.join(TRACKER_NAMES)} (or none alone), got {value!r}")
    return tuple(dict.fromkeys(names))  # a name given twice still makes one tracker


@dataclass(frozen=True)
class TrackedRun:
    """What every tracker is opened with."""

    out_dir: Path
    """The run's output directory: every tracker's files go under it."""
    name: str
    """The run's name in the tracker's UI (its --output as given)."""
    config: dict[str, Any]
    """The resolved config, plain values (`prefalign.runio.to_plain`)."""
    resume_step: int | None = None
    """The checkpoint step a resumed run continues from; None: a fresh run."""
    logged_after_checkpoint: dict[int, frozenset[str]] = field(default_factory=dict)
    """A resumed run: the metric names, per step, that the run it resumes wrote to metrics.jsonl after the
    checkpoint (the rows the resume cut). The resumed run logs those steps again; a tracker that cannot drop
    what it holds and that the killed run wrote to skips what it already has."""


class Tracker(Protocol):
    """One tracker of one run, opened by ``TRACKERS[name](run)`` (`open_trackers`)."""

    def log(self, step: int, scalars: dict[str, float]) -> None:
        """Finite scalars of optimizer step ``step`` (several calls may share a step)."""

    def log_table(self, step: int, tag: str, rows: list[dict[str, Any]]) -> None:
        """Rows of equal keys (the columns), e.g. sampled completions."""

    def close(self) -> None:
        """Flush and release; the tracker is not used again."""


def import_extra(package: str) -> ModuleType:
    """Import an optional tracker package, or stop in one line saying what to install."""
    try:
        return importlib.import_module(package)
    except ImportError:
        raise UserError(
            f"--report-to {package} needs the {package} package: pip install 'prefalign[{package}]'"
        ) from None


def _set_env(values: dict[str, str]) -> dict[str, str | None]:
    """Set each variable the user has not set; returns what to hand `_restore_env` to undo exactly that."""
    undo: dict[str, str | None] = {}
    for key, value in values.items():
        if key not in os.environ:
            undo[key] = None
            os.environ[key] = value
    return undo


def _restore_env(undo: dict[str, str | None]) -> None:
    """Put back what `_set_env` changed (None: the variable was unset)."""
    for key, value in undo.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


class TensorBoardTracker:
    """``OUT/tensorboard``; a resumed run drops the events after its checkpoint (``purge_step``)."""

    def __init__(self, run: TrackedRun):
        from torch.utils.tensorboard import SummaryWriter

        purge = None if run.resume_step is None else run.resume_step + 1
        self.writer = SummaryWriter(str(run.out_dir / "tensorboard"), purge_step=purge)

    @staticmethod
    def load_package(out_dir: Path) -> None:
        """Nothing to check: tensorboard is a core dependency."""

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def log_table(self, step: int, tag: str, rows: list[dict[str, Any]]) -> None:
        if rows:  # TensorBoard shows text as markdown: a table with a header row
            cells = [list(rows[0])] + [[str(value) for value in row.values()] for row in rows]
            lines = ["| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in row) + " |" for row in cells]
            lines.insert(1, "|" + "---|" * len(cells[0]))
            self.writer.add_text(tag, "\n".join(lines), step)

    def close(self) -> None:
        self.writer.close()


def trackio_dir(out_dir: Path) -> Path:
    """Where trackio's database goes: the user's TRACKIO_DIR, else ``OUT/trackio``."""
    return Path(os.environ.get("TRACKIO_DIR") or Path(out_dir) / "trackio")


class _WandbStyleTracker:
    """What trackio and wandb share (trackio copies wandb's API): ``run.log(values, step=)`` and
    ``module.Table(columns=, data=)``. A subclass opens ``self.run`` of ``self.module`` and closes it.

    Neither can drop rows it holds (TensorBoard's ``purge_step`` can), so a resumed run does not send again what
    the run it resumed sent after its checkpoint: ``held`` names, per step, the metrics this tracker has (a
    subclass fills it); a step's table is skipped with its metrics. An exact resume recomputes the same values;
    where it cannot (several GPUs) these trackers keep the first run's values for those steps, metrics.jsonl the
    resumed run's."""

    module: ModuleType
    run: Any
    held: dict[int, frozenset[str]]

    def log(self, step: int, scalars: dict[str, float]) -> None:
        held = self.held.get(step, frozenset())
        fresh = {k: v for k, v in scalars.items() if k not in held}
        if fresh:
            self.run.log(fresh, step=step)

    def log_table(self, step: int, tag: str, rows: list[dict[str, Any]]) -> None:
        # a step's samples are logged before its metrics (PPO), so a step with metrics held had its table sent
        if rows and step not in self.held:
            table = self.module.Table(columns=list(rows[0]), data=[list(row.values()) for row in rows])
            self.run.log({tag: table}, step=step)


class TrackioTracker(_WandbStyleTracker):
    """trackio's local SQLite database, ``OUT/trackio/prefalign.db``; a resumed run continues its trackio run."""

    def __init__(self, run: TrackedRun):
        self.module = self.load_package(run.out_dir)
        self.held = {}
        if run.resume_step is not None:
            self.held = trackio_held(trackio_dir(run.out_dir) / f"{PROJECT}.db", run.name, run.resume_step)
        # embed=False: never launch the dashboard server, even inside a notebook. Its banner is kept off the
        # terminal, as wandb's is: the `trackio show` it suggests would miss OUT/trackio without TRACKIO_DIR.
        with contextlib.redirect_stdout(io.StringIO()):
            self.run = self.module.init(
                project=PROJECT,
                name=run.name,
                config=run.config,
                embed=False,
                resume="never" if run.resume_step is None else "allow",
            )

    @staticmethod
    def load_package(out_dir: Path) -> ModuleType:
        """Import trackio writing to `trackio_dir`. trackio reads its directory once, when first imported, so a
        second run in this process is refused if it would write elsewhere (the CLI runs one per process)."""
        directory = trackio_dir(out_dir)
        loaded = sys.modules.get("trackio.utils")
        if loaded is not None:
            if Path(loaded.TRACKIO_DIR).resolve() != directory.resolve():
                raise UserError(
                    f"--report-to trackio: trackio already writes to {loaded.TRACKIO_DIR} in this "
                    f"process, not {directory}; run each run in its own process, or set TRACKIO_DIR "
                    "for all of them"
                )
            return sys.modules["trackio"]
        undo = _set_env({"TRACKIO_DIR": str(directory)})
        try:
            return import_extra("trackio")
        finally:
            _restore_env(undo)  # read at import: a stage this process starts later chooses its own

    def close(self) -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            self.module.finish()  # the module's, not the run's: it also clears what trackio's atexit would redo


def trackio_held(db: Path, run_name: str, after_step: int) -> dict[int, frozenset[str]]:
    """The metric names, per step after ``after_step``, that trackio's database holds for ``run_name``: what the
    killed run's trackio actually stored (it writes from a background thread, so a kill can lose its last rows
    that metrics.jsonl has). Read with sqlite3 from trackio's ``metrics`` table; where that table cannot be read
    (another trackio schema), nothing counts as held: a row logged twice rather than one lost."""
    if not db.exists():
        return {}
    try:
        with contextlib.closing(sqlite3.connect(db)) as connection:
            rows = connection.execute(
                "SELECT step, metrics FROM metrics WHERE run_name = ? AND step > ?", (run_name, after_step)
            ).fetchall()
        return keys_by_step([{**json.loads(metrics), "step": step} for step, metrics in rows])
    except (sqlite3.Error, ValueError, TypeError) as e:
        log.warning("%s: could not read what trackio holds (%s); a resumed run may log some rows twice", db, e)
        return {}


def keys_by_step(rows: list[dict]) -> dict[int, frozenset[str]]:
    """The metric names each step's rows hold (a step may have several rows: training, then evaluation)."""
    keys: dict[int, set[str]] = {}
    for row in rows:
        keys.setdefault(int(row.get("step", 0)), set()).update(k for k in row if k not in ("step", "wall_seconds"))
    return {step: frozenset(names) for step, names in keys.items()}


def _wandb_run_id(out_dir: Path) -> str | None:
    """The id of the newest wandb run in ``OUT/wandb`` (its directory ends in ``-<id>``), to resume it."""
    runs = sorted((out_dir / "wandb").glob("*run-*-*"), key=lambda path: path.name.split("-")[-2])
    return runs[-1].name.rsplit("-", 1)[1] if runs else None


class WandbTracker(_WandbStyleTracker):
    """An offline wandb run in ``OUT/wandb`` (WANDB_MODE=online streams it instead); a resumed run continues the
    wandb run it resumed. wandb's cache, data and config directories default to ``OUT/wandb`` too, so nothing is
    written in the home directory."""

    def __init__(self, run: TrackedRun):
        wandb = self.module = self.load_package(run.out_dir)
        self.held = {}
        home = run.out_dir / "wandb"
        self.undo_env = _set_env(
            {
                "WANDB_MODE": "offline",
                "WANDB_CACHE_DIR": str(home / "cache"),
                "WANDB_DATA_DIR": str(home / "data"),
                "WANDB_CONFIG_DIR": str(home / "config"),
            }
        )
        run_id = None if run.resume_step is None else _wandb_run_id(run.out_dir)
        if run_id is not None:  # the killed run logged to wandb: it holds what metrics.jsonl held after the cut
            self.held = run.logged_after_checkpoint
        # console off: wandb leaves stdout/stderr alone (the progress bar, compare's stage logs)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", PROJECT),
            name=run.name,
            dir=str(run.out_dir),
            config=run.config,
            id=run_id,
            resume="allow" if run_id else None,
            settings=wandb.Settings(console="off", silent=True),
        )

    @staticmethod
    def load_package(out_dir: Path) -> ModuleType:
        """Import wandb (its directories are chosen when a run starts, not at import)."""
        return import_extra("wandb")

    def close(self) -> None:
        self.run.finish()
        if self.module.run is None:  # no other wandb run in this process (a notebook's own) would be cut short
            self.module.teardown()  # stops wandb's service process, which read this run's directories at start
        _restore_env(self.undo_env)


class TrackerClass(Protocol):
    """A tracker class of `TRACKERS`: ``load_package`` imports its package (or stops), a call opens a `Tracker`."""

    def load_package(self, out_dir: Path) -> object: ...

    def __call__(self, run: TrackedRun) -> Tracker: ...


TRACKERS: dict[str, TrackerClass] = {
    "tensorboard": TensorBoardTracker,
    "trackio": TrackioTracker,
    "wandb": WandbTracker,
}


def load_tracker_packages(names: tuple[str, ...], out_dir: str | os.PathLike) -> None:
    """Import every tracker's package now: a missing extra stops a run before it loads or writes anything."""
    for name in names:
        TRACKERS[name].load_package(Path(out_dir))


def open_trackers(names: tuple[str, ...], run: TrackedRun) -> list[Tracker]:
    """One tracker per name, in order."""
    return [TRACKERS[name](run) for name in names]


def finite_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The values a tracker can plot: finite numbers (metrics.jsonl keeps the rest, NaN as a string)."""
    return {key: value for key, value in metrics.items() if isinstance(value, (int, float)) and math.isfinite(value)}
