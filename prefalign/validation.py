"""Config validation that runs on construction, except while the CLI parses.

Configs check their values in ``validate()``. Built in Python, a config validates at once (a
``ValueError``). The CLI builds configs through tyro, which would turn a ``ValueError`` into a
multi-line box; so the CLI defers validation while parsing and runs it itself, reporting one line.

An error names the field by its flag (`flag`: ``--max-new-tokens``), so the message says what to change on
the command line; `require_at_least_one` and `check_sampling` hold the checks several configs share.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math

_deferred = contextvars.ContextVar("prefalign_deferred_validation", default=False)


class Validated:
    """Mixin for config dataclasses: ``__post_init__`` runs ``validate()`` unless deferred."""

    def __post_init__(self):
        if not _deferred.get():
            self.check()

    def check(self) -> None:
        """Every check of this config: no field holds a non-finite number (`require_finite`), then `validate`."""
        require_finite(self)
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


def changed_fields(config, names: tuple[str, ...], cls: type | None = None) -> list[str]:
    """Those of ``names`` whose value in ``config`` differs from its default in ``cls`` (``config``'s own class when
    None; a factory default is called), in the order of ``names``: the options a user set. A config file holding an
    option at its default does not count, so a run's own config.yaml (which holds every field) still parses."""
    defaults = {
        f.name: f.default_factory() if callable(f.default_factory) else f.default
        for f in dataclasses.fields(cls or type(config))
    }
    return [name for name in names if getattr(config, name) != defaults[name]]


def flag(name: str) -> str:
    """The command-line flag of a config field, as errors name it: ``max_new_tokens`` -> ``--max-new-tokens``."""
    return "--" + name.replace("_", "-")


def require_finite(cfg) -> None:
    """Refuse a field (or an element of a list or tuple field) holding NaN or an infinity, naming its flag.

    No option of prefalign takes one (an unset limit is None), and they pass every range check written as
    ``x <= 0`` or ``x < 0``: an infinite learning rate trained an all-NaN model and exited 0."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        for x in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(x, float) and not math.isfinite(x):
                raise ValueError(f"{flag(f.name)} must be a finite number, got {value}")


def require_at_least_one(cfg, *names: str) -> None:
    """Refuse the first field of ``names`` below 1 (a ValueError naming its flag); None means unset and passes."""
    for name in names:
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise ValueError(f"{flag(name)} must be >= 1, got {value}")


def check_sampling(cfg) -> None:
    """The checks of every config that samples completions (``SamplingConfig``, ``PPOConfig``, ...).

    Reads ``max_new_tokens`` and ``temperature``, and ``greedy``, ``top_p``, ``top_k`` and ``stop`` where
    ``cfg`` has them (a config without ``greedy`` always samples, so its temperature must be > 0).
    """
    require_at_least_one(cfg, "max_new_tokens")
    if not getattr(cfg, "greedy", False) and not cfg.temperature > 0:  # `not >` also refuses NaN
        raise ValueError(
            f"--temperature must be > 0 (use --greedy for argmax), got {cfg.temperature}"
            if hasattr(cfg, "greedy")
            else f"--temperature must be > 0, got {cfg.temperature}"
        )
    if hasattr(cfg, "top_p") and not 0 < cfg.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {cfg.top_p}")
    if hasattr(cfg, "top_k") and cfg.top_k < 0:
        raise ValueError(f"--top-k must be >= 0, got {cfg.top_k}")
    if "" in getattr(cfg, "stop", ()):
        raise ValueError("--stop strings must not be empty (an empty one would cut every completion to nothing)")
    if getattr(cfg, "decoder", "loop") not in ("loop", "generate"):
        raise ValueError(f"--decoder must be loop or generate, got {cfg.decoder!r}")
