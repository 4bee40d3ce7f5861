"""Metrics out of a run: ``metrics.jsonl`` (one JSON object per logged step) and TensorBoard."""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    """Appends rows to ``metrics.jsonl`` and TensorBoard; on resume, rows after the resumed step are cut
    so the file reads as one uninterrupted run."""

    def __init__(self, out_dir: Path, resume_step: int | None = None, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(out_dir) / METRICS_FILE
        self.writer = None
        self.start = time.perf_counter()
        self.offset = 0.0  # wall seconds of the run before a resume
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            if kept:
                self.offset = float(json.loads(kept[-1]).get("wall_seconds", 0.0))
        elif self.path.exists():
            self.path.unlink()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(out_dir) / "tensorboard"),
                                    purge_step=None if resume_step is None else resume_step + 1)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        wall = round(self.offset + time.perf_counter() - self.start, 3)
        row = {"step": step, "wall_seconds": wall, **{k: _clean(v) for k, v in metrics.items()}}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.writer.add_scalar(k, v, step)

    def log_text(self, step: int, tag: str, text: str) -> None:
        if self.enabled:
            self.writer.add_text(tag, text, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


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

    def merge(self, other: "RunningMean") -> None:
        """Add ``other``'s sums and weights to this one."""
        for k in other.sums:
            self.sums[k] += other.sums[k]
            self.counts[k] += other.counts[k]

    def pop(self) -> dict[str, float]:
        out = {k: self.sums[k] / self.counts[k] for k in self.sums if self.counts[k]}
        self.sums.clear()
        self.counts.clear()
        return out
