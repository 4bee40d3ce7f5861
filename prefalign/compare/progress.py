"""What the terminal shows while a comparison runs::

    compare:  40%|████      | 2/5 stages [01:10, seed-0/ppo, ~02:30 left]
    seed-0/ppo:  50%|█████     | 1/2 iter [00:31<00:31, objective/scores=0.412]

The first line counts stages and estimates the whole race's time left (`RaceClock`). The second is the running
stage's own bar: a thread reads the progress file the stage keeps (`prefalign.progress`) twice a second and shows
its count, the time left at its rate so far and the stage's key metric (`Stage.metric` in the arm table). A phase
that is not the stage's own command (sampling, log-probs) shows under its name (``seed-0/eval ppo log-probs``).
A finished stage leaves one line: ``seed-0/ppo: done in 01:02, peak 812 MB, 2/2 iter, objective/scores=0.412``.

Where stderr is no terminal (CI, a redirected log) nothing is refreshed while a stage runs: the stage counter
moves once per stage and each finished stage writes its one line.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from prefalign.compare.plan import PlannedStage
from prefalign.compare.stages import StageResult
from prefalign.progress import Progress

RACE_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} stages [{elapsed}{postfix}]"
STAGE_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}{postfix}]"
STARTING_FORMAT = "{desc}: starting [{elapsed}]"
"""The stage's bar before its first record (its process is still importing and loading)."""
POLL_SECONDS = 0.5


@dataclass
class RaceClock:
    """The race's time left, from the wall time of its finished stages.

    A stage is expected to take the mean time of the finished stages of its command, else of all finished
    stages, else (none finished yet) as long as the running stage is projected to take.
    """

    commands: list[str]
    """Each planned stage's command, in plan order."""
    finished: dict[int, float] = field(default_factory=dict)
    """Wall seconds of each finished stage by plan index (those finished before a resume included)."""

    def _mean(self, command: str | None) -> float | None:
        """Mean wall seconds of the finished stages of ``command`` (None: of all of them); None if there are none."""
        pool = [seconds for i, seconds in self.finished.items() if command in (None, self.commands[i])]
        return sum(pool) / len(pool) if pool else None

    def seconds_left(self, running: int, elapsed: float, bar_left: float | None) -> float | None:
        """Seconds to the race's end while stage ``running`` has run ``elapsed`` seconds and its bar (the phase it
        is in) projects ``bar_left`` more (None: no rate yet); None while nothing can be estimated."""
        own, anyone = self._mean(self.commands[running]), self._mean(None)
        if own is not None:
            now = max(own - elapsed, bar_left or 0.0)  # past its usual time: at least what its bar still projects
        elif bar_left is not None:
            now = bar_left
        elif anyone is not None:
            now = max(anyone - elapsed, 0.0)
        else:
            return None
        typical = anyone if anyone is not None else elapsed + now
        later = (self._mean(self.commands[i]) for i in range(running + 1, len(self.commands)) if i not in self.finished)
        return now + sum(typical if seconds is None else seconds for seconds in later)


def race_postfix(name: str, seconds_left: float | None) -> str:
    """The race bar's postfix: the running stage, and the race's time left once it can be estimated."""
    return name if seconds_left is None else f"{name}, ~{tqdm.format_interval(seconds_left)} left"


def stage_label(stage: PlannedStage, task: str) -> str:
    """``seed-0/ppo`` for the bar of the stage's own command, ``seed-0/eval ppo log-probs`` for another phase."""
    return stage.name if task == stage.command else f"{stage.name} {task}"


def metric_text(metrics: dict[str, Any], metric: str | None) -> str:
    """``name=value`` of the stage's key metric; empty for a stage without one or before it is logged."""
    value = metrics.get(metric) if metric else None
    if value is None:
        return ""
    return f"{metric}={value:.4g}" if isinstance(value, (int, float)) else f"{metric}={value}"


def finished_line(stage: PlannedStage, result: StageResult, last: Progress | None) -> str:
    """The line a finished stage leaves: its wall time, peak memory, last count of its own command, key metric."""
    parts = [f"{stage.name}: done in {tqdm.format_interval(result.wall_seconds)}", f"peak {result.peak_rss_mb:.0f} MB"]
    if last is not None and last.task == stage.command:
        parts.append(f"{last.done}/{last.total} {last.unit}")
    if last is not None and (text := metric_text(last.metrics, stage.metric)):
        parts.append(text)
    return ", ".join(parts)


