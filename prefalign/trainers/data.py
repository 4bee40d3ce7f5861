"""From a trainer config to indexed train/eval examples: load, validate, tokenise once, split.

Examples are ``(index, item)`` tuples: the index is the example's position in train + eval and keys
anything computed per example once (precomputed reference log-probs).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from prefalign.data.io import text_field
from prefalign.data.report import DropReport
from prefalign.errors import UserError

log = logging.getLogger(__name__)


def split_eval(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out ``round(fraction * P)`` of the P distinct prompts (at least 1 when fraction > 0), chosen by a seeded
    permutation of the prompts in order of first appearance, with every item of theirs; items keep their order.

    By prompt, not by item: pairs of one prompt share its text and often a completion, so a held-out pair whose
    prompt also trains is partly seen (a reward model that learned A > B and B > C ranks A > C for free). With one
    item per prompt this is the item-level split (the same permutation of as many)."""
    if fraction <= 0:
        return items, []
    groups: dict[object, int] = {}  # by the prompt's text before truncation (its ids where an item has none)
    of = [groups.setdefault(getattr(item, "prompt", "") or tuple(item.prompt_ids), len(groups)) for item in items]
    n = len(groups)
    n_eval = max(1, round(fraction * n))
    if n_eval >= n:
        raise UserError(
            f"--eval-split {fraction} holds out {n_eval} of {n} distinct prompts and leaves none to train on; lower it"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(perm[:n_eval])
    return [x for x, g in zip(items, of) if g not in held], [x for x, g in zip(items, of) if g in held]


def _index(train: list, evals: list) -> tuple[list[tuple[int, Any]], list[tuple[int, Any]]]:
    return list(enumerate(train)), [(len(train) + j, x) for j, x in enumerate(evals)]


def _load_tokenized_pairs(source: str, split: str, cfg, tokenizer) -> tuple[list, dict]:
    from prefalign.data import load_preferences, tokenize_preferences

    examples, report = load_preferences(source, tokenizer, format=getattr(cfg, "data_format", None), split=split)
    pairs, fit = tokenize_preferences(examples, tokenizer, cfg.max_length, cfg.prompt_budget, source)
    if fit.dropped:
        log.warning("%s: %s", source, fit.summary())
    report.merge(fit)  # both stages may drop for one reason (identical as text, then as tokens): counts add
    return pairs, {"rows": report.total, "kept": len(pairs), "dropped": report.counts}


def _splits(load, cfg, tokenizer):
    """Load ``cfg.data`` with ``load``; hold out ``cfg.eval_data`` (loaded the same way) or ``cfg.eval_split``."""
    items, info = load(cfg.data, cfg.data_split, cfg, tokenizer)
    if cfg.eval_data:
        train, evals = items, load(cfg.eval_data, cfg.eval_data_split, cfg, tokenizer)[0]
    else:
        seed = cfg.seed if cfg.eval_split_seed is None else cfg.eval_split_seed
        train, evals = split_eval(items, cfg.eval_split, seed)
    train, evals = _index(train, evals)
    return train, evals, {"source": cfg.data, **info, "train": len(train), "eval": len(evals)}


def load_preference_splits(cfg, tokenizer):
    """``(train, eval, info)`` of tokenised preference pairs for the dpo and reward trainers."""
    return _splits(_load_tokenized_pairs, cfg, tokenizer)


def prompt_completion_rows(table, require_kept: bool = True) -> tuple[list[str], list[str], list[str], DropReport]:
    """The prompt and completion strings of ``table`` and where each is; empty ones are dropped, counted and
    logged (all dropped: a `UserError`, unless ``require_kept`` is off)."""
    report = DropReport(source=table.source, total=len(table.rows))
    prompts, completions, wheres = [], [], []
    for where, row in table.rows:
        needs = "every sft row needs a prompt and a completion"
        p, c = (text_field(table.source, where, row, name, needs) for name in ("prompt", "completion"))
        if not p.strip():
            report.drop("empty_prompt", where, "prompt is empty")
        elif not c.strip():
            report.drop("empty_completion", where, "completion is empty")
        else:
            prompts.append(p)
            completions.append(c)
            wheres.append(where)
    if require_kept:
        report.require_some_kept("fix the rows")
    if report.dropped:
        log.warning("%s: %s", table.source, report.summary())
    return prompts, completions, wheres, report


def _load_tokenized_sft(source: str, split: str, cfg, tokenizer) -> tuple[list, dict]:
    """prompt/completion rows, or the chosen side of preference data."""
    from prefalign.data import load_preferences, read_table, tokenize_sft

    table = read_table(source, split=split)
    if {"prompt", "completion"} <= set(table.columns):
        if getattr(cfg, "data_format", None) not in (None, "auto"):
            raise UserError(
                f"{source}: --data-format {cfg.data_format} reads preference data, and this file has prompt and "
                "completion columns; drop --data-format"
            )
        prompts, completions, wheres, report = prompt_completion_rows(table)
    elif not {"chosen", "rejected"} & set(table.columns):
        # the preference reader's refusal would send an sft user to chosen/rejected or call the file prompt-only
        raise UserError(
            f"{source}: sft reads prompt and completion columns, or preference data (its chosen side); found "
            f"columns: {', '.join(table.columns)}"
        )
    else:
        examples, report = load_preferences(table, tokenizer, format=getattr(cfg, "data_format", None))
        prompts, completions = [e.prompt for e in examples], [e.chosen for e in examples]
        wheres = [e.where for e in examples]
    items, fit = tokenize_sft(prompts, completions, tokenizer, cfg.max_length, cfg.prompt_budget, wheres, source)
    if fit.dropped:
        log.warning("%s: %s", source, fit.summary())
    report.merge(fit)
    return items, {"rows": report.total, "kept": len(items), "dropped": report.counts}


def load_sft_splits(cfg, tokenizer):
    """``(train, eval, info)`` of tokenised prompt/completion examples for the sft trainer."""
    return _splits(_load_tokenized_sft, cfg, tokenizer)


@dataclass
class IndexedCollator:
    """Collate ``(index, item)`` examples with ``collate`` and add ``index (N,)``."""

    collate: Callable[[list], dict[str, torch.Tensor]]

    def __call__(self, examples: list[tuple[int, Any]]) -> dict[str, torch.Tensor]:
        batch = self.collate([item for _, item in examples])
        batch["index"] = torch.tensor([i for i, _ in examples], dtype=torch.long)  # (N,)
        return batch
