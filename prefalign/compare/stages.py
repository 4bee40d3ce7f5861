"""Run the stages of a comparison as subprocesses, measure each, and skip finished ones on resume.

Each stage is a normal prefalign command (``prefalign reward ...``) in its own process, so its wall
time and peak memory are its own: ``os.wait4`` returns the child's resource usage, ``ru_maxrss``
its peak resident set. A stage's record lands in ``stages.json`` only after it succeeded, so an
interrupted comparison resumes at the first unfinished stage.

A stage's output goes to ``logs/NAME.log``; its progress bars write ``logs/NAME.progress.json`` instead
(`prefalign.progress`), which the race's terminal shows while it runs (`prefalign.compare.progress`). A failed
stage prints its log's last lines and the log's path.

A stage ends with the comparison, however the comparison ends (``kill -9``, the OOM killer): on Linux the kernel
sends it SIGKILL when its parent dies (``PR_SET_PDEATHSIG``); elsewhere the stage watches its parent's pid
(`exit_with_parent`). Nothing is left writing into a stage directory that ``--resume`` will run again.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, Protocol

from prefalign.errors import UserError
from prefalign.progress import PROGRESS_ENV
from prefalign.runio import atomic_write_text

if TYPE_CHECKING:
    import resource

STATE_FILE = "stages.json"
PARENT_ENV = "PREFALIGN_STAGE_PARENT"
"""Set (to the comparison's pid) for a stage that must watch its parent itself: where prctl is missing."""
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
TAIL_LINES = 20
"""Lines of a failed stage's log printed before the race stops."""


def death_signal_preexec():
    """A ``preexec_fn`` that has the kernel SIGKILL the child when this process dies; None off Linux.

    SIGKILL, not SIGTERM: an unfinished stage is run again from the start on ``--resume``, so nothing it could
    save on the way out would be used, and it must free its directory's lock at once.

    Why ``preexec_fn`` is safe here, though the subprocess docs warn against it when threads exist (tqdm's
    monitor thread does): the danger is a lock another thread held at ``fork``, which stays locked in the
    single-threaded child. This function takes none: ``prctl`` is looked up here, in the parent, so the child
    only makes one foreign call and reads ``getppid`` before ``exec``.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    parent = os.getpid()

    def set_death_signal():
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the comparison died before the line above: no one would signal us
            os.kill(os.getpid(), signal.SIGKILL)

    return set_death_signal


def exit_with_parent(parent: int, interval: float = 1.0) -> threading.Thread:
    """Where the kernel cannot signal a stage when its comparison dies: a daemon thread that kills this process
    once its parent is no longer ``parent`` (an orphan is re-parented)."""

    def watch():
        while os.getppid() == parent:
            time.sleep(interval)
        os.kill(os.getpid(), signal.SIGKILL)

    thread = threading.Thread(target=watch, name="exit-with-parent", daemon=True)
    thread.start()
    return thread


@dataclass
class StageResult:
    name: str
    out_dir: str
    wall_seconds: float
    peak_rss_mb: float
    peak_gpu_mb: float | None = None
    """A trainer's ``peak_gpu_allocated_mb`` (run.json) on CUDA; None on CPU and for the sampling stages."""


class StageMonitor(Protocol):
    """Who is told of each stage as it runs (`prefalign.compare.progress.RaceProgress`: the terminal)."""

    def skipped(self, name: str, result: StageResult) -> None:
        """Stage ``name`` finished before (``--resume``)."""

    def running(self, name: str, progress_file: Path) -> AbstractContextManager[None]:
        """Entered while stage ``name`` runs; its bars report to ``progress_file`` (`prefalign.progress`)."""

    def finished(self, name: str, result: StageResult) -> None:
        """Stage ``name`` succeeded."""


class StageRunner:
    def __init__(self, root: Path, resume: bool, monitor: StageMonitor):
        self.root = root
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.state_path = root / STATE_FILE
        self.done: dict[str, dict] = {}
        if resume and self.state_path.exists():
            try:
                self.done = json.loads(self.state_path.read_text())
            except ValueError:
                raise UserError(f"{self.state_path}: unreadable stage record; rerun with --overwrite") from None
        self.monitor = monitor

    def run(self, name: str, command: str, args: list[str]) -> StageResult:
        """Run ``prefalign COMMAND ARGS --output ROOT/NAME`` unless it finished before."""
        out = self.root / name
        if name in self.done and Path(self.done[name]["out_dir"]).exists():
            result = StageResult(**self.done[name])
            self.monitor.skipped(name, result)
            return result
        log = self.logs / f"{name.replace('/', '_')}.log"
        progress_file = log.with_suffix(".progress.json")
        progress_file.unlink(missing_ok=True)  # an interrupted race's last count is not this run's
        cmd = [sys.executable, "-m", "prefalign", command, *map(str, args), "--output", str(out), "--overwrite"]
        # the stage's own bars report to the progress file (the race draws them); TQDM_DISABLE silences
        # the libraries' bars, which would garble the log
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
            "TQDM_DISABLE": "1",
            PROGRESS_ENV: str(progress_file),
        }
        with self.monitor.running(name, progress_file):
            returncode, wall, usage = _run_logged(cmd, env, log)
        progress_file.unlink(missing_ok=True)
        if returncode != 0:
            _report_failure(name, returncode, log)
        result = StageResult(  # ru_maxrss: KiB
            name, str(out), round(wall, 3), round(usage.ru_maxrss / 1024, 1), recorded_gpu_peak(out)
        )
        # a finished stage is never resumed: its optimizer checkpoints are dead weight (several times the
        # model's size); final/ (and value/ for PPO) stay. Deleted after the wall time is taken, so not charged
        # to the stage.
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        self.done[name] = asdict(result)
        atomic_write_text(self.state_path, json.dumps(self.done, indent=2))
        self.monitor.finished(name, result)
        return result


