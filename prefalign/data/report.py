"""Counting the rows we drop, so no row disappears without a trace.

A *drop* is a row that is well-formed but unusable (an empty reply, chosen identical to rejected, too
long). Drops are counted by reason with the first offending row kept as an example; a malformed file
is never a drop but a `UserError`. With ``strict=True`` the first drop becomes that error instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prefalign.errors import UserError


@dataclass
class DropReport:
    """Rows seen, rows dropped by reason, and where each reason first happened."""

    source: str = ""
    """The file or dataset the rows came from (used in messages)."""
    total: int = 0
    """Rows looked at."""
    counts: dict[str, int] = field(default_factory=dict)
    """reason -> rows dropped for it, in the order reasons first happened."""
    first: dict[str, str] = field(default_factory=dict)
    """reason -> ``"line 87: <detail>"`` for the first row dropped for it."""
    truncated: int = 0
    """Rows kept whose prompt lost tokens on the left (tokenisation only)."""
    strict: bool = False
    """Raise a `UserError` at the first drop instead of counting it."""

    def drop(self, reason: str, where: str, detail: str) -> None:
        """Count one dropped row; ``where`` is e.g. ``"line 3"`` (may be empty), ``detail`` says why."""
        at = f"{where}: {detail}" if where else detail
        if self.strict:
            prefix = f"{self.source}: " if self.source else ""
            raise UserError(f"{prefix}{at} [{reason}]; fix or remove the row (strict mode turns drops into errors)")
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self.first.setdefault(reason, at)

    @property
    def dropped(self) -> int:
        return sum(self.counts.values())

    @property
    def kept(self) -> int:
        return self.total - self.dropped

    def merge(self, later: DropReport) -> None:
        """Add the drops of a later stage (e.g. tokenisation) that ran on this stage's kept rows."""
        for reason, n in later.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + n
            self.first.setdefault(reason, later.first[reason])
        self.truncated += later.truncated

    def lines(self) -> list[str]:
        """One line per drop reason (and one for truncation), e.g. ``dropped 4 empty_chosen (first: line 87: ...)``."""
        out = [f"dropped {n} {reason} (first: {self.first[reason]})" for reason, n in self.counts.items()]
        if self.truncated:
            out.append(f"left-truncated the prompt of {self.truncated} kept rows")
        return out

    def summary(self) -> str:
        """One line: ``2312 rows, 2304 kept, 8 dropped (prompt_mismatch 4, empty_chosen 4)``."""
        s = f"{self.total} rows, {self.kept} kept, {self.dropped} dropped"
        if self.counts:
            s += " (" + ", ".join(f"{reason} {n}" for reason, n in self.counts.items()) + ")"
        return s

    def require_some_kept(self, hint: str) -> None:
        """Raise a one-line `UserError` when every row was dropped; ``hint`` says what to do."""
        if self.total and not self.kept:
            prefix = f"{self.source}: " if self.source else ""
            raise UserError(f"{prefix}all {self.total} rows were dropped ({', '.join(self._short())}); {hint}")

    def _short(self) -> list[str]:
        return [f"{reason} {n}, first at {self.first[reason].split(':')[0]}" for reason, n in self.counts.items()]

    def __str__(self) -> str:
        return "\n".join([self.summary(), *self.lines()])
