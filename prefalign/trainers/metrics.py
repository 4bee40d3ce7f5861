"""Metrics out of a run: ``metrics.jsonl`` (one JSON object per logged step) and the trackers of --report-to
(`prefalign.trackers`: TensorBoard by default)."""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from prefalign.runio import keep_rows_through
from prefalign.trackers import DEFAULT_REPORT_TO, TrackedRun, Tracker, finite_scalars, keys_by_step, open_trackers

METRICS_FILE = "metrics.jsonl"
EVAL_PAIRS = "eval_pairs.jsonl"
"""A pair trainer's outcome on each held-out pair at its final evaluation (`prefalign.trainers.loop.Trainer`)."""


class MetricsLogger:
    """Appends rows to ``metrics.jsonl`` and hands their finite scalars to every tracker; on resume, rows after the
    resumed step are cut so the file reads as one uninterrupted run, and the clock goes on from ``resume_wall`` (the
    checkpoint's). Disabled (a process other than the main one), it writes nothing and opens no tracker."""

    def __init__(
        self,
        out_dir: Path,
        resume_step: int | None = None,
        enabled: bool = True,
        trackers: tuple[str, ...] = (DEFAULT_REPORT_TO,),
        run_name: str | None = None,
        config: dict[str, Any] | None = None,
        resume_wall: float | None = None,
    ):
        self.enabled = enabled
        self.path = Path(out_dir) / METRICS_FILE
        self.trackers: list[Tracker] = []
        self.start = time.perf_counter()
        self.offset = 0.0  # wall seconds of the run before a resume
        self.kept: list[dict] = []  # the rows a resumed run keeps (main process)
        if not enabled:
            return
        cut: list[dict] = []  # rows the run being resumed logged after its checkpoint: its trackers hold them
        if resume_step is not None and self.path.exists():
            self.kept, cut = keep_rows_through(self.path, resume_step)
        if resume_step is not None:
            if resume_wall is not None:  # the clock when the checkpoint was written (`clock`), metrics or not
                self.offset = resume_wall
            elif self.kept:  # a checkpoint written before it recorded the clock: the last row's (the rows
                self.offset = float(self.kept[-1].get("wall_seconds", 0.0))  # after it are lost time)
        elif self.path.exists():
            self.path.unlink()
        run = TrackedRun(Path(out_dir), run_name or str(out_dir), config or {}, resume_step, keys_by_step(cut))
        self.trackers = open_trackers(trackers, run)

    def kept_row_with(self, step: int, prefix: str) -> bool:
        """Whether a kept row of ``step`` holds a metric named ``prefix...`` (main process; False elsewhere)."""
        return any(r.get("step") == step and any(k.startswith(prefix) for k in r) for r in self.kept)

    def logged_at(self, step: int) -> dict[str, float]:
        """The kept rows of ``step`` merged, without ``step``, ``wall_seconds`` and the ``eval/`` keys: what the
        training loop returned for its last step, for a run resumed at its end ({} on other processes)."""
        merged: dict[str, float] = {}
        skip = ("step", "wall_seconds")
        for row in (r for r in self.kept if r.get("step") == step):
            merged.update({k: v for k, v in row.items() if k not in skip and not k.startswith("eval/")})
        return merged

    def clock(self) -> float:
        """Wall-clock seconds since the run started, a resumed run's earlier time included (``wall_seconds``)."""
        return round(self.offset + time.perf_counter() - self.start, 3)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        wall = self.clock()
        row = {"step": step, "wall_seconds": wall, **{k: _clean(v) for k, v in metrics.items()}}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        scalars = finite_scalars(metrics)
        for tracker in self.trackers:
            tracker.log(step, scalars)

    def log_table(self, step: int, tag: str, rows: list[dict[str, Any]]) -> None:
        """Rows of equal keys (sampled completions) to every tracker; metrics.jsonl holds scalars only."""
        for tracker in self.trackers:
            tracker.log_table(step, tag, rows)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep the fact visible
    return v


class RunningMean:
    """Averages named stats over the micro-batches since the last log (weighted by count)."""

    def __init__(self):
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, float] = defaultdict(float)

    def add(self, stats: dict, weight: float = 1.0) -> None:
        for k, v in stats.items():
            self.sums[k] += float(v) * weight
            self.counts[k] += weight

    def merge(self, other: RunningMean) -> None:
        """Add ``other``'s sums and weights to this one."""
        for k in other.sums:
            self.sums[k] += other.sums[k]
            self.counts[k] += other.counts[k]

    def pop(self) -> dict[str, float]:
        out = {k: self.sums[k] / self.counts[k] for k in self.sums if self.counts[k]}
        self.sums.clear()
        self.counts.clear()
        return out
