"""Run directories: one writer per directory, refuse to clobber another run, write config and metrics atomically.

One writer: a run holds an exclusive ``flock`` on ``DIR/.prefalign.lock`` from before its models load until it
ends. The OS drops the lock when the process dies, however it dies, so a crash never leaves a stale lock; the
file itself only says who holds it (pid and host) for the refusal message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from prefalign.errors import UserError

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
LOCK_FILE = ".prefalign.lock"

_held: dict[str, OutputLock] = {}
"""The output directories this process holds a lock on, by real path."""


def is_launch_main() -> bool:
    """Whether this is the main (or only) process of a launch; known from torchrun's environment before any
    process group exists."""
    return int(os.environ.get("RANK", "0")) == 0


@dataclasses.dataclass
class OutputLock:
    """An exclusive ``flock`` on ``out/LOCK_FILE`` (held while ``fd`` is open), and the directories that taking it
    created, outermost first: ``created`` says whether ``out`` itself was made by this run."""

    out: Path
    fd: int
    made: list[Path]

    @property
    def created(self) -> bool:
        return self.out in self.made

    def release(self) -> None:
        """Remove the lock file (when it is still this lock's: an error clean-up may have removed the directory)
        and close it, which drops the lock."""
        _held.pop(os.path.realpath(self.out), None)
        with contextlib.suppress(OSError):
            if _same_file(self.fd, self.out / LOCK_FILE):
                os.unlink(self.out / LOCK_FILE)
        os.close(self.fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        st, open_st = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == (open_st.st_dev, open_st.st_ino)


def _make_dirs(out: Path) -> list[Path]:
    """Create ``out`` and its missing parents with ``os.mkdir``; return those this call made, outermost first.
    A directory counts as made only when our ``mkdir`` succeeded: another launch may make it in between."""
    missing = [p for p in [out, *out.parents] if not p.exists()][::-1]
    made = []
    for path in missing:
        try:
            os.mkdir(path)
            made.append(path)
        except FileExistsError:
            pass
        except OSError as e:  # a parent that is a file, no permission, a read-only or virtual file system
            for done in reversed(made):
                with contextlib.suppress(OSError):
                    os.rmdir(done)
            raise UserError(f"--output {out}: cannot create {path} ({e.strerror}); choose another --output") from None
    return made


def _holder(out: Path) -> str:
    """Who holds ``out``'s lock, from its lock file: 'pid P on host H'. The holder writes it just after locking,
    so a refusal in between waits a moment for it."""
    for _ in range(20):
        try:
            who = json.loads((out / LOCK_FILE).read_text())
            return f"pid {who['pid']} on host {who['host']}"
        except (OSError, ValueError, KeyError, TypeError):
            time.sleep(0.05)
    return "pid unknown"


def _refuse_held(out: Path) -> UserError:
    return UserError(
        f"{out}: another prefalign run is writing here ({_holder(out)}); wait for it to end, "
        "or choose another --output (--overwrite never takes a directory from a live run)"
    )


def lock_output_dir(path: str | os.PathLike) -> OutputLock:
    """Create ``path`` if needed and lock it for this process, or refuse in one line naming the holder.

    Refusing deletes nothing, even a directory this call made: the holder that won the race now uses it.
    A lock file whose holder removed or replaced it (an error clean-up, a finished run) between our ``open`` and
    ``flock`` is not the directory's lock, hence the check of the locked file against the path, and the retry.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: output path is a file; give a directory")
    made: list[Path] = []
    for _ in range(10):
        made += _make_dirs(out)
        try:
            fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            continue  # removed by a holder's clean-up between our mkdir and open
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _refuse_held(out) from None
        except OSError as e:  # a file system without locks (some network mounts): run, but say so
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                os.close(fd)
                raise
            log.warning("%s: cannot lock this directory (%s); two runs writing here would not be stopped", out, e)
        if _same_file(fd, out / LOCK_FILE):
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n").encode(), 0)
            lock = OutputLock(out, fd, made)
            _held[os.path.realpath(out)] = lock
            return lock
        os.close(fd)
    raise UserError(
        f"{out}: could not lock the output directory (it keeps being removed); is another program "
        "deleting it? Choose another --output"
    )


def _check_not_locked(out: Path) -> None:
    """Refuse ``out`` when another process holds its lock (a probe: takes and drops the lock at once)."""
    if os.path.realpath(out) in _held:
        return
    try:
        fd = os.open(out / LOCK_FILE, os.O_RDWR)
    except OSError:
        return  # no lock file (or unreadable): nobody holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _refuse_held(out) from None
    except OSError:
        pass
    finally:
        os.close(fd)


def check_output_dir(path: str | os.PathLike, *, overwrite: bool = False, resume: bool | None = None) -> bool:
    """Refuse a path that is a file, is locked by another process, or holds another run (unless ``overwrite`` or
    ``resume``); the lock file alone is no run. ``resume=None``: the command has no --resume, so the refusal
    does not suggest it.

    Returns True when the directory does not exist yet (this run will create it). Under ``accelerate launch``
    only the main process checks (and returns False elsewhere): the others may start late and find the directory
    the main process has begun to fill; if the main process refuses, the launcher stops them.
    """
    out = Path(path)
    if not is_launch_main():
        return False
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: output path is a file; give a directory")
    if out.is_dir():
        _check_not_locked(out)
    holds_run = out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir())
    if holds_run and not (overwrite or resume):
        or_resume = "" if resume is None else " or --resume to continue it"
        raise UserError(
            f"{out}: output directory is not empty (another run?); pass --overwrite to replace "
            f"its files{or_resume}, or choose another --output"
        )
    return not out.exists()


