"""``prefalign data inspect``: what a dataset holds before you train on it.

Examples::

    prefalign data inspect ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz
    prefalign data inspect pairs.jsonl --format explicit --max-length 512
    prefalign data inspect ../shared/data/rt-polarity/rt-polarity.pos      # prompt-only: one per line
    prefalign data inspect org/name --split test                            # a hub dataset
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Annotated, Literal

import tyro

from prefalign.validation import Validated

USAGE = """usage: prefalign data <command> [flags]   (prefalign data <command> --help for its flags)

commands:
  inspect  format, rows kept and dropped by reason, token-length percentiles"""


@dataclass
class InspectConfig(Validated):
    """Report a dataset's format, rows kept and dropped (by reason) and token-length percentiles."""

    path: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="PATH")]
    """Data file: .jsonl/.json/.csv/.parquet (optionally .gz), any other file = one prompt per line; or a hub id."""
    format: Literal["auto", "explicit", "conversational", "implicit", "prompt"] = "auto"
    """Row format; auto detects it from the columns. `prompt` = a prompt-only dataset."""
    model: str = "smollm2-135m"
    """Tokenizer to count tokens with: hub id, local model directory, or an embedded name."""
    max_length: int | None = None
    """Also apply the training truncation policy at this many tokens and report what it drops."""
    max_prompt_length: int | None = None
    """Prompt cap for the truncation policy (default: max_length // 2). For prompt-only data it may come alone: the
    --max-prompt-length of ppo, rl, generate and eval."""
    split: str = "train"
    """Split of a hub dataset."""
    column: str = "prompt"
    """Prompt column of a prompt-only dataset."""

    def validate(self) -> None:
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"--max-length must be >= 2, got {self.max_length}")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ValueError(f"--max-prompt-length must be >= 1, got {self.max_prompt_length}")
        if self.max_length is not None and (self.max_prompt_length or 0) >= self.max_length:
            raise ValueError("--max-prompt-length must be smaller than --max-length (as the trainers refuse it)")


