"""Built-in gold judges (`prefalign.rewards.JUDGES`): fixed rules that score decoded text, no model to load.

* ``vader``: VADER's compound sentiment of the completion alone, in [-1, 1] (Hutto and Gilbert, 2014), the gold
  judge of controlled sentiment generation (the first experiment of the DPO paper, Rafailov et al. 2023, done
  offline);
* ``arithmetic``: exact match, 1.0 or 0.0, of the first number on the completion's first line (a whole one) with the
  ``answer`` column of the prompt's row (a verifiable reward: a right answer is checked, not estimated).

Each judge scores like every reward source (`prefalign.rewards`): ``score(prompts, completions, columns=None) ->
(B,)`` float32 on CPU. A judge that reads a column names it in ``required_columns`` and words its refusal in
``missing_column(columns)``, so `prefalign.reward_mix.check_reward_columns` refuses prompt rows without it before a run
writes anything.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from prefalign.errors import UserError

Columns = dict[str, list[Any]]
"""A prompt row's other dataset columns for a batch: name -> one value per completion."""


def check_pairs(prompts: list[str], completions: list[str], columns: Columns | None = None) -> None:
    """One prompt, and one value of every column, per completion."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    for name, values in (columns or {}).items():
        if len(values) != len(completions):
            raise ValueError(f"column {name!r} has {len(values)} values for {len(completions)} completions")


class VaderJudge:
    """VADER compound sentiment of the completion alone, in [-1, 1] (the prompt is never scored)."""

    name = "vader"
    required_columns: tuple[str, ...] = ()

    def __init__(self):
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError:
            raise UserError(
                "the vader judge needs the vaderSentiment package: run `pip install vaderSentiment`"
            ) from None
        self._analyzer = SentimentIntensityAnalyzer()

    def score(self, prompts: list[str], completions: list[str], columns: Columns | None = None) -> torch.Tensor:
        check_pairs(prompts, completions, columns)
        scores = [self._analyzer.polarity_scores(c)["compound"] for c in completions]
        return torch.tensor(scores, dtype=torch.float32)


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def first_integer(completion: str) -> int | None:
    """The first number (an optional ``-``, digits, an optional decimal part) of the text before the first newline,
    as an integer; ``None`` if there is none or it is not a whole number.

    ``" 71\\n12 + 5 = 17"`` -> 71; ``" -3 apples"`` -> -3; ``" 84."`` -> 84 (a full stop); ``" 25.0"`` -> 25;
    ``" 25.5"`` -> None (not 25); ``"\\n71"`` -> None (the first line is empty)."""
    match = _NUMBER.search(completion.split("\n", 1)[0])
    if match is None:
        return None
    whole, _, fraction = match.group().partition(".")
    return int(whole) if not fraction.strip("0") else None


class ArithmeticJudge:
    """1.0 when the first number on the completion's first line (`first_integer`: a whole one) equals the prompt row's
    ``answer``, else 0.0; a first line without a number (an empty completion too) scores 0.0.

    The answers come from the ``answer`` column of the prompt file (a string or an integer per row, e.g.
    ``{"prompt": "23 + 48 =", "answer": "71"}``); without that column scoring is refused, never guessed."""

    name = "arithmetic"
    required_columns: tuple[str, ...] = ("answer",)

    @classmethod
    def missing_column(cls, columns: Columns | None) -> UserError:
        """The one-line error of prompt rows without an ``answer`` column (``columns``: the ones they have)."""
        found = ", ".join(columns or {}) or "none"
        return UserError(
            f"judge {cls.name!r} needs an 'answer' column in the prompt rows (found columns: {found}); give a "
            ".jsonl/.csv prompt file with a prompt and an answer per row, e.g. prefalign/resources/"
            "arithmetic_heldout.jsonl"
        )

    def score(self, prompts: list[str], completions: list[str], columns: Columns | None = None) -> torch.Tensor:
        check_pairs(prompts, completions, columns)
        if not columns or "answer" not in columns:
            raise self.missing_column(columns)
        answers = [_expected(prompt, answer) for prompt, answer in zip(prompts, columns["answer"])]
        scores = [float(first_integer(c) == a) for c, a in zip(completions, answers)]
        return torch.tensor(scores, dtype=torch.float32)


def _expected(prompt: str, answer: Any) -> int:
    """The row's answer as an integer; a missing or non-integer answer is a bad prompt file, not a wrong reply."""
    if isinstance(answer, int) and not isinstance(answer, bool):
        return answer
    if isinstance(answer, str) and re.fullmatch(r"\s*-?\d+\s*", answer):
        return int(answer)
    shown = prompt if len(prompt) <= 40 else "..." + prompt[-37:]
    raise UserError(
        f"judge 'arithmetic': the row of prompt {shown!r} has answer {answer!r}, not an integer; give every "
        'row an integer answer (e.g. "71")'
    )