def prepare_output_dir(path: str | os.PathLike, *, overwrite: bool = False, resume: bool | None = None) -> Path:
    """The output directory, checked and created. Inside `claimed_output_dir` (every command run from the CLI)
    it was checked when it was locked, so this returns it as it is. Otherwise (a library call) `check_output_dir`,
    then create it. The main process of a launch does both: the others write nothing before it does, and must
    not re-create a directory it removed on an error."""
    out = Path(path)
    if not is_launch_main() or os.path.realpath(out) in _held:
        return out
    check_output_dir(path, overwrite=overwrite, resume=resume)
    out.mkdir(parents=True, exist_ok=True)
    return out


@contextlib.contextmanager
def remove_on_user_error(path: str | os.PathLike, created: bool):
    """If a `UserError` ends the run and this run created ``path`` and wrote no checkpoint, remove it:
    bad input leaves nothing half-written behind. A run with a checkpoint is kept (it can resume).
    Any other error (Ctrl-C included) removes it only if it holds nothing but the lock file and the run's
    config.yaml: no output a rerun would have to be told to replace."""
    try:
        yield
    except BaseException as e:
        out = Path(path)
        if created and out.is_dir():
            if isinstance(e, UserError):
                remove = not any(out.glob("checkpoints/*/state.json"))
            else:
                remove = all(p.name in (LOCK_FILE, CONFIG_FILE) for p in out.iterdir())
            if remove:
                shutil.rmtree(out, ignore_errors=True)
        raise


@contextlib.contextmanager
def claimed_output_dir(
    path: str | os.PathLike, *, overwrite: bool = False, resume: bool | None = None, keep_on_error: bool = False
):
    """Hold ``path`` for the whole ``with`` block: lock it (creating it), then refuse it if it holds another run
    (unless ``overwrite`` or ``resume``); yields its `Path`. Taken before any model loads, so two launches into
    one directory cannot both pass the check. On an error, `remove_on_user_error` (unless ``keep_on_error``),
    with the directories this run made, then the lock is dropped. Under ``accelerate launch`` only the main
    process locks and checks; the others yield the path."""
    out = Path(path)
    if not is_launch_main():
        yield out
        return
    lock = lock_output_dir(out)
    try:
        check_output_dir(out, overwrite=overwrite, resume=resume)  # refused: nothing removed, it is not ours
        with remove_on_user_error(out, lock.created and not keep_on_error):
            yield out
    finally:
        if not out.exists():  # removed by the clean-up: so are the parents this run made, if still empty
            for parent in reversed([p for p in lock.made if p != out]):
                with contextlib.suppress(OSError):
                    os.rmdir(parent)
        lock.release()


