"""Parse a command's typed config from YAML (``--config FILE``) and flags.

Every command has one dataclass config; each field's docstring is its ``--help`` text (tyro reads it).
A YAML file gives defaults, flags override it. An unknown YAML key or a value of the wrong type is a
`UserError`, never silently ignored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar, cast

import yaml

from prefalign.errors import UserError
from prefalign.validation import deferred_validation, flag


class _Config(Protocol):
    """What `parse` builds: a config dataclass with ``check()`` (every config is a `Validated` dataclass)."""

    __dataclass_fields__: ClassVar[dict[str, Any]]

    def check(self) -> None: ...


T = TypeVar("T", bound=_Config)


def _split_config_flag(argv: list[str]) -> tuple[str | None, list[str]]:
    """Pull ``--config FILE`` / ``--config=FILE`` out of argv (tyro never sees it)."""
    rest: list[str] = []
    path = None
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--config":
            if i + 1 >= len(argv):
                raise UserError("--config needs a YAML file path")
            path = argv[i + 1]
            i += 2
            continue
        if a.startswith("--config="):
            path = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    return path, rest


def load_yaml_config(cls: type[T], path: str) -> T:
    """Build ``cls`` from a YAML mapping; unknown keys are refused, naming the file and the key."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config file must be a mapping of field: value")
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(f"{path}: unknown key {unknown[0]!r} for this command (known keys: {', '.join(sorted(names))})")
    hints = typing.get_type_hints(cls, include_extras=True)
    for key, value in data.items():
        data[key] = value = _yaml11_numbers(value, hints.get(key, Any))
        if not _has_type(value, hints.get(key, Any)):
            raise UserError(f"{path}: {key}: expected {_type_name(hints[key])}, got {value!r}")
    try:
        with deferred_validation():  # flags may still fix a value; parse() validates the final config
            return cls(**data)
    except TypeError as e:
        raise UserError(f"{path}: {e}") from None


ANSI_CODE = re.compile(r"\x1b\[[0-9;]*m")
SIMILAR = ("Perhaps you meant", "Arguments similar to")  # tyro's headers of the flags like an unknown one


def parser_error_line(box: str, prog: str) -> str | None:
    """tyro's error box (a title, then sections between rules: the message, the similar flags, the help pointer)
    as one line: the message, the flags it suggests, and ``PROG --help``. tyro draws it with box characters on a
    UTF-8 stream and in ASCII otherwise (the title then stands alone above the first rule), coloured when stdout is
    a terminal (the codes are removed first). None if ``box`` is neither (it is then shown as it is)."""
    rows = [row for raw in box.splitlines() if (row := ANSI_CODE.sub("", raw).rstrip()).strip()]
    boxed = bool(rows) and rows[0].lstrip().startswith("╭")
    sections: list[list[str]] = [[]]
    for row in rows:
        if row.lstrip()[:1] in ("╭", "╰"):
            continue
        inner = row.strip().strip("│").rstrip() if boxed else row  # keeps the indentation inside the box
        if not inner.strip():
            continue
        if set(inner.strip()) <= {"─", "-"}:
            sections.append([])
        else:
            sections[-1].append(inner)
    if not boxed:
        sections = sections[1:]
    if len(sections) < 2 or not sections[0] or "--help" not in " ".join(sections[-1]):
        return None
    message = " ".join(line.strip() for line in sections[0]).rstrip(".")
    flags: list[str] = []
    for _head, *lines in (section for section in sections if section and section[0].strip().startswith(SIMILAR)):
        indent = min((len(line) - len(line.lstrip()) for line in lines), default=0)  # flag rows; help is deeper
        flags += [line.split()[0].rstrip(",") for line in lines if len(line) - len(line.lstrip()) == indent]
    flags = [flag for flag in dict.fromkeys(flags) if flag.startswith("--")]
    maybe = f" (did you mean {' or '.join(flags)}?)" if flags else ""
    return f"{message}{maybe}; see {prog} --help"


