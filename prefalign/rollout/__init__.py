"""Sampling from a policy: the generation backend, EOS truncation, rollouts."""

from prefalign.rollout.generate import Generation, SamplingConfig, cut_at_stop, eos_token_ids, generate, truncate_at_eos
from prefalign.rollout.sampler_copy import refresh_sampling_copy, release_sampling_copy, sampling_copy

__all__ = [
    "Generation",
    "SamplingConfig",
    "cut_at_stop",
    "eos_token_ids",
    "generate",
    "refresh_sampling_copy",
    "release_sampling_copy",
    "sampling_copy",
    "truncate_at_eos",
]
