"""Several reward sources as one (`WeightedRewards`, the ``--reward A --reward B --reward-weights`` of
`prefalign rl`), their short names for metric keys, and the check that prompt rows carry every column a source
needs (`check_reward_columns`), for one source or several."""

from __future__ import annotations

from pathlib import Path

import torch

from prefalign.errors import UserError
from prefalign.judges import Columns
from prefalign.rewards import JUDGES, CallableReward, RewardSource, check_scores, load_reward_source, score_with_columns


def reward_key(spec: str) -> str:
    """A short name of a reward source for metric keys: the judge's name, ``file.function`` of a callable, the
    directory name of a reward model (``runs/rm/final`` -> ``rm/final``: "final" alone says nothing)."""
    if spec in JUDGES:
        return spec
    module_part, _, attr = spec.rpartition(":")
    if module_part and attr and not Path(spec).expanduser().exists():
        return f"{Path(module_part).stem if module_part.endswith('.py') else module_part}.{attr}"
    parts = Path(spec).parts
    return "/".join(parts[-2:]) if parts and parts[-1] == "final" else (parts[-1] if parts else spec)


def check_reward_columns(source: RewardSource, columns: Columns) -> None:
    """Refuse, before a run writes anything, a reward (alone or inside `WeightedRewards`) that needs a column the
    prompt rows lack: a ``module:function`` requiring a keyword argument, or a judge's ``required_columns`` (the
    ``arithmetic`` judge's ``answer``): the `UserError` its first call would raise."""
    for src in getattr(source, "sources", {"": source}).values():
        if isinstance(src, CallableReward):
            src.column_kwargs({c: [] for c in columns})
        for name in getattr(src, "required_columns", ()):
            if name not in columns:
                raise src.missing_column(columns)  # a judge with required_columns words its own refusal
            lacking = [i for i, value in enumerate(columns[name]) if value is None]
            if lacking:  # a column some rows of the file have and others do not
                raise UserError(
                    f"judge {src.name!r} needs {name!r} in every prompt row, but {len(lacking)} of "
                    f"{len(columns[name])} lack it (the first: prompt {lacking[0] + 1}); give every row one"
                )


class WeightedRewards:
    """Several reward sources as one: ``score = sum_i w_i * score_i``; each source's own scores of the last call
    are kept in ``last_parts`` (name -> ``(B,)``) for logging."""

    def __init__(self, sources: dict[str, RewardSource], weights: list[float]):
        if len(sources) != len(weights):
            raise ValueError(f"{len(weights)} weights for {len(sources)} reward sources")
        self.sources, self.weights = sources, list(weights)
        self.name = " + ".join(f"{w:g} x {k}" for k, w in zip(sources, self.weights))
        self.last_parts: dict[str, torch.Tensor] = {}

    @classmethod
    def load(cls, specs: list[str], weights: list[float], **kw) -> WeightedRewards:
        """Each spec through `load_reward_source` (``kw`` as there), keyed by `reward_key`."""
        keys = [reward_key(s) for s in specs]
        if len(set(keys)) != len(keys):
            raise UserError(f"--reward sources {' '.join(specs)} have the same short name; copy one under another name")
        return cls({k: load_reward_source(s, **kw) for k, s in zip(keys, specs)}, weights)

    def score(self, prompts: list[str], completions: list[str], columns: Columns | None = None) -> torch.Tensor:
        parts = {
            k: check_scores(score_with_columns(src, prompts, completions, columns), len(completions), f"--reward {k}")
            for k, src in self.sources.items()
        }
        self.last_parts = parts
        total = sum((w * p for w, p in zip(self.weights, parts.values())), torch.zeros(len(completions)))
        if not torch.isfinite(total).all():  # each part is a finite float32; their weighted sum may not be
            i = int((~torch.isfinite(total)).nonzero()[0])
            raise UserError(
                f"--reward-weights: the weighted sum of the rewards overflows float32 at completion {i}; scale "
                "the rewards or their weights down"
            )
        return total
