"""compare's progress: each stage reports its bars through a file (`prefalign.progress`), the race shows the running
stage's step counter, key metric and time left under its stage counter on a terminal (a tiny race under a
pseudo-terminal), writes one line per stage elsewhere, and a failed stage prints its log's last lines."""

import errno
import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time

import pytest

from prefalign import progress as progress_module
from prefalign.compare.plan import PlannedStage
from prefalign.compare.progress import RaceClock, RaceProgress, finished_line, metric_text, stage_label
from prefalign.compare.stages import StageResult, StageRunner, log_tail
from prefalign.errors import UserError
from prefalign.progress import PROGRESS_ENV, Progress, ProgressBar

RM = PlannedStage("seed-0/rm", "reward", [], "accuracy")
EVAL = PlannedStage("seed-0/eval", "eval", [])


# ---------------------------------------------------------------------------------------------- the stage's side


def test_a_bar_in_a_stage_writes_its_count_and_metrics_and_draws_nothing(tmp_path, monkeypatch, capsys):
    path = tmp_path / "progress.json"
    monkeypatch.setenv(PROGRESS_ENV, str(path))
    monkeypatch.setattr(progress_module, "MIN_WRITE_SECONDS", 1e9)  # only the first and the last unit are written
    with ProgressBar(total=3, desc="reward", unit="step") as bar:
        assert Progress.read(path) == Progress("reward", 0, 3, "step", Progress.read(path).elapsed, {})
        bar.update(1, metrics={"loss": 0.5, "accuracy": 0.25})
        assert Progress.read(path).done == 0  # within MIN_WRITE_SECONDS of the last write: not written
        bar.update(2, metrics={"loss": 0.25, "accuracy": 0.75})
    last = Progress.read(path)
    assert (last.task, last.done, last.total, last.unit, last.metrics) == (
        "reward",
        3,
        3,
        "step",
        {"loss": 0.25, "accuracy": 0.75},
    )
    assert capsys.readouterr().err == ""  # the race draws it, not the stage (its terminal output is the log)

    assert list(ProgressBar(range(4), desc="start log-probs", unit="batch")) == [0, 1, 2, 3]
    assert (Progress.read(path).task, Progress.read(path).done, Progress.read(path).total) == ("start log-probs", 4, 4)


def test_a_bar_of_another_process_or_outside_a_race_writes_no_file(tmp_path, monkeypatch, capsys):
    path = tmp_path / "progress.json"
    monkeypatch.setenv(PROGRESS_ENV, str(path))
    with ProgressBar(total=2, desc="dpo", unit="step", disable=True) as bar:  # not the main process
        bar.update(2)
    assert not path.exists()
    monkeypatch.delenv(PROGRESS_ENV)
    with ProgressBar(total=2, desc="dpo", unit="step") as bar:
        bar.update(2)
    assert not path.exists() and "dpo: 100%" in capsys.readouterr().err  # an ordinary tqdm bar


def test_seconds_left_is_at_the_rate_so_far():
    assert Progress("ppo", 2, 10, "iter", 30.0).seconds_left == 120.0
    assert Progress("ppo", 0, 10, "iter", 30.0).seconds_left is None


# ---------------------------------------------------------------------------------------------- the race's side


@pytest.mark.parametrize(
    "finished, running, elapsed, bar_left, left",
    [
        ({}, 0, 10.0, 30.0, 190.0),  # nothing finished: every stage as long as the first is projected to take (40 s)
        ({}, 0, 10.0, None, None),  # nor any rate yet: no estimate
        ({0: 60.0}, 1, 10.0, None, 230.0),  # an unseen command: the mean of the finished stages, 60 s each
        ({0: 60.0, 1: 20.0, 2: 100.0}, 3, 5.0, 10.0, 70.0),  # dpo's bar projects 10 s; eval as the mean, 60 s
        ({0: 30.0, 3: 50.0}, 1, 40.0, 5.0, 85.0),  # dpo finished before (a resume): only ppo and eval, 40 s each
    ],
)
def test_the_race_clock(finished, running, elapsed, bar_left, left):
    clock = RaceClock(["prefs", "reward", "ppo", "dpo", "eval"], dict(finished))
    assert clock.seconds_left(running, elapsed, bar_left) == left


def test_a_stage_seen_before_is_expected_to_take_as_long():
    clock = RaceClock(["prefs", "dpo", "dpo", "eval"], {0: 30.0, 1: 40.0})
    assert clock.seconds_left(2, 50.0, 5.0) == 5.0 + 35.0  # past dpo's 40 s: what its bar projects; eval the mean
    assert clock.seconds_left(2, 10.0, 5.0) == 30.0 + 35.0


