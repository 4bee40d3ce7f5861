"""Every ``prefalign ...`` command line shown to users is one the CLI accepts.

The lines: README.md, BENCHMARKS.md and docs/**/*.md (fenced code blocks, ``\\`` continuations joined, and inline
code spans, which may wrap), and the ``Examples::`` block of each command's docstring (the top of its --help). A
line starts with ``prefalign``, ``.venv/bin/prefalign``, ``python -m prefalign`` or has ``-m prefalign`` (accelerate
launch). Each is checked three ways, so a failure says what is wrong and where:

* every ``--flag`` is one its command accepts: a field of its config dataclass (as tyro spells it, ``--no-X`` for a
  boolean; tyro's own --help is checked to list the same set), ``--config`` or ``--help``;
* a flag taking a fixed set of values gets one of them, where the value is written out (``a|b`` alternatives each);
* the whole line parses through the command's own ``main`` into its config and that config's ``check()``.

Shell decorations are dropped: ``$``, ``# comments``, a pipe and what follows, ``...`` (flags elided). A value in
capitals (``N``, ``NAME``) or in angle brackets is a placeholder: not value-checked, and parsed as the flag's
default. A ``--config FILE`` is parsed with a YAML file in its place holding what the command requires
(``REQUIRED``: the line names no real file). No model loads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import itertools
import re
import shlex
import typing
from functools import cache
from pathlib import Path
from typing import Literal, NamedTuple
from unittest import mock

import pytest
import tyro
import yaml

from prefalign.cli import COMMANDS
from prefalign.cli import _args as cli_args
from prefalign.errors import UserError
from prefalign.validation import flag

ROOT = Path(__file__).resolve().parents[1]
MARKDOWN = ["README.md", "BENCHMARKS.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md"))]
START = re.compile(r"^(?:\$\s+)?(?:\S*/)?(?:python3? -m )?(?=prefalign(?:\s|$))|\s-m (?=prefalign\s)")
FENCE = re.compile(r"^\s*(```|~~~)")
PLACEHOLDER = re.compile(r"^(?:[A-Z][A-Z_]*|<[^>]*>)$")  # N, PATH, NAME, <command>
SUBCOMMANDS = {"data": "inspect"}  # a command whose first word picks its config
# What each command's check() requires: given with --config FILE, a line's file is taken to hold these.
REQUIRED: dict[str, dict] = {
    "sft": {"data": "data.jsonl"},
    "dpo": {"data": "pairs.jsonl"},
    "reward": {"data": "pairs.jsonl"},
    "ppo": {"prompts": "prompts.txt", "reward": "vader"},
    "rl": {"prompts": "prompts.txt", "reward": ["vader"]},
    "prefs": {"prompts": ["prompts.txt"], "judge": "vader"},
    "eval": {"policies": ["start=smollm2-135m"], "prompts": ["prompts.txt"], "judge": "vader"},
    "generate": {},
    "compare": {},
    "data": {"path": "data.jsonl"},
}

# Lines that look like commands but are not meant to run, by (file, start of the joined line) -> why.
NOT_COMMANDS = {
    ("docs/architecture.md", "prefalign dpo | ppo | rl cli/__init__.py main"): "a call-graph diagram",
    ("docs/architecture.md", "prefalign compare cli/compare.py main"): "a call-graph diagram",
    ("docs/architecture.md", "prefalign COMMAND ... --output --overwrite"): (
        "a call-graph diagram: COMMAND is any stage's command, the values elided"
    ),
}


class DocLine(NamedTuple):
    where: str  # file:line
    text: str  # the command line, from `prefalign` on, continuations joined
    mention: bool = False  # an inline code span: may name a command and a few flags, not the whole run


def _command_text(where: str, text: str, mention: bool = False) -> DocLine | None:
    text = " ".join(text.split())
    m = START.search(text)
    return None if m is None else DocLine(where, text[m.end() :], mention)


def _joined(numbered: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """(line number, line) with each ``\\``-continued line joined to the next ones."""
    out: list[tuple[int, str]] = []
    open_ = False
    for n, line in numbered:
        if open_ and out:
            out[-1] = (out[-1][0], out[-1][1][:-1] + " " + line.strip())
        else:
            out.append((n, line.strip()))
        open_ = out[-1][1].endswith("\\")
    return out


def markdown_lines(rel: str) -> list[DocLine]:
    """Command lines of a markdown file: in fenced blocks, and in inline code spans of the prose."""
    fenced: list[tuple[int, str]] = []
    prose: list[str] = []
    inside = False
    for n, line in enumerate((ROOT / rel).read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            inside = not inside
        elif inside:
            fenced.append((n, line))
        prose.append("" if inside or FENCE.match(line) else line)
    found = [_command_text(f"{rel}:{n}", s) for n, s in _joined(fenced)]
    text = "\n".join(prose)
    for para in re.finditer(r"(?:[^\n]*\S[^\n]*\n?)+", text):  # a code span never crosses a blank line
        for span in re.finditer(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", para.group(0), re.S):
            line = text.count("\n", 0, para.start() + span.start()) + 1
            found.append(_command_text(f"{rel}:{line}", span.group(2).replace("\\|", "|"), True))
    return [d for d in found if d is not None]


def docstring_lines(command: str) -> list[DocLine]:
    """Command lines of the ``Examples::`` block of a command module's docstring (the top of its --help)."""
    module = importlib.import_module(COMMANDS[command][0])
    path = Path(module.__file__)
    assert path.read_text(encoding="utf-8").startswith('"""'), f"{path}: the docstring starts the module"
    lines = module.__doc__.splitlines()  # line i of the docstring is line i + 1 of the file
    start = lines.index("Examples::")
    block = itertools.takewhile(lambda nl: not nl[1] or nl[1][0].isspace(), enumerate(lines[start + 1 :], start + 2))
    rel = path.relative_to(ROOT)
    found = [_command_text(f"{rel}:{n}", s) for n, s in _joined([nl for nl in block if nl[1].strip()])]
    return [d for d in found if d is not None]