class StageWatch:
    """The running stage's own bar under the race's, refreshed from its progress file by a thread."""

    def __init__(self, race: RaceProgress, stage: PlannedStage, path: Path):
        self.race, self.stage, self.path = race, stage, path
        self.index = race.index[stage.name]
        self.started = time.monotonic()
        self.task: str | None = None
        # smoothing=0: the time left is at the stage's mean rate, from its own clock (see `show`)
        self.bar = tqdm(total=None, desc=stage.name, position=1, leave=False, bar_format=STARTING_FORMAT, smoothing=0)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._poll, name="stage-progress", daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while not self.stopped.wait(POLL_SECONDS):
            self.refresh()

    def refresh(self) -> None:
        """Show the stage's last record, and the race's time left with it."""
        progress = Progress.read(self.path)
        if progress is not None:
            self.show(progress)
        else:
            self.bar.refresh()  # still starting: its clock ticks
        left = self.race.clock.seconds_left(
            self.index, time.monotonic() - self.started, progress.seconds_left if progress else None
        )
        self.race.bar.set_postfix_str(race_postfix(self.stage.name, left))

    def show(self, progress: Progress) -> None:
        bar = self.bar
        if progress.task != self.task:  # a new phase (sampling, then log-probs): a fresh count
            self.task = progress.task
            bar.bar_format, bar.unit = STAGE_FORMAT, progress.unit
            bar.set_description_str(stage_label(self.stage, progress.task), refresh=False)
            bar.reset(total=progress.total)  # after the label: reset draws the bar
        bar.n = progress.done
        bar.start_t = time.time() - progress.elapsed  # tqdm's clock is time.time; the stage's own elapsed wins
        bar.set_postfix_str(metric_text(progress.metrics, self.stage.metric), refresh=False)
        bar.refresh()

    def stop(self) -> None:
        """Stop polling, show the stage's last record, clear the bar's line."""
        self.stopped.set()
        self.thread.join()
        self.refresh()
        self.bar.close()


class RaceProgress:
    """The terminal of a race (see the module doc): the `StageRunner`'s monitor, told of every stage."""

    def __init__(self, plan: list[PlannedStage], live: bool | None = None):
        self.plan = plan
        self.index = {stage.name: i for i, stage in enumerate(plan)}
        self.clock = RaceClock([stage.command for stage in plan])
        # the running stage's bar only on a terminal: a log would keep every refresh
        self.live = sys.stderr.isatty() if live is None else live
        self.bar = tqdm(total=len(plan), desc="compare", unit="stage", bar_format=RACE_FORMAT, file=sys.stderr)
        self.last: dict[str, Progress | None] = {}

    def __enter__(self) -> RaceProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()

    def skipped(self, name: str, result: StageResult) -> None:
        """Stage ``name`` finished before (``--resume``): counted, and its time teaches the clock."""
        self.clock.finished[self.index[name]] = result.wall_seconds
        self.bar.set_postfix_str(f"{name} (done before)", refresh=False)
        self.bar.update(1)

    @contextmanager
    def running(self, name: str, progress_file: Path) -> Iterator[None]:
        """While stage ``name`` runs: its bar, read from ``progress_file`` (on a terminal); its last record is
        kept for its finished line. The bar is gone when this exits, so a failure's lines print below the race's."""
        index = self.index[name]
        self.bar.set_postfix_str(race_postfix(name, self.clock.seconds_left(index, 0.0, None)))
        watch = StageWatch(self, self.plan[index], progress_file) if self.live else None
        try:
            yield
        finally:
            if watch is not None:
                watch.stop()
            self.last[name] = Progress.read(progress_file)

    def finished(self, name: str, result: StageResult) -> None:
        """Stage ``name`` succeeded: its line above the bars, one more stage counted."""
        index = self.index[name]
        self.clock.finished[index] = result.wall_seconds
        tqdm.write(finished_line(self.plan[index], result, self.last.get(name)), file=sys.stderr)
        self.bar.update(1)