def test_labels_metrics_and_the_finished_line():
    assert (
        stage_label(RM, "reward") == "seed-0/rm" and stage_label(EVAL, "ppo log-probs") == "seed-0/eval ppo log-probs"
    )
    assert metric_text({"accuracy": 0.123456, "loss": 1.0}, "accuracy") == "accuracy=0.1235"
    assert metric_text({"loss": 1.0}, "accuracy") == "" and metric_text({"loss": 1.0}, None) == ""
    result = StageResult("seed-0/rm", "OUT/seed-0/rm", 72.4, 301.6)
    last = Progress("reward", 2, 2, "step", 60.0, {"accuracy": 0.75})
    assert finished_line(RM, result, last) == "seed-0/rm: done in 01:12, peak 302 MB, 2/2 step, accuracy=0.75"
    assert finished_line(EVAL, result, Progress("ppo log-probs", 3, 3, "batch", 1.0)) == (
        "seed-0/eval: done in 01:12, peak 302 MB"
    )


def test_off_a_terminal_a_stage_writes_one_line_and_no_bar(tmp_path, capsys):
    path = tmp_path / "rm.progress.json"
    with RaceProgress([RM, EVAL], live=False) as race:
        with race.running(RM.name, path):
            path.write_text(
                '{"task": "reward", "done": 2, "total": 2, "unit": "step", "elapsed": 3.0, '
                '"metrics": {"accuracy": 0.5}}'
            )
        race.finished(RM.name, StageResult(RM.name, "OUT/seed-0/rm", 12.0, 300.0))
    err = capsys.readouterr().err
    assert err.count("seed-0/rm: done in 00:12, peak 300 MB, 2/2 step, accuracy=0.5\n") == 1
    assert not re.search(r"seed-0/rm: +\d+%", err)  # the stage's own bar is drawn on a terminal only
    assert re.search(r"compare:  50%\|[^|]*\| 1/2 stages \[00:00, seed-0/rm\]", err)