def percentiles(values: list[int]) -> list[int | None]:
    """p50, p90, p99 (nearest rank) and max; None for an empty list."""
    if not values:
        return [None] * 4
    s = sorted(values)
    rank = [max(0, -(-p * len(s) // 100) - 1) for p in (50, 90, 99)]  # ceil(p/100 * n) - 1
    return [*(s[i] for i in rank), s[-1]]


def _length_table(columns: dict[str, list[int]]) -> list[str]:
    lines = [f"  {'tokens':<10}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}"]
    for name, values in columns.items():
        cells = "".join(f"{'-' if v is None else v:>8}" for v in percentiles(values))
        lines.append(f"  {name:<10}{cells}")
    return lines


def inspect(cfg: InspectConfig) -> list[str]:
    """The report's lines (printed by `main`)."""
    from prefalign.data import read_table
    from prefalign.data.preferences import PROMPT_ONLY, detect_format
    from prefalign.data.prompts import parse_prompts
    from prefalign.data.tokens import tokenize_prompts
    from prefalign.errors import UserError
    from prefalign.models import load_tokenizer

    table = read_table(cfg.path, split=cfg.split, text_column=cfg.column)
    fmt: str
    if cfg.format != "auto":
        fmt, how = cfg.format, "forced"
    elif table.kind == "text":
        fmt, how = PROMPT_ONLY, "plain text, one prompt per line"
    else:
        fmt, how = detect_format(table), "detected"
    sft = cfg.format == "auto" and {"prompt", "completion"} <= set(table.columns)  # sft's prompt/completion rows
    pair_prompts = cfg.column == "prompt" and {"chosen", "rejected"} <= set(table.columns)  # as ppo, rl, eval read
    if fmt == PROMPT_ONLY and table.kind != "text" and cfg.column not in table.columns and not pair_prompts:
        # refused here, naming the column asked for (parse_prompts' message names no --column flag)
        raise UserError(
            f"{cfg.path}: missing column {cfg.column!r} (found columns: {', '.join(table.columns)}); "
            "pass --column with the name of the prompt column"
        )
    if cfg.column != "prompt" and (sft or fmt != PROMPT_ONLY):  # it would be ignored: only prompt rows read it
        kind = "prompt/completion (sft)" if sft else f"{fmt} preference"
        raise UserError(
            f"{cfg.path}: --column {cfg.column!r} names a prompt-only file's column, and this file holds {kind} rows; "
            "drop --column, or add --format prompt to read that column as prompts"
        )
    tokenizer = load_tokenizer(cfg.model)
    if sft:
        fmt, how = "prompt-completion", "detected: sft's rows"
    lines = [f"source: {cfg.path}", f"format: {fmt} ({how})"]
    if sft:
        report, lengths = _sft_rows(cfg, table, tokenizer)
    elif fmt == PROMPT_ONLY:
        prompts, report = parse_prompts(table, tokenizer, column=cfg.column)
        lengths = {"prompt": [len(ids) for ids in tokenize_prompts(prompts, tokenizer, sys.maxsize)]}
    else:
        report, lengths = _pair_rows(cfg, table, fmt, tokenizer)
    lines.append(f"rows: {report.total}   kept: {report.kept}   dropped: {report.dropped}")
    lines += [f"  {line}" for line in report.lines()]
    if fmt == PROMPT_ONLY and not sft and (cfg.max_length is not None or cfg.max_prompt_length is not None):
        cap = cfg.max_prompt_length or cfg.max_length // 2  # type: ignore[operator]  # one of the two is set
        too_long = sum(n > cap for n in lengths["prompt"])
        lines.append(f"  {too_long} prompts longer than {cap} tokens would keep only their last {cap}")
    if not report.kept:
        lines.append(NO_USABLE_ROWS)
    notes = ([] if fmt == PROMPT_ONLY and not sft else ["completions include the final EOS"]) + (
        ["before truncation"] if cfg.max_length else []
    )
    lines.append(f"token lengths with the {cfg.model} tokenizer" + (f" ({'; '.join(notes)})" if notes else "") + ":")
    lines += _length_table(lengths)
    return lines


NO_USABLE_ROWS = "warning: no usable rows: training on this data would stop with an error"


def _pair_rows(cfg: InspectConfig, table, fmt: str, tokenizer):
    """``(report, lengths)`` of preference pairs as dpo and reward read them: rows dropped while parsing, pairs
    identical as tokens and, with --max-length, the pairs the truncation policy drops; lengths before truncation."""
    from prefalign.data.preferences import parse_preferences
    from prefalign.data.tokens import leading_bos, tokenize_preferences, truncate_pairs

    examples, report = parse_preferences(table, fmt, tokenizer)
    pairs: list = []
    if examples:
        pairs, tokenized = tokenize_preferences(examples, tokenizer, None, source=cfg.path, require_kept=False)
        report.merge(tokenized)  # pairs whose two completions tokenise the same
    lengths = {
        "prompt": [len(p.prompt_ids) for p in pairs],
        "chosen": [len(p.chosen_ids) for p in pairs],
        "rejected": [len(p.rejected_ids) for p in pairs],
    }
    if cfg.max_length is not None:
        _, fitted = truncate_pairs(pairs, cfg.max_length, cfg.max_prompt_length, leading_bos(tokenizer))
        report.merge(fitted)
    return report, lengths


def _sft_rows(cfg: InspectConfig, table, tokenizer):
    """``(report, lengths)`` of prompt/completion rows as `prefalign sft` reads them: empty rows and, with
    --max-length, the rows its truncation policy drops; lengths before truncation."""
    from prefalign.data.tokens import leading_bos, tokenize_sft, truncate_sft
    from prefalign.trainers.data import prompt_completion_rows

    prompts, completions, wheres, report = prompt_completion_rows(table, require_kept=False)
    rows, _ = tokenize_sft(prompts, completions, tokenizer, None, None, wheres, cfg.path, require_kept=False)
    if cfg.max_length is not None:
        _, fitted = truncate_sft(rows, cfg.max_length, cfg.max_prompt_length, leading_bos(tokenizer), cfg.path)
        report.merge(fitted)
    lengths = {"prompt": [len(r.prompt_ids) for r in rows], "completion": [len(r.completion_ids) for r in rows]}
    return report, lengths


def main(argv: list[str] | None = None) -> int:
    from prefalign.cli._args import parse
    from prefalign.errors import UserError

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] != "inspect":
        raise UserError(f"unknown data command {argv[0]!r}; choose one of: inspect")
    cfg = parse(InspectConfig, argv[1:], prog="prefalign data inspect", description=__doc__)
    lines = inspect(cfg)
    print("\n".join(lines))
    return 1 if NO_USABLE_ROWS in lines else 0  # the report is printed; the exit says the data cannot train