def _not_a_command(d: DocLine) -> bool:
    return any(d.where.startswith(f"{rel}:") and d.text.startswith(start) for rel, start in NOT_COMMANDS)


ALL_LINES = [d for rel in MARKDOWN for d in markdown_lines(rel)] + [d for c in COMMANDS for d in docstring_lines(c)]
LINES = [d for d in ALL_LINES if not _not_a_command(d)]


# -- what a command accepts ---------------------------------------------------------------------------------------


class _Captured(Exception):
    """Raised by the stand-in for `parse`: the config class a command's main hands it."""


@cache
def command_config(command: str) -> tuple[type, str]:
    """``(config class, prog)`` that a command's own ``main`` parses its flags into (its ``parse`` intercepted)."""
    seen: dict = {}

    def capture(cls, argv, prog, description=None):
        seen.update(cls=cls, prog=prog)
        raise _Captured

    sub = [SUBCOMMANDS[command]] if command in SUBCOMMANDS else []
    with mock.patch.object(cli_args, "parse", capture), contextlib.suppress(_Captured):
        importlib.import_module(COMMANDS[command][0]).main([*sub, "--help"])
    assert seen, f"prefalign {command}: its main parsed no config through prefalign.cli._args.parse"
    return seen["cls"], seen["prog"]


def _markers(hint) -> tuple:
    return typing.get_args(hint)[1:] if typing.get_origin(hint) is typing.Annotated else ()


def _bare(hint):
    while typing.get_origin(hint) is typing.Annotated:
        hint = typing.get_args(hint)[0]
    return hint


@cache
def accepted_flags(cls: type) -> frozenset[str]:
    """The flags tyro makes of a config's fields (Suppress'ed ones and positionals have none), and ours."""
    hints = typing.get_type_hints(cls, include_extras=True)
    flags = {"-h", "--help", "--config"}
    for f in dataclasses.fields(cls):
        markers = _markers(hints[f.name])
        if not f.init or tyro.conf.Suppress in markers or tyro.conf.Positional in markers:
            continue
        flags.add(flag(f.name))
        if _bare(hints[f.name]) is bool:
            flags.add("--no-" + flag(f.name)[2:])
    return frozenset(flags)


def _choice_table() -> dict[str, tuple[str, ...]]:
    """The string options whose ``validate()`` takes a fixed set of values, by field (the registries the configs
    check against; `test_choice_table_matches_validation` keeps it honest)."""
    from prefalign.compare.arms import ARMS
    from prefalign.compare.config import PRESETS
    from prefalign.compare.tasks import TASKS
    from prefalign.data.preferences import FORMATS
    from prefalign.losses.advantages import ADVANTAGE_ESTIMATORS
    from prefalign.losses.dpo import DPO_LOSSES
    from prefalign.losses.kl import KL_ESTIMATORS
    from prefalign.losses.policy import AGGREGATIONS
    from prefalign.models.frozen import FROZEN_DTYPES
    from prefalign.trainers.config import PRECISIONS

    return {
        "loss_type": tuple(DPO_LOSSES),
        "estimator": tuple(n for n, e in ADVANTAGE_ESTIMATORS.items() if not e.needs_values),
        "loss_agg": AGGREGATIONS,
        "kl_estimator": tuple(KL_ESTIMATORS),
        "frozen_dtype": ("auto", *FROZEN_DTYPES),
        "precision": PRECISIONS,
        "lr_scheduler": ("constant", "linear", "cosine"),
        "decoder": ("loop", "generate"),
        "dtype": ("float32", "bfloat16"),
        "data_format": ("auto", *FORMATS),
        "preset": tuple(PRESETS),
        "task": tuple(TASKS),
        "arms": tuple(ARMS),
    }


