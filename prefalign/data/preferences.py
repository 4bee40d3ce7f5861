"""Preference pairs from a file or hub dataset, in one of three formats.

Formats (detected from the columns of the first row, or forced with ``format=``):

``explicit``
    ``prompt``, ``chosen``, ``rejected`` strings; the completions follow the prompt as given.
``conversational``
    ``chosen``/``rejected`` (and optional ``prompt``) are lists of ``{role, content}`` messages,
    rendered with the tokenizer's chat template (see `prefalign.data.chat`). Without ``prompt``, or when
    chosen opens with a user or system message (whole conversations, as in UltraFeedback's binarized rows),
    the prompt is every message before the last assistant message, and chosen and rejected must share it; a
    ``prompt`` column beside whole conversations must be those messages or the last one's text (a string).
``implicit``
    ``chosen``/``rejected`` are whole transcripts (Anthropic HH-RLHF style ``\\n\\nHuman: ...
    \\n\\nAssistant: ...``). The prompt is the chosen transcript up to and including its last
    ``\\n\\nAssistant:``; the rejected transcript must start with that same prompt. The completions
    are the rest, so they begin with the space after the marker, which BPE tokenizers fold into the
    first word: the prompt/completion token boundary is the same one the model sees when generating.

An optional numeric ``margin`` column is kept per pair. Malformed input is a `UserError`; usable-but-
bad rows are dropped and counted (reasons: ``empty_prompt``, ``empty_chosen``, ``empty_rejected``,
``identical``, ``no_assistant_turn``, ``after_last_assistant``, ``prompt_mismatch``,
``prompt_column_mismatch``, ``template_prefix_mismatch``, ``reply_not_assistant``). A reply of
only whitespace counts as empty.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from prefalign.data import chat
from prefalign.data.io import DEFAULT_SPLIT, Table, progress, read_table, row_field, text_field
from prefalign.data.report import DropReport
from prefalign.errors import UserError

log = logging.getLogger(__name__)

FORMATS = ("explicit", "conversational", "implicit")
PROMPT_ONLY = "prompt"
REQUIRED = {
    "explicit": ("prompt", "chosen", "rejected"),
    "conversational": ("chosen", "rejected"),
    "implicit": ("chosen", "rejected"),
    PROMPT_ONLY: ("prompt",),
}
ASSISTANT_MARKER = "\n\nAssistant:"


@dataclass(frozen=True)
class PreferenceExample:
    """One preference pair as text: ``prompt + chosen`` is preferred to ``prompt + rejected``."""

    prompt: str
    chosen: str
    rejected: str
    margin: float | None = None
    where: str = field(default="", compare=False, repr=False)
    """Where the row came from (``"line 12"``), for drop reports; not part of equality."""


def detect_format(table: Table) -> str:
    """``explicit``, ``conversational``, ``implicit`` or ``prompt`` (prompt-only) from the columns."""
    cols = set(table.columns)
    found = ", ".join(table.columns) or "none"
    if {"chosen", "rejected"} <= cols:
        first = table.rows[0][1]
        if isinstance(first.get("chosen"), list) or isinstance(first.get("rejected"), list):
            return "conversational"
        return "explicit" if "prompt" in cols else "implicit"
    if "chosen" in cols or "rejected" in cols:
        missing = "rejected" if "chosen" in cols else "chosen"
        raise UserError(
            f"{table.source}: missing column {missing!r} (found columns: {found}); "
            "preference data needs both chosen and rejected"
        )
    if "prompt" in cols:
        return PROMPT_ONLY
    raise UserError(
        f"{table.source}: unknown format: found columns {found}; expected prompt+chosen+rejected "
        "(explicit or conversational), chosen+rejected (implicit transcripts), or prompt (prompt-only)"
    )


def check_columns(table: Table, fmt: str) -> None:
    """Raise a `UserError` naming the first column ``fmt`` needs that the table lacks."""
    if fmt not in REQUIRED:
        raise UserError(f"unknown format {fmt!r}; choose one of {', '.join(REQUIRED)}")
    for col in REQUIRED[fmt]:
        if col not in table.columns:
            raise UserError(
                f"{table.source}: missing column {col!r} (found columns: {', '.join(table.columns)}); "
                f"format {fmt} needs {', '.join(REQUIRED[fmt])}"
            )


def load_preferences(
    source: str | Path | Table,
    tokenizer=None,
    *,
    format: str | None = None,
    split: str = DEFAULT_SPLIT,
    strict: bool = False,
) -> tuple[list[PreferenceExample], DropReport]:
    """Read, validate and parse preference pairs; ``tokenizer`` is needed for conversational data only.

    ``source`` is a path or hub id (read at ``split``), or a `Table` already read from one.

    ``format`` is one of `FORMATS`, or None / ``"auto"`` to detect it from the columns.

    Returns the kept pairs and a `DropReport`. Raises `UserError` on malformed input, and when every
    row is dropped. ``strict=True`` makes the first drop an error.
    """
    table = source if isinstance(source, Table) else read_table(source, split=split)
    source = table.source
    if table.kind == "text":
        raise UserError(
            f"{source}: preference data must be .jsonl, .json, .csv or .parquet (optionally .gz) "
            "or a hub dataset id; this looks like a plain-text file"
        )
    fmt = detect_format(table) if format in (None, "auto") else format
    if fmt == PROMPT_ONLY:
        raise UserError(
            f"{source}: has a prompt column but no chosen/rejected columns: that is a prompt-only "
            "dataset (use it for PPO / generation); preference data needs chosen and rejected"
        )
    examples, report = parse_preferences(table, fmt, tokenizer, strict=strict)
    report.require_some_kept("fix the rows, or check that the format is right (--format)")
    if report.dropped:
        log.warning("%s: %s", source, report.summary())
    return examples, report


def parse_preferences(
    table: Table, fmt: str, tokenizer=None, *, strict: bool = False
) -> tuple[list[PreferenceExample], DropReport]:
    """Turn the rows of ``table`` into pairs of format ``fmt`` (never raises for "all dropped")."""
    if fmt not in FORMATS:
        raise UserError(f"format {fmt!r} is not a preference format; choose one of {', '.join(FORMATS)}")
    check_columns(table, fmt)
    if fmt == "conversational":
        chat.require_template(tokenizer, table.source)
    has_margin = "margin" in table.columns
    report = DropReport(source=table.source, total=len(table.rows), strict=strict)
    out: list[PreferenceExample] = []
    for where, row in progress(table.rows, "parse"):
        get = _Getter(table.source, where, row, fmt)
        parsed: _Parsed | None
        if fmt == "explicit":
            parsed = _explicit(get, report)
        elif fmt == "implicit":
            parsed = _implicit(get, report)
        else:
            parsed = _conversational(get, report, tokenizer, "prompt" in table.columns)
        margin = get.margin() if has_margin else None  # checked on every row, dropped or not
        if parsed is None or not _keep(parsed, get, report):
            continue
        out.append(PreferenceExample(parsed.prompt, parsed.chosen, parsed.rejected, margin, where))
    return out, report


class _Parsed(NamedTuple):
    prompt: str
    chosen: str
    rejected: str
    chosen_body: str  # what the emptiness check looks at: the reply without template tokens
    rejected_body: str
    prompt_body: str  # the prompt without template tokens: a conversation with no words before the reply is empty


class _Getter:
    """Typed access to one row's fields, with errors that name the file, the row and the fix."""

    def __init__(self, source: str, where: str, row: dict[str, Any], fmt: str):
        self.source, self.where, self.row, self.fmt = source, where, row, fmt

    @property
    def needs(self) -> str:
        return f"every row of format {self.fmt} needs {', '.join(REQUIRED[self.fmt])}"

    def raw(self, name: str) -> Any:
        return row_field(self.source, self.where, self.row, name, self.needs)

    def text(self, name: str) -> str:
        hint = "a list of messages: force --format conversational?"
        return text_field(self.source, self.where, self.row, name, self.needs, list_hint=hint)

    def messages(self, name: str) -> list[dict]:
        return chat.check_messages(self.raw(name), name, self.where, self.source)

    def margin(self) -> float:
        if "margin" not in self.row:
            raise UserError(
                f"{self.source}: {self.where}: missing column 'margin' (the data has a margin column, "
                "so every row needs one); fix the row, or remove the column"
            )
        value = self.row["margin"]
        if isinstance(value, str):  # CSV cells are strings
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UserError(
                f"{self.source}: {self.where}: 'margin' must be a finite number, got {value!r}; "
                "fix the row, or remove the margin column"
            )
        return float(value)


