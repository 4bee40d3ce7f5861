"""Config errors name the flag with dashes (``--max-new-tokens``), through the shared checks of
`prefalign.validation`."""

import pytest

from prefalign.rollout import SamplingConfig
from prefalign.trainers.ppo_config import PPOConfig
from prefalign.validation import check_sampling, flag, require_at_least_one

SAMPLING_ERRORS = [  # (field values, the message's start)
    ({"max_new_tokens": 0}, "--max-new-tokens must be >= 1, got 0"),
    ({"temperature": 0.0}, "--temperature must be > 0"),
    ({"temperature": float("nan")}, "--temperature must be a finite number, got nan"),
    ({"top_p": 0.0}, "--top-p must be in (0, 1], got 0.0"),
    ({"top_p": 1.5}, "--top-p must be in (0, 1], got 1.5"),
    ({"top_k": -1}, "--top-k must be >= 0, got -1"),
    ({"stop": ["x", ""]}, "--stop strings must not be empty"),
]


def test_flag():
    assert flag("max_new_tokens") == "--max-new-tokens" and flag("seed") == "--seed"


def test_require_at_least_one_skips_unset_values():
    class Cfg:
        steps, episodes = None, 0

    require_at_least_one(Cfg, "steps")
    with pytest.raises(ValueError, match=r"^--episodes must be >= 1, got 0$"):
        require_at_least_one(Cfg, "steps", "episodes")


@pytest.mark.parametrize("kwargs,message", SAMPLING_ERRORS, ids=[m.split()[0] + str(k) for k, m in SAMPLING_ERRORS])
def test_sampling_errors_name_the_flag(kwargs, message):
    with pytest.raises(ValueError) as info:
        SamplingConfig(**kwargs)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize("kwargs,message", SAMPLING_ERRORS, ids=[m.split()[0] + str(k) for k, m in SAMPLING_ERRORS])
def test_ppo_sampling_errors_are_the_same_checks(kwargs, message):
    with pytest.raises(ValueError) as info:
        PPOConfig(prompts="p.txt", reward="vader", **kwargs)
    assert str(info.value).startswith(message)


def test_greedy_needs_no_temperature():
    check_sampling(SamplingConfig(greedy=True, temperature=0.0))


@pytest.mark.parametrize("name", ["max_steps", "episodes", "rollout_batch_size", "sample_every"])
def test_ppo_error_names_the_flag_with_dashes(name):
    with pytest.raises(ValueError) as info:
        PPOConfig(prompts="p.txt", reward="vader", **{name: 0})
    assert str(info.value) == f"{flag(name)} must be >= 1, got 0"
    assert "_" not in str(info.value)
