"""`prefalign rl --overlong-buffer`: DAPO's soft overlong punishment in the scores (Yu et al. 2025, section 3.4)."""

import pytest
from test_trainer_rl import prompts  # noqa: F401  (a fixture)

from prefalign.errors import UserError
from prefalign.trainers.rl import RLConfig

# -- config ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(overlong_buffer=0), r"^--overlong-buffer must be >= 1, got 0$"),
        (dict(overlong_buffer=-3), r"^--overlong-buffer must be >= 1, got -3$"),
        (
            dict(overlong_buffer=48),  # the default --max-new-tokens
            r"^--overlong-buffer must be < --max-new-tokens \(48\), got 48: .* every completion would pay it$",
        ),
        (dict(overlong_buffer=10, max_new_tokens=8), r"^--overlong-buffer must be < --max-new-tokens \(8\), got 10"),
        (dict(overlong_buffer=4, overlong_penalty_factor=0.0), r"^--overlong-penalty-factor must be > 0, got 0.0$"),
        (dict(overlong_buffer=4, overlong_penalty_factor=-1.0), r"^--overlong-penalty-factor must be > 0, got -1.0$"),
        (
            dict(overlong_penalty_factor=0.5),
            r"^--overlong-penalty-factor 0.5 needs --overlong-buffer \(the tokens the penalty grows over\)$",
        ),
        (
            dict(overlong_buffer=4, overlong_penalty_factor=float("inf")),
            r"^--overlong-penalty-factor must be a finite number, got inf$",
        ),
    ],
)
def test_config_refuses_bad_overlong_options(prompts, kw, match):  # noqa: F811
    with pytest.raises(ValueError, match=match):
        RLConfig(prompts=str(prompts), reward=["vader"], **kw)


def test_config_takes_the_overlong_options(prompts):  # noqa: F811
    base = dict(prompts=str(prompts), reward=["vader"])
    assert RLConfig(**base).overlong_buffer is None  # off by default
    cfg = RLConfig(**base, overlong_buffer=47)  # the widest buffer: a 1-token completion goes free
    assert (cfg.overlong_buffer, cfg.overlong_penalty_factor, cfg.overlong_factor) == (47, None, 1.0)
    assert RLConfig(**base, overlong_buffer=1, overlong_penalty_factor=0.5).overlong_factor == 0.5


def test_cli_flags_parse_and_a_factor_without_a_buffer_is_one_line(prompts):  # noqa: F811
    from prefalign.cli._args import parse

    args = ["--prompts", str(prompts), "--reward", "vader", "--output", "x"]
    cfg = parse(RLConfig, [*args, "--overlong-buffer", "8", "--overlong-penalty-factor", "0.5"], prog="prefalign rl")
    assert (cfg.overlong_buffer, cfg.overlong_factor) == (8, 0.5)
    with pytest.raises(UserError, match=r"^--overlong-penalty-factor 0.5 needs --overlong-buffer \(the tokens"):
        parse(RLConfig, [*args, "--overlong-penalty-factor", "0.5"], prog="prefalign rl")
