"""Prompt-only datasets, for PPO rollouts and generation.

A source is a structured file (``.jsonl``/``.json``/``.csv``/``.parquet``, optionally ``.gz``) with a
prompt column of strings or of message lists, a hub dataset id, any other file read as plain text (one
prompt per non-blank line, e.g. ``rt-polarity.pos``), or a Python list of prompt strings. A
preference file without a prompt column gives the prompts of its pairs (e.g. HH-RLHF transcripts up to
the last ``\\n\\nAssistant:``).

Message-list prompts are rendered with the chat template and ``add_generation_prompt=True``; plain
strings are used as they are, or, with ``chat=True``, wrapped as one user message and rendered the
same way. Empty prompts are dropped and counted (reason ``empty_prompt``); lines are kept as they are
apart from the line break, so a trailing space stays.

A table's other columns (e.g. the reference answer of a verifiable task) come with the prompts from
`load_prompt_rows`, one list per column aligned with the kept prompts, for a ``module:function`` reward
(`prefalign.rewards.CallableReward`); a row without a column has ``None`` there. A plain-text file, a
prompt list and a preference file (whose prompts come from its pairs) have no other columns.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from prefalign.data import chat as chatlib  # `chat` is also a flag name below
from prefalign.data.io import DEFAULT_SPLIT, STRUCTURED, Table, progress, read_table, type_name
from prefalign.data.preferences import FORMATS, detect_format, parse_preferences
from prefalign.data.report import DropReport
from prefalign.errors import UserError

log = logging.getLogger(__name__)


def load_prompts(
    source: str | Path | list[str],
    tokenizer=None,
    *,
    column: str = "prompt",
    chat: bool = False,
    split: str = DEFAULT_SPLIT,
    strict: bool = False,
) -> list[str]:
    """Prompt texts from ``source`` (see the module docstring); drops are logged, none left is a `UserError`."""
    return load_prompt_rows(source, tokenizer, column=column, chat=chat, split=split, strict=strict)[0]


def load_prompt_rows(
    source: str | Path | list[str],
    tokenizer=None,
    *,
    column: str = "prompt",
    chat: bool = False,
    split: str = DEFAULT_SPLIT,
    strict: bool = False,
) -> tuple[list[str], dict[str, list[Any]]]:
    """``(prompts, columns)``: `load_prompts`' N prompt texts and the table's other columns, each a list of N
    values aligned with the prompts (``{}`` for a text file, a list or a preference file)."""
    return load_prompt_rows_reported(source, tokenizer, column=column, chat=chat, split=split, strict=strict)[:2]


def load_prompt_rows_reported(
    source: str | Path | list[str],
    tokenizer=None,
    *,
    column: str = "prompt",
    chat: bool = False,
    split: str = DEFAULT_SPLIT,
    strict: bool = False,
) -> tuple[list[str], dict[str, list[Any]], DropReport]:
    """`load_prompt_rows` and the `DropReport` of its rows: rows read, dropped by reason (a trainer records it in
    run.json and its model card)."""
    if isinstance(source, (list, tuple)):
        table = Table(
            "<prompt list>", "list", [column], [(f"prompt {i}", {column: p}) for i, p in enumerate(source, start=1)]
        )
        if not table.rows:
            raise UserError("the prompt list is empty; give at least one prompt")
    else:
        table = read_table(source, split=split, text_column=column)
    prompts, columns, report = parse_prompt_rows(table, tokenizer, column=column, chat=chat, strict=strict)
    report.require_some_kept("give non-empty prompts")
    if report.dropped:
        log.warning("%s: %s", table.source, report.summary())
    return prompts, columns, report


def take_rows(columns: dict[str, list[Any]], rows: list[int]) -> dict[str, list[Any]]:
    """Each column's values at prompt indices ``rows`` (N -> len(rows)), e.g. ``rows = [i for i in idx for _ in
    range(K)]`` gives every prompt's values once per completion, aligned with the completions."""
    return {name: [values[i] for i in rows] for name, values in columns.items()}


def read_prompts(values: list[str], tokenizer=None, chat: bool = False, *, flag: str = "--prompts") -> list[str]:
    """Prompt texts from command-line values: each an existing file (read by `load_prompts`) or a literal prompt.

    Empty input is a one-line `UserError`: no values at all (naming ``flag``), an empty or blank value
    (naming ``flag`` and which value), a file with no prompt (naming the file).
    """
    return read_prompt_rows(values, tokenizer, chat, flag=flag)[0]