def test_log_tail_is_what_a_terminal_shows(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("".join(f"line {i}\n" for i in range(30)) + "\n  \nbar 1/3\rbar 3/3\nTraceback: boom\n")
    assert log_tail(log, 3) == ["line 29", "bar 3/3", "Traceback: boom"]
    assert log_tail(log) == [f"line {i}" for i in range(12, 30)] + ["bar 3/3", "Traceback: boom"]


def test_a_failed_stage_prints_its_last_lines_and_its_log(tmp_path, capsys):
    with RaceProgress([RM], live=False) as race:
        runner = StageRunner(tmp_path, resume=False, monitor=race)
        with pytest.raises(
            UserError,
            match=r"^stage seed-0/rm failed \(exit 2\): .* — full log: "
            + re.escape(str(tmp_path / "logs" / "seed-0_rm.log"))
            + ";",
        ):
            runner.run(RM.name, "reward", ["--no-such-flag"])
    log = tmp_path / "logs" / "seed-0_rm.log"
    tail = log_tail(log)
    # the command line, then the parser's refusal (one line)
    assert tail[0].startswith("$ ") and tail[0].endswith(
        "reward --no-such-flag --output " + str(tmp_path / "seed-0" / "rm") + " --overwrite"
    )
    assert tail[1:] == ["error: Unrecognized options: --no-such-flag; see prefalign reward --help"]
    err = capsys.readouterr().err
    expected = "".join(f"  | {line}\n" for line in tail)
    assert f"stage seed-0/rm failed (exit 2); the last {len(tail)} lines of {log}:\n{expected}" in err
    assert not (tmp_path / "logs" / "seed-0_rm.progress.json").exists() and not (tmp_path / "stages.json").exists()


# -------------------------------------------------------------------------------------------- a tiny race on a terminal

PROMPTS, SAMPLES, EVAL_PROMPTS = 16, 4, 2
BUDGET = [
    "--preset",
    "quick",
    "--arms",
    "ppo",
    "dpo",
    "--num-prompts",
    PROMPTS,
    "--samples-per-prompt",
    SAMPLES,
    "--max-new-tokens",
    "4",
    "--eval-prompts",
    EVAL_PROMPTS,
    "--eval-samples",
    "1",
    "--batch-size",
    "2",
    "--rm-steps",
    "2",
    "--ppo-steps",
    "2",
    "--ppo-rollout-batch",
    "2",
    "--dpo-steps",
    "2",
    "--precision",
    "fp32",
    "--eval-split",
    "0.25",
]
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
NUMBER = r"-?[0-9.]+(e[+-]\d+)?"


def _run_on_a_terminal(args: list, timeout: float) -> tuple[int, str]:
    """``python -m prefalign ARGS`` with a 200-column pseudo-terminal as stdin, stdout and stderr: its exit code
    and every line it drew (escape sequences removed, each carriage-return refresh its own line)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("TQDM_DISABLE", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefalign", *map(str, args)],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        start_new_session=True,
    )
    os.close(slave)
    drawn, deadline = bytearray(), time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 1.0)[0]:
                try:
                    chunk = os.read(master, 1 << 16)
                except OSError as e:  # EIO: every holder of the terminal's other end is gone
                    if e.errno != errno.EIO:
                        raise
                    break
                if not chunk:
                    break
                drawn += chunk
            elif proc.poll() is not None:
                break
        returncode = proc.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
        os.close(master)
    text = ANSI.sub("", drawn.decode("utf-8", errors="replace"))
    return returncode, "\n".join(line.strip() for line in re.split(r"[\r\n]", text) if line.strip())


def test_a_tiny_race_on_a_terminal_shows_each_stages_step_counter(tmp_path, tiny_model_dir):
    out = tmp_path / "cmp"
    returncode, drawn = _run_on_a_terminal(
        ["compare", *BUDGET, "--model", tiny_model_dir, "--output", out], timeout=900
    )
    assert returncode == 0, drawn[-3000:]
    completions = PROMPTS * SAMPLES
    counters = {  # each stage's own bar at its end: label, count, unit and, for a training run, its key metric
        "pairs": rf"pairs: 100%\|[^|]*\| {completions}/{completions} completion \[[0-9:]+<00:00\]",
        "seed-0/rm": rf"seed-0/rm: 100%\|[^|]*\| 2/2 step \[[0-9:]+<00:00, accuracy={NUMBER}\]",
        "seed-0/ppo": rf"seed-0/ppo: 100%\|[^|]*\| 2/2 iter \[[0-9:]+<00:00, objective/scores={NUMBER}\]",
        "seed-0/dpo": rf"seed-0/dpo: 100%\|[^|]*\| 2/2 step \[[0-9:]+<00:00, rewards/margins={NUMBER}\]",
        # its last phase; earlier ones (sampling each policy) may pass between two reads
        "seed-0/eval": r"seed-0/eval dpo reference log-probs: 100%\|[^|]*\| 1/1 batch",
    }
    for stage, counter in counters.items():
        assert re.search(counter, drawn), f"{stage}: no step counter in\n{drawn[-3000:]}"
        assert re.search(rf"^{re.escape(stage)}: done in [0-9:]+, peak \d+ MB", drawn, re.M), stage
    # under the stage counter, the race's time left once a stage has finished
    assert re.search(r"compare:  40%\|[^|]*\| 2/5 stages \[[0-9:]+, seed-0/ppo, ~[0-9:]+ left\]", drawn), drawn[-3000:]
    assert re.search(r"compare: 100%\|[^|]*\| 5/5 stages", drawn)
    assert sorted(path.name for path in (out / "logs").iterdir()) == [
        "pairs.log",
        "seed-0_dpo.log",
        "seed-0_eval.log",
        "seed-0_ppo.log",
        "seed-0_rm.log",
    ]
    log = (out / "logs" / "seed-0_ppo.log").read_text()
    assert log.startswith("$ ") and "\r" not in log  # the full output, with no bar refreshes in it


def test_a_stage_s_gpu_peak_is_read_from_its_run_json(tmp_path):
    from prefalign.compare.stages import recorded_gpu_peak

    assert recorded_gpu_peak(tmp_path) is None  # a sampling stage: no run.json
    (tmp_path / "run.json").write_text('{"precision": "fp32"}')
    assert recorded_gpu_peak(tmp_path) is None  # a CPU run records none
    (tmp_path / "run.json").write_text('{"precision": "bf16", "peak_gpu_allocated_mb": 10240.5}')
    assert recorded_gpu_peak(tmp_path) == 10240.5
    assert StageResult("x", "OUT/x", 1.0, 2.0).peak_gpu_mb is None  # stages.json of an older race loads


def test_a_bar_off_a_terminal_draws_rarely():
    """A redirected log got a carriage-return refresh every 0.1 s of a fast loop; off a terminal a bar draws at
    most every OFF_TERMINAL_SECONDS (and at its start and end)."""
    import io

    from prefalign.progress import ProgressBar

    log = io.StringIO()
    with ProgressBar(total=2000, desc="steps", file=log) as bar:
        for step in range(2000):
            time.sleep(0.0005)  # ~1 s: 10 draws at tqdm's 0.1 s
            bar.set_postfix({"loss": step})  # as a training loop does every step: it forced a draw
            bar.update(1)
    draws = [d for d in log.getvalue().replace("\r", "\n").splitlines() if d.strip()]
    assert len(draws) <= 3 and "2000/2000" in draws[-1]
