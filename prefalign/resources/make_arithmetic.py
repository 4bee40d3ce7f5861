"""Write the prompts of the arithmetic task: ``arithmetic_train.jsonl`` and ``arithmetic_heldout.jsonl``.

Each row is ``{"prompt": ..., "answer": ...}``: a few solved lines, then one question for the policy to
continue in plain completion mode (no chat template), and its answer as a decimal string::

    {"prompt": "37 + 25 = 62\\n14 + 58 = 72\\n23 + 48 =", "answer": "71"}

The ``arithmetic`` judge (`prefalign.judges.ArithmeticJudge`) scores 1 when the first number of the
completion's first line is the answer (a whole number). Rewrite both files, byte for byte the same, with::

    python -m prefalign.resources.make_arithmetic

Questions are drawn without repetition from one seeded generator and split in draw order, so no question (and
so no prompt) is in both files; each prompt's solved lines are drawn from the same generator, never equal to its
question. The operands are small (1 to 25: 625 possible questions, 424 used) because the 135M starting policy
solves only about a fifth of two-digit sums up to 198 at temperature 1 and a third of these (resources/README.md).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 14
"""The generator's seed (issue 14 of prefalign introduced the task)."""
SPLITS = {"train": 324, "heldout": 100}
"""Rows per file, in the order the questions are drawn."""
SHOTS = 2
"""Solved lines before the question."""
LOW, HIGH = 1, 25
"""Each operand is an integer in [LOW, HIGH]."""
OPERATORS = {"+": lambda a, b: a + b}
"""What a question may ask, by the symbol the prompt shows."""

HERE = Path(__file__).resolve().parent


def draw(rng: random.Random) -> tuple[int, str, int]:
    """One question ``(a, op, b)``."""
    a, b = rng.randint(LOW, HIGH), rng.randint(LOW, HIGH)
    return a, rng.choice(sorted(OPERATORS)), b


def solve(a: int, op: str, b: int) -> int:
    return OPERATORS[op](a, b)


def make_rows(seed: int = SEED) -> dict[str, list[dict[str, str]]]:
    """The rows of every split, ``{"train": [...], "heldout": [...]}``, drawn from ``random.Random(seed)``."""
    rng = random.Random(seed)
    questions: list[tuple[int, str, int]] = []
    while len(questions) < sum(SPLITS.values()):
        question = draw(rng)
        if question not in questions:
            questions.append(question)
    rows = []
    for question in questions:
        shots: list[tuple[int, str, int]] = []
        while len(shots) < SHOTS:
            shot = draw(rng)
            if shot != question:  # the answer is never in its own prompt
                shots.append(shot)
        solved = "".join(f"{a} {op} {b} = {solve(a, op, b)}\n" for a, op, b in shots)
        a, op, b = question
        rows.append({"prompt": f"{solved}{a} {op} {b} =", "answer": str(solve(a, op, b))})
    out, start = {}, 0
    for split, count in SPLITS.items():
        out[split] = rows[start : start + count]
        start += count
    return out


def render(rows: list[dict[str, str]]) -> str:
    """A file's text: one JSON object per line, ``\\n`` line ends."""
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def main(folder: Path = HERE) -> None:
    for split, rows in make_rows().items():
        path = folder / f"arithmetic_{split}.jsonl"
        path.write_bytes(render(rows).encode("utf-8"))
        print(f"{path}: {len(rows)} rows")


if __name__ == "__main__":
    main()