def recorded_gpu_peak(out: Path) -> float | None:
    """A trainer stage's GPU peak in MiB (``peak_gpu_allocated_mb`` of its run.json, written on CUDA); None for a
    CPU run and for the sampling stages, which write no run.json."""
    info = out / "run.json"
    return json.loads(info.read_text()).get("peak_gpu_allocated_mb") if info.is_file() else None


def _run_logged(cmd: list[str], env: dict[str, str], log: Path) -> tuple[int, float, resource.struct_rusage]:
    """Run ``cmd`` with its output (after the command line itself) into ``log``; its exit code, wall seconds and
    resource usage. The child ends with this process (`death_signal_preexec`, else `PARENT_ENV`)."""
    preexec = death_signal_preexec()
    if preexec is None:
        env = {**env, PARENT_ENV: str(os.getpid())}
    start = time.perf_counter()
    with log.open("w", encoding="utf-8") as log_file:
        log_file.write("$ " + " ".join(cmd) + "\n")
        log_file.flush()
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, preexec_fn=preexec)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            raise
    return os.waitstatus_to_exitcode(status), time.perf_counter() - start, usage


def log_tail(log: Path, lines: int = TAIL_LINES) -> list[str]:
    """The last ``lines`` non-blank lines of ``log`` as a terminal shows them (a carriage-return refresh: its last
    state)."""
    with log.open(encoding="utf-8", errors="replace", newline="") as f:  # newline="": keep the carriage returns
        text = f.read()
    shown = [line.rsplit("\r", 1)[-1].rstrip() for line in text.split("\n")]
    return [line for line in shown if line.strip()][-lines:]


def _report_failure(name: str, returncode: int, log: Path) -> NoReturn:
    """Print the failed stage's last lines (above any progress bar), then stop the race with its log's path."""
    from tqdm.auto import tqdm

    tail = log_tail(log)
    # one write: off a terminal each write redraws the race's bar after it
    tqdm.write(
        "\n".join(
            [
                f"stage {name} failed (exit {returncode}); the last {len(tail)} lines of {log}:",
                *(f"  | {line}" for line in tail),
            ]
        ),
        file=sys.stderr,
    )
    last = tail[-1] if tail else "(no output)"
    raise UserError(
        f"stage {name} failed (exit {returncode}): {last} — full log: {log}; fix it and "
        "rerun with --resume to keep the finished stages"
    )