def _explicit(get: _Getter, report: DropReport) -> _Parsed:
    chosen, rejected = get.text("chosen"), get.text("rejected")
    prompt = get.text("prompt")
    return _Parsed(prompt, chosen, rejected, chosen, rejected, prompt)


def _implicit(get: _Getter, report: DropReport) -> _Parsed | None:
    chosen, rejected = get.text("chosen"), get.text("rejected")
    cut = chosen.rfind(ASSISTANT_MARKER)
    if cut < 0:
        report.drop("no_assistant_turn", get.where, "chosen transcript has no '\\n\\nAssistant:' turn")
        return None
    prompt = chosen[: cut + len(ASSISTANT_MARKER)]
    if not rejected.startswith(prompt):
        report.drop(
            "prompt_mismatch",
            get.where,
            "rejected does not start with the chosen transcript up to its last '\\n\\nAssistant:'",
        )
        return None
    chosen, rejected = chosen[len(prompt) :], rejected[len(prompt) :]
    return _Parsed(prompt, chosen, rejected, chosen, rejected, prompt)


def _conversational(get: _Getter, report: DropReport, tokenizer, has_prompt: bool) -> _Parsed | None:
    chosen, rejected = get.messages("chosen"), get.messages("rejected")
    # chosen opening with the user's (or system's) turn is the whole conversation, as in UltraFeedback's binarized
    # rows: the prompt is what precedes its last assistant message, and a prompt column only restates it
    if has_prompt and chosen[0]["role"] == "assistant":
        if "prompt" not in get.row:
            raise UserError(
                f"{get.source}: {get.where}: no 'prompt' (other rows have one) and chosen opens with the assistant's "
                "reply; give the row its prompt messages"
            )
        prompt = get.messages("prompt")
        chosen_tail, rejected_tail = chosen, rejected
        for name, tail in (("chosen", chosen), ("rejected", rejected)):
            # a user or tool turn inside the reply would train the policy to write it (a whole conversation's
            # is dropped as after_last_assistant)
            other = next((m["role"] for m in tail if m["role"] != "assistant"), None)
            if other is not None:
                report.drop(
                    "reply_not_assistant", get.where, f"{name} holds a {other} message; a reply is assistant messages"
                )
                return None
    else:
        split = _split_conversations(get, report, chosen, rejected)
        if split is None:
            return None
        prompt, chosen_tail, rejected_tail = split
    where, src = get.where, get.source
    prompt_text = chat.render(tokenizer, prompt, add_generation_prompt=True, where=where, source=src)
    texts = []
    for name, tail in (("chosen", chosen_tail), ("rejected", rejected_tail)):
        text = chat.render_completion(tokenizer, prompt_text, prompt, tail, where=where, source=src)
        if text is None:
            report.drop(
                "template_prefix_mismatch",
                where,
                f"the rendered prompt is not a prefix of the rendered prompt + {name}",
            )
            return None
        texts.append(text)
    chosen_body, rejected_body, prompt_body = (
        "".join(m["content"] for m in ms) for ms in (chosen_tail, rejected_tail, prompt)
    )
    return _Parsed(prompt_text, texts[0], texts[1], chosen_body, rejected_body, prompt_body)