def run_in_output_dir(cfg, fn):
    """``fn()`` for a run writing to ``cfg.output`` (with ``overwrite`` / ``resume``), inside
    `claimed_output_dir`: the directory locked and checked first; a `UserError` removes it if this run created
    it and wrote no checkpoint."""
    with claimed_output_dir(cfg.output, overwrite=cfg.overwrite, resume=cfg.resume is not None):
        return fn()


def as_created(path: str | os.PathLike, directory: bool = False) -> None:
    """Give a temp file or directory (``mkstemp``/``mkdtemp``: 0600/0700) the mode ``open``/``mkdir`` would have
    given it under the process's umask, before it is renamed into place as a run's output; a directory's files
    and subdirectories too (safetensors writes its files 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if directory else 0o666) & ~mask)
    if directory:
        for root, dirs, files in os.walk(os.fspath(path)):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o777 & ~mask)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~mask)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write via a temp file in the same directory and rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        as_created(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def to_plain(obj: Any) -> Any:
    """Dataclasses, paths and tuples to YAML/JSON-friendly values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return str(obj)
    return obj


TRAINING_OUTPUTS = (
    "checkpoints",
    "final",
    "final-merged",
    "value",
    "tensorboard",
    "metrics.jsonl",
    "samples.jsonl",
    "eval_pairs.jsonl",
)
"""What a training run writes that outlives it and that a later run would not replace at its start: left from an
earlier run, its checkpoints would be pruned in with (and resumed instead of) the new run's, its final weights would
stand beside the new config until the new run ends, and its TensorBoard events would mix into the new curves."""


def clear_previous_training(out_dir: str | os.PathLike) -> list[str]:
    """Remove an earlier training run's `TRAINING_OUTPUTS` from ``out_dir`` (``--overwrite``: its files are
    replaced, not merged); nothing else in the directory is touched. Returns the names removed."""
    removed = []
    for name in TRAINING_OUTPUTS:
        path = Path(out_dir) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    if removed:
        log.info("--overwrite: removed the earlier run's %s from %s", ", ".join(removed), out_dir)
    return removed


def keep_rows_through(path: str | os.PathLike, step: int) -> tuple[list[dict], list[dict]]:
    """Cut a run's JSON-lines log (metrics.jsonl, samples.jsonl) to its rows up to ``step`` on resume, rewritten
    atomically; returns ``(kept rows, cut rows)``. A line that does not parse (torn by a kill or a full disk
    mid-append) is dropped with a warning: it stopped the resume with a traceback. Lines end at "\\n" alone
    (`write_jsonl` keeps U+2028, U+2029 and U+0085 raw in a completion's text, where ``splitlines`` breaks)."""
    rows: list[dict] = []
    cut: list[dict] = []
    torn = 0
    for line in Path(path).read_text(encoding="utf-8").split("\n"):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            torn += 1
            continue
        (rows if row.get("step", 0) <= step else cut).append(row)
    if torn:
        log.warning("%s: dropped %d line(s) that do not parse (a write cut short)", path, torn)
    write_jsonl(path, rows)
    return rows, cut


def write_config(out_dir: str | os.PathLike, cfg: Any) -> Path:
    """Write the resolved config as YAML; it can be fed back with ``--config``."""
    path = Path(out_dir) / CONFIG_FILE
    atomic_write_text(path, yaml.safe_dump(to_plain(cfg), sort_keys=False))
    return path


def write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(to_plain(data), indent=2) + "\n")


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(to_plain(r), ensure_ascii=False) + "\n" for r in rows))