def value_choices(cls: type) -> dict[str, tuple]:
    """``{--flag: its values}`` of the options of ``cls`` that take a fixed set: Literal fields, and the table."""
    hints = typing.get_type_hints(cls, include_extras=True)
    table = _choice_table()
    out = {}
    for f in dataclasses.fields(cls):
        hint = _bare(hints[f.name])
        members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, type(int | str)) else (hint,)
        literal = [v for m in members if typing.get_origin(m) is Literal for v in typing.get_args(m)]
        if literal or f.name in table:
            out[flag(f.name)] = tuple(literal) or table[f.name]
    return out


# -- one line -----------------------------------------------------------------------------------------------------


def split_line(d: DocLine) -> tuple[str, list[str]]:
    """``(command, the words after it)``; shell decorations dropped (comments, a pipe on, ``...``)."""
    words = shlex.split(d.text, comments=True)
    words = list(itertools.takewhile(lambda w: w not in ("|", "||", "&&", ";", ">"), words))[1:]
    words = [w for w in words if w != "..."]
    assert words, f"{d.where}: `{d.text}` names no command"
    command, rest = words[0], words[1:]
    if command in SUBCOMMANDS:
        assert rest[:1] == [SUBCOMMANDS[command]], f"{d.where}: `prefalign {command}` needs {SUBCOMMANDS[command]}"
        rest = rest[1:]
    return command, rest


def flag_values(words: list[str]) -> list[tuple[str, list[str]]]:
    """``(--flag, the words after it up to the next flag)`` for each flag; ``--x=v`` is ``--x`` with ``v``."""
    out: list[tuple[str, list[str]]] = []
    for w in words:
        if w.startswith("-") and not re.fullmatch(r"-[\d.].*", w):
            name, eq, value = w.partition("=")
            out.append((name, [value] if eq else []))
        elif out:
            out[-1][1].append(w)
    return out


def configs_for(command: str, d: DocLine) -> list[tuple[type, str]]:
    """The (config, prog) the line's flags go to; a placeholder command (``<command>``) stands for every one."""
    if PLACEHOLDER.match(command):
        return [command_config(c) for c in COMMANDS]
    assert command in COMMANDS or command in ("-h", "--help", "-V", "--version"), (
        f"{d.where}: unknown command {command!r} in `{d.text}` (commands: {', '.join(COMMANDS)})"
    )
    return [command_config(command)] if command in COMMANDS else []


def check_flags(d: DocLine, cls: type, prog: str, words: list[str]) -> None:
    known = accepted_flags(cls)
    for name in (name for name, _ in flag_values(words) if name not in known):
        pytest.fail(f"{d.where}: {name} is not a flag of `{prog}` (in `{d.text}`)")


def check_values(d: DocLine, cls: type, prog: str, words: list[str]) -> None:
    choices = value_choices(cls)
    for name, values in flag_values(words):
        for value in (v for word in values for v in word.split("|") if not PLACEHOLDER.match(v)):
            if name in choices and value not in choices[name]:
                pytest.fail(
                    f"{d.where}: `{prog} {name}` takes one of {', '.join(map(str, choices[name]))}, not {value!r} "
                    f"(in `{d.text}`)"
                )


def _default_words(cls: type, name: str) -> list[str]:
    """A field's default as command-line words (what a placeholder value is parsed as)."""
    field = next(f for f in dataclasses.fields(cls) if flag(f.name) == name)
    value = field.default_factory() if callable(field.default_factory) else field.default
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def argvs(cls: type, words: list[str], config_file: str, mention: bool) -> list[list[str]]:
    """The argv(s) to parse: one per ``a|b`` alternative; placeholder values by the default, ``--config``'s file
    by ``config_file``, which a mention (`prefalign rl --estimator grpo`) also reads: it need not name the data."""
    head = list(itertools.takewhile(lambda w: not w.startswith("-"), words))  # positionals (data inspect PATH)
    given = "--config" in (name for name, _ in flag_values(words))
    options: list[list[list[str]]] = [[head + (["--config", config_file] if mention and not given else [])]]
    for name, values in flag_values(words[len(head) :]):
        if name == "--config":
            options.append([["--config", config_file]])
        elif any(PLACEHOLDER.match(v) for v in values):
            options.append([[name, *_default_words(cls, name)]])
        else:
            alternatives = [v.split("|") for v in values]
            options.append([[name, *combo] for combo in itertools.product(*alternatives)])
    return [[w for part in combo for w in part] for combo in itertools.product(*[o or [[]] for o in options])]