def read_prompt_rows(
    values: list[str], tokenizer=None, chat: bool = False, *, flag: str = "--prompts"
) -> tuple[list[str], dict[str, list[Any]]]:
    """`read_prompts` with the files' other columns (`load_prompt_rows`), each a list aligned with all the prompts:
    ``None`` where a prompt's file lacks the column, and for every literal prompt (a literal has no columns)."""
    if not values:
        raise UserError(f"no prompts: give {flag} FILE or literal prompt texts")
    texts: list[str] = []
    columns: dict[str, list[Any]] = {}
    for n, value in enumerate(values, start=1):
        if not str(value).strip():  # Path("") is the working directory: refuse before it is read as one
            raise UserError(f"{flag}: value {n} is empty; give a prompt file or a non-empty prompt text")
        exists = Path(value).exists()
        if not exists and _names_a_file(str(value)):
            raise UserError(
                f"{flag} {value}: file not found; give an existing prompt file (.txt, .jsonl, .json, .csv, .parquet) "
                "or a prompt text"
            )
        prompts, found = load_prompt_rows(value if exists else [value], tokenizer, chat=chat)
        for name in found:
            columns.setdefault(name, [None] * len(texts))  # a column new here: the earlier prompts lack it
        for name, column in columns.items():
            column += found.get(name, [None] * len(prompts))
        texts += prompts
    return texts, columns


def _names_a_file(value: str) -> bool:
    """A value meant as a path, not as a prompt: one word with a data file's suffix (``prompts.jsonl``) or in a
    directory that exists (``data/neg`` with ``data/`` there), so that a typo is refused instead of sampled as the
    prompt text; ``3/4+1/4=`` stays a prompt."""
    if any(c.isspace() for c in value):
        return False
    suffixes = [x.lower() for x in Path(value).suffixes]
    if any(x in (*STRUCTURED, ".gz", ".txt", ".tsv") for x in suffixes):
        return True
    return ("/" in value or os.sep in value) and Path(value).parent.is_dir()


def parse_prompts(
    table: Table, tokenizer=None, *, column: str = "prompt", chat: bool = False, strict: bool = False
) -> tuple[list[str], DropReport]:
    """Prompt texts from the rows of ``table`` and the `DropReport` (never raises for "all dropped")."""
    prompts, _, report = parse_prompt_rows(table, tokenizer, column=column, chat=chat, strict=strict)
    return prompts, report


def parse_prompt_rows(
    table: Table, tokenizer=None, *, column: str = "prompt", chat: bool = False, strict: bool = False
) -> tuple[list[str], dict[str, list[Any]], DropReport]:
    """`parse_prompts` with the table's other columns: ``(prompts, columns, report)``, each column a list aligned
    with the N kept prompts (``None`` where a row lacks it; ``{}`` for a preference file)."""
    if column not in table.columns:
        if column == "prompt" and {"chosen", "rejected"} <= set(table.columns):
            fmt = detect_format(table)
            if fmt in FORMATS:
                pairs, report = parse_preferences(table, fmt, tokenizer, strict=strict)
                return [p.prompt for p in pairs], {}, report
        raise UserError(
            f"{table.source}: missing column {column!r} (found columns: {', '.join(table.columns)}); "
            f"rename the column that holds the prompts to {column!r}, or give a .txt file with one prompt per line"
        )
    if chat:
        chatlib.require_template(tokenizer, table.source)
    report = DropReport(source=table.source, total=len(table.rows), strict=strict)
    prompts: list[str] = []
    columns: dict[str, list[Any]] = {name: [] for name in table.columns if name != column}
    for where, row in progress(table.rows, "parse"):
        if column not in row:
            raise UserError(f"{table.source}: {where}: missing column {column!r}; every row needs a prompt")
        value = row[column]
        messages: list[dict] | None
        if isinstance(value, list):
            messages = chatlib.check_messages(value, column, where, table.source)
            chatlib.require_template(tokenizer, table.source)
            empty = not "".join(m["content"] for m in messages).strip()
        elif isinstance(value, str):
            messages = [{"role": "user", "content": value}] if chat else None
            empty = not value.strip()
        else:
            raise UserError(
                f"{table.source}: {where}: {column!r} must be a string or a list of messages, "
                f"got {type_name(value)}; fix the row"
            )
        if empty:
            report.drop("empty_prompt", where, "prompt is empty")
            continue
        if messages is not None:
            value = chatlib.render(tokenizer, messages, add_generation_prompt=True, where=where, source=table.source)
        prompts.append(value)
        for name, values in columns.items():
            values.append(row.get(name))  # JSON lines may omit a key: None, as `datasets` reads it
    return prompts, columns, report