def refuse_repeated_flags(cls: type, argv: Sequence[str]) -> None:
    """Refuse a repeated flag whose repeat would drop values without a word: a list flag (``--stop a --stop b``
    stopped at b alone; its values go after one flag) and a field the config names in ``ONE_VALUE`` (ppo's
    ``--reward``: rl collects several, ppo scored with the last alone). Any other flag given twice takes its last
    value, as argparse does and as flags override a --config file."""
    hints = typing.get_type_hints(cls, include_extras=True)
    refused = set(getattr(cls, "ONE_VALUE", ()))
    seen: set[str] = set()
    for arg in argv:
        name = arg[2:].split("=", 1)[0].replace("-", "_") if arg.startswith("--") else ""
        if name not in hints or _collects_repeats(hints[name]):
            continue
        listed = any(typing.get_origin(m) is list for m in _members(hints[name]))  # list[float] | None too
        if name in seen and (listed or name in refused):
            option = flag(name)
            raise UserError(f"{option} given more than once; give it once" + (f" ({option} A B)" if listed else ""))
        seen.add(name)


def _collects_repeats(hint: Any) -> bool:
    """Whether a field's annotation carries tyro's ``UseAppendAction`` (its flag may repeat, each adding one)."""
    import tyro

    return typing.get_origin(hint) is typing.Annotated and any(
        m is tyro.conf.UseAppendAction for m in typing.get_args(hint)[1:]
    )


def _bare(hint: Any) -> Any:
    """``hint`` without ``Annotated[...]`` (tyro's markers)."""
    while typing.get_origin(hint) is typing.Annotated:
        hint = typing.get_args(hint)[0]
    return hint


def _has_type(value: Any, hint: Any) -> bool:
    """Whether a YAML value fits a config field's annotation (bool, int, float, str, lists, Literal, Optional);
    an annotation it does not know passes (the dataclass and `validate` still check)."""
    hint = _bare(hint)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin is list:
        return isinstance(value, list) and all(_has_type(v, args[0] if args else Any) for v in value)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True


def _yaml11_numbers(value: Any, hint: Any) -> Any:
    """YAML 1.1 reads ``1e-5`` (no dot) as a string: where a number is what the field takes (a float, or the
    items of a list of floats), the string becomes the number it spells."""
    if isinstance(value, list):
        items = [args[0] for a in _members(hint) if typing.get_origin(a) is list and (args := typing.get_args(a))]
        return [_yaml11_numbers(v, items[0]) for v in value] if items else value
    if isinstance(value, str) and _has_type(0.5, hint) and not _has_type(value, hint):
        with contextlib.suppress(ValueError):
            return float(value)
    return value


def _members(hint: Any) -> tuple[Any, ...]:
    """A union's members (without Annotated), or the hint itself."""
    hint = _bare(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return tuple(_bare(a) for a in typing.get_args(hint))
    return (hint,)


def _type_name(hint: Any) -> str:
    hint = _bare(hint)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is list:
        plural = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}
        return f"a list of {plural.get(_bare(args[0]), 'values') if args else 'values'}"
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def reflow_docstring(text: str) -> str:
    """A field docstring as one paragraph per paragraph: lines joined by a space, except before a blank line, after
    one, and before a ``- `` or ``* `` list item."""
    import inspect

    out: list[str] = []
    for line in inspect.cleandoc(text).split("\n"):
        if out and out[-1].strip() and line.strip() and not line.lstrip().startswith(("- ", "* ")):
            out[-1] += " " + line.strip()
        else:
            out.append(line)
    return "\n".join(out)