def check_parses(d: DocLine, cls: type, prog: str, words: list[str], config_file: str) -> None:
    for argv in argvs(cls, words, config_file, d.mention):
        try:
            cli_args.parse(cls, argv, prog=prog)
        except SystemExit as e:  # --help prints and exits 0
            assert e.code == 0 and "--help" in argv, f"{d.where}: `{prog} {shlex.join(argv)}` exits {e.code}"
        except UserError as e:
            pytest.fail(f"{d.where}: `{prog} {shlex.join(argv)}` is refused: {e} (in `{d.text}`)")


# -- the tests ----------------------------------------------------------------------------------------------------


def test_the_collection_finds_the_documented_lines():
    """Not vacuous: each source holds lines, the docstrings of every command, and the known shapes parse out."""
    wheres = {d.where.split(":")[0] for d in ALL_LINES}
    assert {"README.md", "BENCHMARKS.md", "docs/tasks.md"} <= wheres
    assert {str(Path(importlib.import_module(m).__file__).relative_to(ROOT)) for m, _ in COMMANDS.values()} <= wheres
    texts = {d.text for d in ALL_LINES}
    assert "prefalign rl --estimator grpo|dr_grpo|rloo|reinforce_pp" in texts  # an inline span in a README bullet
    assert any(t.startswith("prefalign dpo --data ../shared/data/hh-rlhf/") and "--max-steps 24" in t for t in texts)
    assert len(LINES) >= 100, len(LINES)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_required_values_make_a_valid_config(command):
    """What a line's --config FILE (or a mention's missing data) stands for passes the command's check()."""
    command_config(command)[0](**REQUIRED[command])


def test_every_not_a_command_entry_still_names_a_line():
    for rel, start in NOT_COMMANDS:
        assert any(d.where.startswith(f"{rel}:") and d.text.startswith(start) for d in ALL_LINES), (rel, start)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_accepted_flags_are_those_tyro_lists(command, capsys):
    """The flag set this test derives from a config is the one the command's --help lists (tyro's spelling)."""
    cls, prog = command_config(command)
    with pytest.raises(SystemExit):
        cli_args.parse(cls, ["--help"], prog=prog)
    listed = set(
        re.findall(r"(?m)^\W{0,3}(?:-h, )?(--[a-z][a-z0-9-]*)(?:, (--[a-z][a-z0-9-]*))?", capsys.readouterr().out)
    )
    assert {f for pair in listed for f in pair if f} | {"-h", "--config"} == accepted_flags(cls)


def _tabled(command: str) -> list[tuple[str, str, tuple]]:
    cls = command_config(command)[0]
    hints = typing.get_type_hints(cls)
    table = value_choices(cls)
    return [
        (command, f.name, table[flag(f.name)])
        for f in dataclasses.fields(cls)
        if flag(f.name) in table and typing.get_origin(_bare(hints[f.name])) is not Literal
    ]


@pytest.mark.parametrize(("command", "field", "choices"), [t for c in COMMANDS for t in _tabled(c)])
def test_choice_table_matches_validation(command, field, choices):
    """Each tabled value passes the config's check; a value outside the table is refused, naming the flag."""
    cls = command_config(command)[0]
    listed = isinstance(getattr(cls(**REQUIRED[command]), field), list)
    for value in choices:
        cls(**REQUIRED[command], **{field: [value] if listed else value})
    with pytest.raises(ValueError, match=re.escape(flag(field))):
        cls(**REQUIRED[command], **{field: ["no-such-value"] if listed else "no-such-value"})


@pytest.mark.parametrize("doc", LINES, ids=[d.where for d in LINES])
def test_documented_command_line_is_accepted(doc, tmp_path):
    command, words = split_line(doc)
    for cls, prog in configs_for(command, doc):
        check_flags(doc, cls, prog, words)
        check_values(doc, cls, prog, words)
    if command in COMMANDS:  # a line for every command (`prefalign <command> --help`) has no one argv
        config_file = tmp_path / "config.yaml"  # what the line's --config FILE stands for
        config_file.write_text(yaml.safe_dump(REQUIRED[command]), encoding="utf-8")
        check_parses(doc, *command_config(command), words, str(config_file))
