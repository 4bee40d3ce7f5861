"""A stage ends with its comparison: ``kill -9`` on ``compare`` leaves nothing running, and ``--resume`` redoes
only the unfinished stage."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import psutil
from conftest import launch_failure, run_cli

WATCH = "import time; from prefalign.compare.stages import exit_with_parent; exit_with_parent(-1, 0.05); time.sleep(60)"
PARENT = (
    "import subprocess, sys, time; from prefalign.compare.stages import death_signal_preexec; "
    "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
    "preexec_fn=death_signal_preexec()); print(p.pid, flush=True); time.sleep(60)"
)

# the smallest race with a finished stage before the one killed: pairs, one DPO step, a 2-prompt evaluation
BUDGET = [
    "--preset",
    "quick",
    "--arms",
    "dpo",
    "--num-prompts",
    "16",
    "--samples-per-prompt",
    "4",
    "--max-new-tokens",
    "4",
    "--eval-prompts",
    "2",
    "--eval-samples",
    "1",
    "--batch-size",
    "2",
    "--dpo-steps",
    "1",
    "--precision",
    "fp32",
    "--eval-split",
    "0.25",
]


def _gone(pids, timeout):
    """Whether every process in ``pids`` has ended (reaped, or a zombie) within ``timeout`` seconds."""
    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            procs.append(psutil.Process(pid))
    deadline = time.time() + timeout
    while time.time() < deadline:
        alive = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return True
        time.sleep(0.05)
    return False


def test_a_child_started_with_the_death_signal_dies_with_its_parent():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert not _gone([child], 0.5)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    assert _gone([child], 3)


def test_the_watcher_off_linux_kills_a_stage_whose_parent_is_gone():
    proc = subprocess.run([sys.executable, "-c", WATCH], timeout=60)  # -1 is nobody's pid: the parent is "gone"
    assert proc.returncode == -signal.SIGKILL


def _stage_processes(compare: psutil.Process, command: str, timeout=300):
    """The processes of ``compare``'s running stage ``prefalign COMMAND`` (its own and any children)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert compare.is_running() and compare.status() != psutil.STATUS_ZOMBIE, "compare ended"
        for child in compare.children():
            try:
                if command in child.cmdline():
                    return [child.pid, *(p.pid for p in child.children(recursive=True))]
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.05)
    raise AssertionError(f"no {command} stage started")


def _scores(out):
    summary = json.loads((out / "summary.json").read_text())
    return [(arm["name"], arm["eval"]) for arm in summary["arms"]]


def test_kill_9_on_compare_leaves_no_stage_and_resume_redoes_only_that_stage(tmp_path, tiny_model_dir):
    """The race is killed during its last stage; an uninterrupted race runs alongside for the summary to equal."""
    args = ["compare", *BUDGET, "--model", tiny_model_dir]
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    races = [
        subprocess.Popen(
            [sys.executable, "-m", "prefalign", *map(str, args), "--output", str(out)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for out in (killed, whole)
    ]
    race, uninterrupted = races
    try:
        stage = _stage_processes(psutil.Process(race.pid), "eval")
        finished = json.loads((killed / "stages.json").read_text())
        assert set(finished) == {"pairs", "seed-0/dpo"}
        race.send_signal(signal.SIGKILL)
        race.wait()
        assert _gone(stage, 5), "a stage outlived its comparison"
        # within the same 5 s: a stage's child started after its processes were listed dies with it, a moment later
        assert _gone([p.pid for p in _session(race.pid)], 5), "a process of the killed comparison is still running"
        r = run_cli(*args, "--output", killed, "--resume", timeout=600)
        assert r.returncode == 0, launch_failure(r.stderr)
        _, err = uninterrupted.communicate(timeout=600)
        assert uninterrupted.returncode == 0, launch_failure(err)
    finally:
        for p in races:
            for leftover in _session(p.pid):
                leftover.kill()
    stages = json.loads((killed / "stages.json").read_text())
    assert {name: stages[name] for name in finished} == finished  # the finished stages were not run again
    assert set(stages) == {"pairs", "seed-0/dpo", "seed-0/eval"}
    assert _scores(killed) == _scores(whole)


def _session(sid: int) -> list[psutil.Process]:
    """The live (not zombie) processes of session ``sid``."""
    found = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (OSError, psutil.NoSuchProcess):
            pass
    return found
