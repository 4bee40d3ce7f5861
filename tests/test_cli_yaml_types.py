"""--config FILE: a value of the wrong type is refused in one line naming the file and the key (it reached the
config and failed later as "'<=' not supported between instances of 'str' and 'int'")."""

import pytest

from prefalign.cli._args import load_yaml_config
from prefalign.compare.config import CompareConfig
from prefalign.errors import UserError
from prefalign.trainers.dpo import DPOConfig
from prefalign.trainers.rl_config import RLConfig


@pytest.mark.parametrize(
    "cls,text,message",
    [
        (CompareConfig, "seeds: three\n", "seeds: expected an integer or null, got 'three'"),
        (CompareConfig, "arms: ppo\n", "arms: expected a list of strings, got 'ppo'"),
        (CompareConfig, "arms: [ppo, 3]\n", "arms: expected a list of strings, got ['ppo', 3]"),
        (DPOConfig, "beta: abc\n", "beta: expected a number or null, got 'abc'"),
        (DPOConfig, "max_steps: 1.5\n", "max_steps: expected an integer or null, got 1.5"),
        (DPOConfig, "lora_r: true\n", "lora_r: expected an integer, got True"),
        (RLConfig, "reward_weights: [1, x]\n", "reward_weights: expected a list of numbers or null, got [1, 'x']"),
    ],
)
def test_a_value_of_the_wrong_type_names_the_file_and_the_key(tmp_path, cls, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        load_yaml_config(cls, str(path))
    assert str(info.value) == f"{path}: {message}"


def test_values_of_the_right_type_load_and_an_exponent_without_a_dot_is_a_number(tmp_path):
    path = tmp_path / "run.yaml"
    # YAML 1.1 reads 1e-5 as the string '1e-5'; an integer is a valid float
    path.write_text("seeds: 2\narms: [ppo, dpo]\nppo_lr: 1e-5\ndpo_lr: 3\njudge: null\nsweep_kl_coefs: [1e-3, 0.01]\n")
    cfg = load_yaml_config(CompareConfig, str(path))
    assert (cfg.seeds, cfg.arms, cfg.ppo_lr, cfg.dpo_lr, cfg.judge) == (2, ["ppo", "dpo"], 1e-5, 3, None)
    assert cfg.sweep_kl_coefs == [1e-3, 0.01]
