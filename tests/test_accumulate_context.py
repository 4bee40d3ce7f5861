"""Every backward of a micro-batch runs inside the backend's accumulate context: FSDP2 reads its no-sync flag
during backward (accelerate's ``no_sync`` sets and resets it around the block), so a backward outside it would
all-reduce gradients on every micro-batch instead of the last."""

from contextlib import contextmanager

import pytest
from conftest import trainer_kwargs
from test_trainer_ppo import LowIdReward
from test_trainer_rl import _cfg as rl_cfg
from test_trainer_rl import prompts  # noqa: F401  (a fixture)

from prefalign.trainers.backend import AccelerateBackend
from prefalign.trainers.dpo import DPOConfig, DPOTrainer
from prefalign.trainers.ppo import PPOConfig, PPOTrainer
from prefalign.trainers.rl import RLTrainer


@pytest.fixture()
def backwards(monkeypatch):
    """``[(inside the accumulate context, boundary)]`` of every backward the run makes."""
    seen: list[tuple[bool, bool]] = []
    depth = [0]
    accumulate, backward = AccelerateBackend.accumulate, AccelerateBackend.backward

    @contextmanager
    def counted(self, models, boundary):
        depth[0] += 1
        try:
            with accumulate(self, models, boundary):
                yield
        finally:
            depth[0] -= 1

    def recorded(self, trained, loss, boundary):
        seen.append((depth[0] > 0, boundary))
        return backward(self, trained, loss, boundary)

    monkeypatch.setattr(AccelerateBackend, "accumulate", counted)
    monkeypatch.setattr(AccelerateBackend, "backward", recorded)
    return seen


def _check(seen, boundaries_expected):
    assert seen and all(inside for inside, _ in seen), seen
    assert {b for _, b in seen} == boundaries_expected  # accumulating and syncing backwards both happened


def test_dpo_backwards_run_inside_the_accumulate_context(tmp_path, tiny_model_dir, pairs, backwards):
    DPOTrainer(DPOConfig(**trainer_kwargs(tmp_path, tiny_model_dir, pairs, max_steps=2, grad_accum=2))).train()
    _check(backwards, {False, True})


def test_ppo_backwards_run_inside_the_accumulate_context(tmp_path, tiny_model_dir, prompts, tokenizer, backwards):  # noqa: F811
    cfg = PPOConfig(
        prompts=str(prompts), reward="low-id", model=str(tiny_model_dir), output=str(tmp_path / "run"), max_steps=1,
        rollout_batch_size=8, num_minibatches=1, ppo_epochs=1, grad_accum=2, max_new_tokens=4, precision="fp32", seed=0,
    )  # fmt: skip
    PPOTrainer(cfg, reward_source=LowIdReward(tokenizer)).train()
    _check(backwards, {False, True})
    assert len(backwards) == 4  # 2 micro-batches x (policy, value)


def test_rl_backwards_run_inside_the_accumulate_context(tmp_path, tiny_model_dir, prompts, tokenizer, backwards):  # noqa: F811
    cfg = rl_cfg(tmp_path, tiny_model_dir, prompts, max_steps=1, num_minibatches=1, ppo_epochs=1, grad_accum=2)
    RLTrainer(cfg, reward_source=LowIdReward(tokenizer)).train()
    _check(backwards, {False, True})
