"""The AdamW-aware comparison of final weights (conftest.assert_same_adamw_weights) fails on what a defect would do."""

import pytest
import torch
from conftest import assert_same_adamw_weights


def _pair(shape=(32, 64)):
    a = {"w": torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02}
    return a, {"w": a["w"].clone()}


def test_one_element_near_adamw_eps_passes():
    a, b = _pair()
    b["w"][3, 7] += 8.1e-5  # measured: full-fine-tuning DPO, lr 1e-3, 3 steps, one element of down_proj
    assert_same_adamw_weights(a, b, 1e-5, lr=1e-3, steps=3)


def test_a_wrong_gradient_moves_every_element_and_fails():
    a, b = _pair()
    b["w"] += 2e-5
    with pytest.raises(AssertionError, match="'w', 2048, 2048"):
        assert_same_adamw_weights(a, b, 1e-5, lr=1e-3, steps=3)


def test_two_elements_of_a_small_tensor_fail():
    a, b = _pair((32, 4))
    b["w"][0, 0] += 2e-5
    b["w"][5, 1] -= 2e-5
    with pytest.raises(AssertionError, match="'w', 2, 128"):
        assert_same_adamw_weights(a, b, 1e-5, lr=1e-2, steps=3)


def test_a_lost_gradient_element_fails():
    a, b = _pair()
    b["w"][1, 1] += 1e-3 * 3  # an element that did not move at all: lr a step, three steps
    with pytest.raises(AssertionError, match=r"'w', 0\.003"):
        assert_same_adamw_weights(a, b, 1e-5, lr=1e-3, steps=3)