def _reflow_field_help() -> None:
    """Give tyro each field's docstring reflowed (`reflow_docstring`). tyro 1.0 keeps a line break before every
    docstring line that does not start with a letter, and an attribute docstring's continuation lines start with
    the source's indentation, so a field's --help broke wherever its source line did ("a CPU with bf16" / "
    instructions"). tyro reads the docstrings through ``tyro._docstrings.parse_docstring_from_object`` (private:
    where a release lacks it, --help stays as tyro renders it)."""
    from tyro import _docstrings

    read = getattr(_docstrings, "parse_docstring_from_object", None)
    if read is None or getattr(read, "reflowed", False):
        return

    def reflowed(obj: object) -> dict[str, str]:
        return {name: reflow_docstring(text) for name, text in read(obj).items()}

    reflowed.reflowed = True  # type: ignore[attr-defined]
    setattr(_docstrings, "parse_docstring_from_object", reflowed)  # noqa: B010 (tyro's cached function, replaced)


def parse(cls: type[T], argv: Sequence[str] | None, prog: str, description: str | None = None) -> T:
    """Parse ``argv`` into ``cls``: YAML defaults from ``--config``, then flags on top."""
    import tyro

    _reflow_field_help()

    argv = list(sys.argv[1:] if argv is None else argv)
    cfg_path, rest = _split_config_flag(argv)
    refuse_repeated_flags(cls, rest)
    given = {arg.split("=", 1)[0] for arg in rest}
    # as flags only: a run's config.yaml holds the overwrite it started with, and resuming through it
    # (`--config OUT/config.yaml --resume latest`, what an interrupted run prints) must not be refused
    if {"--resume", "--overwrite"} <= given:
        raise UserError("--resume and --overwrite contradict each other (continue the run, or replace it)")
    default = load_yaml_config(cls, cfg_path) if cfg_path else None
    desc = (description or (cls.__doc__ or "")).strip()
    desc += "\n\nAll fields can also come from a YAML file: --config FILE (flags override it)."
    os.environ.setdefault("COLUMNS", "100")  # stable --help width in pipes and CI logs
    # Validation is deferred while tyro builds the config (tyro would print a ValueError as a box) and
    # run here, so a bad value is one line and exit 2 like every other user error. tyro's own refusals (an
    # unknown flag, a value of the wrong type) are boxes on stderr: caught there and made one line too.
    err = io.StringIO()
    try:
        with deferred_validation(), contextlib.redirect_stderr(err):
            # tyro types default as the config itself; None (no --config) means no default, the result is a cls
            cfg = cast(T, tyro.cli(cls, args=rest, default=default, prog=prog, description=desc))
    except SystemExit as e:
        line = parser_error_line(err.getvalue(), prog) if e.code not in (0, None) else None
        if line is None:
            sys.stderr.write(err.getvalue())
            raise
        raise UserError(line) from None
    sys.stderr.write(err.getvalue())  # what tyro warned about while parsing
    try:
        cfg.check()
    except (TypeError, ValueError) as e:
        raise UserError(str(e)) from None
    return cfg


def train_command(
    config_cls: type[Any],
    trainer_cls: type,
    argv: Sequence[str] | None,
    prog: str,
    description: str,
    keys: Sequence[str],
    prefixes: Sequence[str] = (),
    online: bool = False,
) -> int:
    """A training command's whole body: parse its config, train, print the final metrics named by ``keys`` (and
    every key starting with one of ``prefixes``) and where the outputs are; ``online``: PPO and the critic-free
    family, which also write ``samples.jsonl``."""
    cfg = parse(config_cls, argv, prog=prog, description=description)
    last = trainer_cls(cfg).train()
    shown = {k: round(last[k], 4) for k in keys if k in last}
    shown.update({k: round(v, 4) for k, v in last.items() if k.startswith(tuple(prefixes)) and k != "eval/seconds"})
    what = "policy" if online else "model"
    samples = f", samples in {cfg.output}/samples.jsonl" if online else ""
    print(f"done: {shown}\n{what} in {cfg.output}/final, metrics in {cfg.output}/metrics.jsonl{samples}")
    return 0
