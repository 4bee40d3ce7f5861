"""How far a running command is, readable by another process: a tqdm bar that can also keep a small file.

A stage of `prefalign compare` runs in its own process with its output going to ``logs/NAME.log``. Its tqdm bars
would garble that log with carriage-return refreshes, and the race could only scrape them. So the race names a
file in `PROGRESS_ENV`, and in such a process every `ProgressBar` draws nothing and instead rewrites that file
(atomically) with one `Progress` record: what it counts, how far it is, since when, and the run's last logged
metrics. The race reads it back (`prefalign.compare.progress`). Outside a race a `ProgressBar` is a plain tqdm bar,
drawn at most every `OFF_TERMINAL_SECONDS` when its stream is not a terminal.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from prefalign.runio import atomic_write_text

OFF_TERMINAL_SECONDS = 30.0
"""Least time between two draws of a bar whose stream is not a terminal (a redirected log, CI): tqdm's 0.1 s would
write a carriage-return refresh per unit into the file, tens of thousands in an hour of fast steps."""
PROGRESS_ENV = "PREFALIGN_PROGRESS_FILE"
"""Set by `prefalign compare` for each stage: the file its bars report to instead of the terminal."""
MIN_WRITE_SECONDS = 0.2
"""Least time between two writes of the file (the race reads it twice a second); the last unit is always written."""


@dataclass(frozen=True)
class Progress:
    """One bar's state, as a process reports it."""

    task: str
    """What the bar counts: its label (``ppo``, ``reward``, ``prefs``, ``start log-probs``)."""
    done: int
    total: int
    unit: str
    elapsed: float
    """Seconds since the bar was made."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """A training run's last logged metrics (its last ``metrics.jsonl`` row); empty for other bars."""

    @property
    def seconds_left(self) -> float | None:
        """Until ``total``, at the rate so far; None before the first unit is done."""
        if self.done <= 0:
            return None
        return self.elapsed / self.done * max(self.total - self.done, 0)

    @classmethod
    def read(cls, path: Path) -> Progress | None:
        """The record in ``path``; None where there is none yet (the process has not made a bar) or it is gone."""
        try:
            return cls(**json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            return None


class ProgressBar(tqdm):
    """A tqdm bar that, where `PROGRESS_ENV` names a file, reports there instead of drawing.

    Takes tqdm's arguments; ``desc`` names the task and a total is needed (given, or the iterable's length).
    ``disable=True`` (a process other than the main one) draws and reports nothing. The bar keeps its own count
    (tqdm stops counting when it draws nothing); `update` also takes the run's last logged ``metrics``.
    """

    def __init__(
        self,
        iterable: Sequence | None = None,
        *,
        desc: str,
        total: int | None = None,
        unit: str = "it",
        disable: bool | None = False,
        **kwargs: Any,
    ):
        path = os.environ.get(PROGRESS_ENV)
        if total is None:
            if iterable is None:
                raise TypeError(f"ProgressBar {desc!r}: give a total or a sized iterable")
            total = len(iterable)
        stream = kwargs.get("file") or sys.stderr
        terminal = hasattr(stream, "isatty") and stream.isatty()
        # a notebook's widget bar (tqdm.auto's choice there) is no stream of text: it keeps tqdm's interval
        self.throttled = "mininterval" not in kwargs and not terminal and "notebook" not in tqdm.__module__
        if self.throttled:
            kwargs["mininterval"] = OFF_TERMINAL_SECONDS
        super().__init__(iterable, desc=desc, total=total, unit=unit, disable=True if path else disable, **kwargs)
        self.report_to = Path(path) if path and disable is not True else None
        self.task, self.counted, self.reported_unit = desc, total, unit
        self.count = int(kwargs.get("initial", 0))
        self.metrics: dict[str, Any] = {}
        self.started = time.perf_counter()
        self.written_at = float("-inf")
        self._report()  # before the first unit: the race shows what is being counted at once

    def __iter__(self) -> Iterator:
        for item in super().__iter__():
            yield item
            self._advance(1)

    def update(self, n: float = 1, metrics: dict[str, Any] | None = None) -> bool | None:
        """Advance by ``n``; ``metrics``: the run's last logged row, to report with the count."""
        shown = super().update(n)
        if metrics is not None:
            self.metrics = metrics
        self._advance(n)
        return shown

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        """tqdm's, without the forced redraw off a terminal (a training loop sets it every step): the postfix shows
        at the bar's next timed draw."""
        super().set_postfix(ordered_dict, refresh=refresh and not self.throttled, **kwargs)

    def _advance(self, n: float) -> None:
        self.count += int(n)
        self._report()

    def _report(self) -> None:
        if self.report_to is None:
            return
        now = time.perf_counter()
        if self.count < self.counted and now - self.written_at < MIN_WRITE_SECONDS:
            return
        self.written_at = now
        progress = Progress(
            self.task, self.count, self.counted, self.reported_unit, round(now - self.started, 3), self.metrics
        )
        atomic_write_text(self.report_to, json.dumps(asdict(progress)))
