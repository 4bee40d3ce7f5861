"""Run the stages of a comparison as subprocesses, measure each, and skip finished ones on resume.

Each stage is a normal prefalign command (``prefalign reward ...``) in its own process, so its wall
time and peak memory are its own: ``os.wait4`` returns the child's resource usage, ``ru_maxrss``
its peak resident set. A stage's record lands in ``stages.json`` only after it succeeded, so an
interrupted comparison resumes at the first unfinished stage.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from prefalign.errors import UserError
from prefalign.runio import atomic_write_text

STATE_FILE = "stages.json"


@dataclass
class StageResult:
    name: str
    out_dir: str
    wall_seconds: float
    peak_rss_mb: float


class StageRunner:
    def __init__(self, root: Path, resume: bool, progress=None):
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
        self.progress = progress

    def run(self, name: str, command: str, args: list[str]) -> StageResult:
        """Run ``prefalign COMMAND ARGS --output ROOT/NAME`` unless it finished before."""
        out = self.root / name
        if name in self.done and Path(self.done[name]["out_dir"]).exists():
            if self.progress:
                self.progress(name, skipped=True)
            return StageResult(**self.done[name])
        if self.progress:
            self.progress(name, skipped=False)
        log = self.logs / f"{name.replace('/', '_')}.log"
        cmd = [sys.executable, "-m", "prefalign", command, *map(str, args), "--output", str(out), "--overwrite"]
        env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
               "TQDM_DISABLE": "1"}  # the comparison shows one progress bar; stage bars would garble the log
        start = time.perf_counter()
        with log.open("w", encoding="utf-8") as log_file:
            log_file.write("$ " + " ".join(cmd) + "\n")
            log_file.flush()
            proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
            try:
                _, status, usage = os.wait4(proc.pid, 0)
            except KeyboardInterrupt:
                proc.terminate()
                proc.wait()
                raise
            proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            tail = [line for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
            last = tail[-1] if tail else "(no output)"
            raise UserError(f"stage {name} failed (exit {proc.returncode}): {last} — full log: {log}; fix it and "
                            "rerun with --resume to keep the finished stages")
        result = StageResult(name, str(out), round(wall, 3), round(usage.ru_maxrss / 1024, 1))  # ru_maxrss: KiB
        # a finished stage is never resumed: its optimizer checkpoints are dead weight (several times the
        # model's size); final/ (and value/ for PPO) stay. Deleted after the wall time is taken, so not charged
        # to the stage.
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        self.done[name] = asdict(result)
        atomic_write_text(self.state_path, json.dumps(self.done, indent=2))
        return result
