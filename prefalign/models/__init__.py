"""Model loading, the embedded default, tiny test models and sequence log-probs."""

from prefalign.models.loading import (
    DEFAULT_MODEL,
    EMBEDDED,
    base_model,
    cache_dir,
    disable_dropout,
    load_causal_lm,
    load_policy,
    load_tokenizer,
    policy_base,
    resolve_model,
)
from prefalign.models.tiny import tiny_causal_lm

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED",
    "base_model",
    "cache_dir",
    "disable_dropout",
    "load_causal_lm",
    "load_policy",
    "load_tokenizer",
    "policy_base",
    "resolve_model",
    "tiny_causal_lm",
]
