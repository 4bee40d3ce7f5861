"""Config validation that runs on construction, except while the CLI parses.

Configs check their values in ``validate()``. Built in Python, a config validates at once (a
``ValueError``). The CLI builds configs through tyro, which would turn a ``ValueError`` into a
multi-line box; so the CLI defers validation while parsing and runs it itself, reporting one line.
"""

from __future__ import annotations

import contextlib
import contextvars

_deferred = contextvars.ContextVar("prefalign_deferred_validation", default=False)


class Validated:
    """Mixin for config dataclasses: ``__post_init__`` runs ``validate()`` unless deferred."""

    def __post_init__(self):
        if not _deferred.get():
            self.validate()

    def validate(self) -> None:
        """Raise ValueError with a one-line message naming the flag when a value is invalid."""


@contextlib.contextmanager
def deferred_validation():
    token = _deferred.set(True)
    try:
        yield
    finally:
        _deferred.reset(token)
