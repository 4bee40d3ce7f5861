"""Tokenise once, prompt and completions separately, and fit each row into ``max_length``.

Special tokens
    Text is tokenised with ``add_special_tokens=False``, so a tokenizer never slips a BOS in front of
    a completion or an EOS after a prompt. The prompt gets the tokenizer's BOS in front only if the
    tokenizer adds one by default (Llama 2 does; SmolLM2 adds none) and the prompt does not already
    start with it (a chat template may have written it). Every completion ends with the EOS id: it is
    appended unless the completion already ends with it (chat-rendered replies end with the
    template's end-of-turn token, which is SmolLM2's EOS).

Truncation (completions are never cut)
    1. A prompt longer than ``max_prompt_length`` (default ``max_length // 2``) keeps its last
       ``max_prompt_length`` tokens: the end of a prompt is what the reply answers.
    2. If prompt + the longer completion is still over ``max_length``, the prompt is cut further on
       the left to make room, but never below ``MIN_PROMPT_TOKENS`` (8) tokens, or its whole length
       if shorter: a reply scored against a few stray tokens of context is mostly noise.
    3. If that is not enough, the row is dropped with reason ``too_long``.
    A leading BOS survives left-truncation (it counts towards the lengths). Rows whose prompt lost
    tokens are counted in the report's ``truncated``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from prefalign.data.io import progress
from prefalign.data.preferences import PreferenceExample
from prefalign.data.report import DropReport
from prefalign.errors import UserError

MIN_PROMPT_TOKENS = 8
ENCODE_BATCH = 1024  # texts per fast-tokenizer call: big enough to use its threads, small enough for a progress bar


@dataclass(frozen=True)
class TokenizedPair:
    """One preference pair as token ids; ``chosen_ids`` and ``rejected_ids`` end with EOS."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    margin: float | None = None
    where: str = field(default="", compare=False, repr=False)
    prompt: str = field(default="", compare=False, repr=False)
    """The prompt's text before any truncation: what --eval-split groups a prompt's pairs by (the ids of one
    prompt are cut differently beside completions of different lengths)."""


@dataclass(frozen=True)
class TokenizedSFT:
    """One supervised example as token ids; ``completion_ids`` ends with EOS."""

    prompt_ids: list[int]
    completion_ids: list[int]
    where: str = field(default="", compare=False, repr=False)
    prompt: str = field(default="", compare=False, repr=False)
    """As `TokenizedPair.prompt`."""


