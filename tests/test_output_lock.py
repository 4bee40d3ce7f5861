"""One writer per output directory: an OS lock on DIR/.prefalign.lock, taken before the models load and held
until the run ends; a second launch refuses in one line naming the holder and deletes nothing."""

import fcntl
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import final_weights, learnable_pairs, write_jsonl

from prefalign.cli import main
from prefalign.errors import UserError
from prefalign.runio import LOCK_FILE, claimed_output_dir, lock_output_dir, prepare_output_dir

HOLD = (
    "import sys, time; from prefalign.runio import lock_output_dir; lock_output_dir(sys.argv[1]); "
    "print('locked', flush=True); time.sleep(120)"
)


@pytest.fixture()
def holder(tmp_path):
    """Another process holding the lock of ``tmp_path/held`` (which holds a file of its run), until killed."""
    out = tmp_path / "held"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    yield proc, out
    proc.kill()
    proc.wait()


def _names_holder(pid: int) -> str:
    return rf"another prefalign run is writing here \(pid {pid} on host {re.escape(socket.gethostname())}\)"


def test_a_second_holder_is_refused_even_with_overwrite_and_nothing_is_deleted(holder):
    proc, out = holder
    for overwrite in (False, True):
        with pytest.raises(UserError, match=_names_holder(proc.pid)), claimed_output_dir(out, overwrite=overwrite):
            raise AssertionError("the body must not run")
    with pytest.raises(UserError, match=_names_holder(proc.pid)):
        prepare_output_dir(out, overwrite=True)  # a library call (no claim) checks the lock too
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE, "metrics.jsonl"]
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_the_lock_of_a_killed_process_is_not_stale(holder):
    proc, out = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with claimed_output_dir(out, resume=True) as claimed:
        assert f'"pid": {os.getpid()}' in (claimed / LOCK_FILE).read_text()
        fd = os.open(claimed / LOCK_FILE, os.O_RDWR)  # a second open file in this process is refused too
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd)
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]  # a finished run leaves no lock file


def test_a_launch_that_made_the_directory_but_lost_the_lock_deletes_nothing(tmp_path, monkeypatch):
    """The race in the issue: both launches ``mkdir``; one wins the lock. The loser, even when its ``mkdir`` made
    the directory, leaves it to the winner."""
    out = tmp_path / "new" / "run"

    def taken(fd, op):
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(fcntl, "flock", taken)
    with pytest.raises(UserError, match="another prefalign run is writing here"), claimed_output_dir(out):
        pass
    assert out.is_dir()


def test_bad_input_removes_only_what_this_run_made(tmp_path):
    made = tmp_path / "a" / "b" / "run"
    with pytest.raises(UserError, match="bad"), claimed_output_dir(made):
        (made / "config.yaml").write_text("x: 1\n")
        raise UserError("bad")
    assert not (tmp_path / "a").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    with pytest.raises(UserError, match="bad"), claimed_output_dir(kept):
        raise UserError("bad")
    assert kept.is_dir() and not any(kept.iterdir())


def test_the_cli_refuses_a_held_directory_in_one_line_and_deletes_nothing(capsys, holder, tiny_model_dir):
    proc, out = holder
    pairs = write_jsonl(out.parent / "pairs.jsonl", learnable_pairs(4))
    code = main(["dpo", "--data", str(pairs), "--model", str(tiny_model_dir), "--output", str(out), "--overwrite"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and re.search(_names_holder(proc.pid), err[0]), err
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'


def _dpo_args(tmp_path, model_dir):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", learnable_pairs(16))
    return [
        "dpo",
        "--data",
        str(pairs),
        "--model",
        str(model_dir),
        "--batch-size",
        "2",
        "--max-steps",
        "4",
        "--precision",
        "fp32",
        "--learning-rate",
        "1e-3",
        "--save-steps",
        "2",
    ]


def _lock_holder_pid(out, procs, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            pid = int(re.search(r'"pid": (\d+)', (out / LOCK_FILE).read_text()).group(1))
            if pid in procs:
                return pid
        except (OSError, AttributeError):
            pass
        assert all(p.poll() is None for p in procs.values()), "a launch ended before either held the lock"
        time.sleep(0.01)
    raise AssertionError("no launch took the lock")


def test_two_launches_at_once_one_runs_the_other_refuses(tmp_path, tiny_model_dir):
    """Both start together; the one holding the lock is paused (SIGSTOP), as a slow model load would hold it,
    so the other certainly tries while it runs."""
    from prefalign.cli._args import parse
    from prefalign.trainers.dpo import DPOConfig, DPOTrainer

    args, out = _dpo_args(tmp_path, tiny_model_dir), tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    launches = [
        subprocess.Popen(
            [sys.executable, "-m", "prefalign", *args, "--output", str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    procs = {p.pid: p for p in launches}
    try:
        winner_pid = _lock_holder_pid(out, procs)
        os.kill(winner_pid, signal.SIGSTOP)
        winner = procs.pop(winner_pid)
        (loser,) = procs.values()
        _, err = loser.communicate(timeout=300)
        assert loser.returncode == 2, err[-2000:]
        assert err.strip().count("\n") == 0 and re.search(_names_holder(winner_pid), err), err
        assert out.is_dir() and (out / LOCK_FILE).is_file()  # the refused launch removed nothing
        os.kill(winner_pid, signal.SIGCONT)
        _, err = winner.communicate(timeout=300)
        assert winner.returncode == 0, err[-2000:]
    finally:
        for p in launches:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
                p.wait()
    assert (out / "config.yaml").is_file() and (out / "metrics.jsonl").is_file() and not (out / LOCK_FILE).exists()
    lone = tmp_path / "lone"
    DPOTrainer(parse(DPOConfig, [*args[1:], "--output", str(lone)], prog="prefalign dpo")).train()
    winner_weights, lone_weights = final_weights(out), final_weights(lone)
    assert winner_weights.keys() == lone_weights.keys()
    assert all(torch.equal(winner_weights[k], lone_weights[k]) for k in lone_weights)
    assert (out / "metrics.jsonl").read_text().count("\n") == (lone / "metrics.jsonl").read_text().count("\n")


def test_an_output_under_a_file_is_one_line_and_makes_nothing(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match=r"^--output .*afile/sub/run: cannot create .*afile/sub \(Not a directory\)"):
        lock_output_dir(tmp_path / "afile" / "sub" / "run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_a_run_in_the_directory_is_refused_suggesting_resume_only_to_a_command_that_has_it(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(UserError, match=r"pass --overwrite to replace its files, or choose another --output$"):
        prepare_output_dir(out)  # generate, prefs, eval: no --resume
    with pytest.raises(UserError, match=r"pass --overwrite to replace its files or --resume to continue it, "):
        prepare_output_dir(out, resume=False)  # a training command