def _split_conversations(
    get: _Getter, report: DropReport, chosen: list[dict], rejected: list[dict]
) -> tuple[list[dict], list[dict], list[dict]] | None:
    """``(prompt, chosen tail, rejected tail)`` of two whole conversations, cut before each one's last assistant
    message, or None when the row is dropped (no assistant message, a message after it, the two differ before it,
    or a ``prompt`` column that is neither those messages nor the last one's text)."""
    i, j = chat.last_assistant(chosen), chat.last_assistant(rejected)
    if i is None or j is None:
        report.drop("no_assistant_turn", get.where, f"{'chosen' if i is None else 'rejected'} has no assistant message")
        return None
    for name, messages, k in (("chosen", chosen, i), ("rejected", rejected, j)):
        if k < len(messages) - 1:  # a user or tool message after the reply: not a reply the policy should write
            role = messages[k + 1]["role"]
            report.drop("after_last_assistant", get.where, f"{name} has a {role} message after its last assistant one")
            return None
    prompt = chosen[:i]
    if rejected[:j] != prompt:
        report.drop("prompt_mismatch", get.where, "chosen and rejected differ before their last assistant message")
        return None
    if "prompt" in get.row:
        given = get.row["prompt"]
        last = prompt[-1]["content"] if prompt else ""
        if not (given == prompt or (isinstance(given, str) and given.strip() == last.strip())):
            report.drop(
                "prompt_column_mismatch",
                get.where,
                "the prompt column is neither the messages before chosen's last assistant message nor the last "
                "one's text",
            )
            return None
    return prompt, chosen[i:], rejected[j:]


def _keep(parsed: _Parsed, get: _Getter, report: DropReport) -> bool:
    """Drop empty fields and identical completions; True if the row survives."""
    if not parsed.prompt_body.strip():
        report.drop("empty_prompt", get.where, "prompt is empty")
    elif not parsed.chosen_body.strip():
        report.drop("empty_chosen", get.where, "chosen reply is empty")
    elif not parsed.rejected_body.strip():
        report.drop("empty_rejected", get.where, "rejected reply is empty")
    elif parsed.chosen == parsed.rejected:
        report.drop("identical", get.where, "chosen and rejected are identical")
    else:
        return True
    return False
