"""Run directories: refuse to clobber another run, write config and metrics atomically."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from prefalign.errors import UserError

CONFIG_FILE = "config.yaml"


def is_launch_main() -> bool:
    """Whether this is the main (or only) process of a launch; known from torchrun's environment before any
    process group exists."""
    return int(os.environ.get("RANK", "0")) == 0


def check_output_dir(path: str | os.PathLike, *, overwrite: bool = False, resume: bool = False) -> bool:
    """Refuse a path that is a file or holds another run (unless ``overwrite`` or ``resume``).

    Returns True when the directory does not exist yet (this run will create it). Under ``accelerate launch``
    only the main process checks (and returns False elsewhere): the others may start late and find the directory
    the main process has begun to fill; if the main process refuses, the launcher stops them.
    """
    out = Path(path)
    if not is_launch_main():
        return False
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: output path is a file; give a directory")
    holds_run = out.is_dir() and any(out.iterdir())
    if holds_run and not (overwrite or resume):
        raise UserError(f"{out}: output directory is not empty (another run?); pass --overwrite to replace "
                        "its files or --resume to continue it, or choose another --output")
    return not out.exists()


def prepare_output_dir(path: str | os.PathLike, *, overwrite: bool = False, resume: bool = False) -> Path:
    """`check_output_dir`, then create it (the main process of a launch does both: the others write nothing
    before it does, and must not re-create a directory it removed on an error)."""
    check_output_dir(path, overwrite=overwrite, resume=resume)
    out = Path(path)
    if is_launch_main():
        out.mkdir(parents=True, exist_ok=True)
    return out


@contextlib.contextmanager
def remove_on_user_error(path: str | os.PathLike, created: bool):
    """If a `UserError` ends the run and this run created ``path`` and wrote no checkpoint, remove it:
    bad input leaves nothing half-written behind. A run with a checkpoint is kept (it can resume)."""
    try:
        yield
    except UserError:
        out = Path(path)
        if created and out.is_dir() and not any(out.glob("checkpoints/*/state.json")):
            shutil.rmtree(out, ignore_errors=True)
        raise


def run_in_output_dir(cfg, fn):
    """``fn()`` for a run writing to ``cfg.output`` (with ``overwrite`` / ``resume``): refuse a directory holding
    another run first; a `UserError` removes the directory if this run created it and wrote no checkpoint (on
    the main process only, see `check_output_dir`)."""
    created = check_output_dir(cfg.output, overwrite=cfg.overwrite, resume=cfg.resume is not None)
    with remove_on_user_error(cfg.output, created):
        return fn()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write via a temp file in the same directory and rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
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


def write_config(out_dir: str | os.PathLike, cfg: Any) -> Path:
    """Write the resolved config as YAML; it can be fed back with ``--config``."""
    path = Path(out_dir) / CONFIG_FILE
    atomic_write_text(path, yaml.safe_dump(to_plain(cfg), sort_keys=False))
    return path


def write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(to_plain(data), indent=2) + "\n")


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(to_plain(r), ensure_ascii=False) + "\n" for r in rows))
