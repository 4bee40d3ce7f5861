"""The verdict table (`prefalign.compare.verdict`) as text: markdown for report.md, wrapped lines for a terminal."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

from prefalign.compare.verdict import VerdictRow


def verdict_markdown(rows: Sequence[VerdictRow]) -> str:
    """The table in markdown: Claim | PPO-RLHF claim | DPO claim | one measured column per arm | Verdict."""
    if not rows:
        return ""
    labels = list(rows[0].measured)
    header = ["Claim", "PPO-RLHF claim", "DPO claim", *(f"{label} measured" for label in labels), "Verdict"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for number, row in enumerate(rows, 1):
        cells = [f"{number}. {row.topic}", row.claim_ppo, row.claim_dpo, *(row.measured[label] for label in labels)]
        cells.append(f"**{row.verdict}**: {row.reason}")
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def verdict_text(rows: Sequence[VerdictRow], width: int = 110) -> str:
    """The table for a terminal: per row ``N. Topic - verdict: reason``, then the claims and the measured cells
    indented, each wrapped at ``width``."""
    blocks = []
    for number, row in enumerate(rows, 1):
        lines = [textwrap.fill(f"{number}. {row.topic} - {row.verdict}: {row.reason}", width, subsequent_indent="   ")]
        named = {
            "PPO-RLHF claims": row.claim_ppo,
            "DPO claims": row.claim_dpo,
            **{f"{label} measured": text for label, text in row.measured.items()},
        }
        pad = max(len(name) for name in named) + 2
        for name, text in named.items():
            first = f"   {name + ':':<{pad}}"
            lines.append(textwrap.fill(text, width, initial_indent=first, subsequent_indent=" " * len(first)))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + ("\n" if blocks else "")
