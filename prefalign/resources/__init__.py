"""Data files shipped inside the package (see ``README.md`` in this folder).

The movie-review prefixes are the prompts of the default task, controlled sentiment generation:
the policy continues a prefix and VADER scores the continuation. ``train`` feeds training (PPO
rollouts, preference pairs), ``heldout`` only evaluation; the two never share a line.

``arithmetic_{train,heldout}.jsonl`` are the prompts of the arithmetic task (rows ``{"prompt", "answer"}``,
checked by the ``arithmetic`` judge), written by `prefalign.resources.make_arithmetic`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from prefalign.errors import UserError

PREFIX_SPLITS = ("train", "heldout")
"""The splits `movie_prefixes` accepts."""


def resource_path(name: str) -> Path:
    """The file ``name`` of this folder as a filesystem path (a `UserError` if there is no such file)."""
    entry = resources.files(__name__) / name
    if not entry.is_file():
        known = sorted(
            e.name for e in resources.files(__name__).iterdir() if e.is_file() and not e.name.startswith(("_", "."))
        )
        raise UserError(f"no packaged resource {name!r}; available: {', '.join(known)}")
    # A regular install (wheel, editable) unpacks the package, so the entry is already a real path;
    # only a zip import would not be, and prefalign is never installed that way.
    if not isinstance(entry, Path):
        raise UserError(
            f"packaged resource {name!r} is not on the filesystem ({entry!r}); "
            "install prefalign unzipped (pip install, not a zipapp)"
        )
    return entry


def movie_prefixes(split: str) -> list[str]:
    """The movie-review prompt prefixes of ``split`` (``"train"``: 324, ``"heldout"``: 100), in file order."""
    if split not in PREFIX_SPLITS:
        raise UserError(f"unknown prefix split {split!r}; choose one of {', '.join(PREFIX_SPLITS)}")
    text = (resources.files(__name__) / f"movie_prefixes_{split}.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line]