def encode(tokenizer, texts: Sequence[str], desc: str = "tokenize") -> list[list[int]]:
    """Token ids of each text, no special tokens added, in batched fast-tokenizer calls."""
    out: list[list[int]] = []
    for lo in progress(range(0, len(texts), ENCODE_BATCH), desc, unit="batch"):
        chunk = list(texts[lo : lo + ENCODE_BATCH])
        out.extend(tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"])
    return out


def leading_bos(tokenizer) -> int | None:
    """The BOS id if this tokenizer puts one in front of text by default, else None."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == bos else None


def _eos(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no EOS token; completions must end with one (use a tokenizer that has it)")
    return int(tokenizer.eos_token_id)


def _with_bos(ids: list[int], bos: int | None) -> list[int]:
    return [bos] + ids if bos is not None and (not ids or ids[0] != bos) else ids


def _with_eos(ids: list[int], eos: int) -> list[int]:
    return ids if ids and ids[-1] == eos else ids + [eos]


def left_truncate(ids: list[int], n: int, bos: int | None = None) -> list[int]:
    """The last ``n`` tokens of ``ids``; a leading ``bos`` stays in front (and counts towards ``n``)."""
    if len(ids) <= n:
        return ids
    if bos is not None and ids[0] == bos:
        return ids[:1] + ids[len(ids) - n + 1 :] if n > 1 else ids[:1]
    return ids[len(ids) - n :]


def fit_prompt(
    prompt_ids: list[int], longest_completion: int, max_length: int, max_prompt_length: int, bos: int | None = None
) -> list[int] | None:
    """The prompt ids after the truncation policy (module docstring), or None if the row must be dropped."""
    ids = left_truncate(prompt_ids, max_prompt_length, bos)
    room = max_length - longest_completion
    floor = max(1, min(MIN_PROMPT_TOKENS, len(ids)))  # >= 1: a completion needs a token before it
    if room < floor:
        return None
    return left_truncate(ids, room, bos)


def _limits(max_length: int | None, max_prompt_length: int | None) -> tuple[int, int] | None:
    """``(max_length, max_prompt_length)`` checked, the prompt's default half; None: no limit."""
    if max_length is None:
        return None
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (one prompt and one completion token), got {max_length}")
    max_prompt_length = max_length // 2 if max_prompt_length is None else max_prompt_length
    if max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be >= 1, got {max_prompt_length}")
    return max_length, max_prompt_length


def _fit_rows(
    rows: list,
    completions_of,
    rebuild,
    max_length: int | None,
    max_prompt_length: int | None,
    bos: int | None,
    report: DropReport,
) -> list:
    """Apply `fit_prompt` to every row; the one loop behind preference, SFT and pair re-fitting."""
    limits = _limits(max_length, max_prompt_length)
    kept = []
    for row in rows:
        if not row.prompt_ids:
            report.drop("empty_prompt", row.where, "prompt has no tokens; a completion needs a token before it")
            continue
        if limits is None:
            kept.append(row)
            continue
        max_length, max_prompt_length = limits
        longest = max(len(c) for c in completions_of(row))
        prompt = fit_prompt(row.prompt_ids, longest, max_length, max_prompt_length, bos)
        if prompt is None:
            report.drop(
                "too_long",
                row.where,
                f"prompt {len(row.prompt_ids)} + completion {longest} tokens do not "
                f"fit max_length {max_length} even with the prompt cut to "
                f"{min(MIN_PROMPT_TOKENS, max_prompt_length, len(row.prompt_ids))}",
            )
            continue
        if len(prompt) < len(row.prompt_ids):
            report.truncated += 1
            row = rebuild(row, prompt)
        kept.append(row)
    return kept


def truncate_pairs(
    pairs: list[TokenizedPair],
    max_length: int | None,
    max_prompt_length: int | None = None,
    bos_token_id: int | None = None,
    source: str = "",
) -> tuple[list[TokenizedPair], DropReport]:
    """Apply the truncation policy to already tokenised pairs (``max_length=None``: keep all as they are).
    ``source`` names the data in messages."""
    report = DropReport(source=source, total=len(pairs))
    kept = _fit_rows(
        pairs,
        lambda p: (p.chosen_ids, p.rejected_ids),
        lambda p, ids: TokenizedPair(ids, p.chosen_ids, p.rejected_ids, p.margin, p.where, p.prompt),
        max_length,
        max_prompt_length,
        bos_token_id,
        report,
    )
    return kept, report


def tokenize_preferences(
    examples: list[PreferenceExample],
    tokenizer,
    max_length: int | None,
    max_prompt_length: int | None = None,
    source: str = "",
    *,
    require_kept: bool = True,
) -> tuple[list[TokenizedPair], DropReport]:
    """Token ids of every pair, fitted to ``max_length`` (None: no limit); too-long pairs and pairs whose two
    completions tokenise the same are dropped. ``source`` (the data's path or id) names it in messages.

    Raises `UserError` if every pair is dropped (unless ``require_kept`` is off: `prefalign data inspect` reports).
    """
    eos, bos = _eos(tokenizer), leading_bos(tokenizer)
    n = len(examples)
    ids = encode(
        tokenizer, [e.prompt for e in examples] + [e.chosen for e in examples] + [e.rejected for e in examples]
    )
    pairs = [
        TokenizedPair(
            _with_bos(ids[i], bos),
            _with_eos(ids[n + i], eos),
            _with_eos(ids[2 * n + i], eos),
            e.margin,
            e.where,
            e.prompt,
        )
        for i, e in enumerate(examples)
    ]
    # different texts can tokenise alike (one ends in the EOS's text, the other gets the EOS appended): such a
    # pair carries no preference
    report = DropReport(source=source, total=n)
    distinct = []
    for pair in pairs:
        if pair.chosen_ids == pair.rejected_ids:
            report.drop("identical", pair.where, "chosen and rejected are the same tokens")
        else:
            distinct.append(pair)
    kept, fit = truncate_pairs(distinct, max_length, max_prompt_length, bos, source)
    report.merge(fit)
    if require_kept:
        report.require_some_kept(
            f"raise max_length (now {max_length}) or use shorter data"
            if "too_long" in report.counts
            else "fix the rows: a prompt needs tokens, and chosen and rejected must differ as token ids"
        )
    return kept, report


def truncate_sft(
    rows: list[TokenizedSFT],
    max_length: int | None,
    max_prompt_length: int | None = None,
    bos_token_id: int | None = None,
    source: str = "",
) -> tuple[list[TokenizedSFT], DropReport]:
    """`truncate_pairs` for supervised rows: the truncation policy applied to already tokenised rows."""
    report = DropReport(source=source, total=len(rows))
    kept = _fit_rows(
        rows,
        lambda r: (r.completion_ids,),
        lambda r, p: TokenizedSFT(p, r.completion_ids, r.where, r.prompt),
        max_length,
        max_prompt_length,
        bos_token_id,
        report,
    )
    return kept, report


def tokenize_sft(
    prompts: Sequence[str],
    completions: Sequence[str],
    tokenizer,
    max_length: int | None,
    max_prompt_length: int | None = None,
    wheres: Sequence[str] | None = None,
    source: str = "",
    *,
    require_kept: bool = True,
) -> tuple[list[TokenizedSFT], DropReport]:
    """Token ids of (prompt, completion) pairs with the same special-token and truncation policy. ``wheres``
    (each row's place in ``source``, e.g. ``"line 7"``; default ``"example i"``) and ``source`` name a dropped
    row in messages. Raises `UserError` if every row is dropped, unless ``require_kept`` is off."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if wheres is not None and len(wheres) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(wheres)} wheres")
    eos, bos = _eos(tokenizer), leading_bos(tokenizer)
    n = len(prompts)
    ids = encode(tokenizer, list(prompts) + list(completions))
    wheres = [f"example {i + 1}" for i in range(n)] if wheres is None else wheres
    rows = [TokenizedSFT(_with_bos(ids[i], bos), _with_eos(ids[n + i], eos), wheres[i], prompts[i]) for i in range(n)]
    kept, report = truncate_sft(rows, max_length, max_prompt_length, bos, source)
    if require_kept:
        report.require_some_kept(f"raise max_length (now {max_length}) or use shorter data")
    return kept, report


def tokenize_prompts(prompts: Sequence[str], tokenizer, max_prompt_length: int) -> list[list[int]]:
    """Prompt ids for generation, each cut to its last ``max_prompt_length`` tokens (a leading BOS kept)."""
    if max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be >= 1, got {max_prompt_length}")
    bos = leading_bos(tokenizer)
    out = []
    for i, ids in enumerate(encode(tokenizer, list(prompts)), start=1):
        ids = _with_bos(ids, bos)
        if not ids:
            raise UserError(f"prompt {i} has no tokens; give non-empty prompts")
        out.append(left_truncate(ids, max_prompt_length, bos))
    return out
